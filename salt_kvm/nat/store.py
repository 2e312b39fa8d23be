"""Where NAT forwards are kept as desired state: one JSON file on the hypervisor.

Why a file and not the domains' metadata: the libvirt hooks that put the
forwards back (network start, libvirtd restart, host boot) must not call
libvirtd, and the whole table is rendered in one transaction from every
domain's rules. The file holds each domain's rules and where its guest was
last seen (network, bridge, subnet, address, and its IPv6 address and subnet
on a dual-stack network), which is all a hook needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from salt_kvm.errors import SaltKvmError
from salt_kvm.nat import rules as nat
from salt_kvm.virt import locks

DEFAULT_PATH = Path("/var/lib/salt-kvm/nat.json")
VERSION = 1


@dataclass(frozen=True)
class Placement:
    """Where a domain's guest is reachable: its libvirt network and address."""

    network: str
    bridge: str
    subnet: str
    address: str
    mac: str = ""
    # On a dual-stack network: the guest's IPv6 address (the host's DHCPv6
    # record for the same MAC) and the network's IPv6 subnet; "" without.
    address6: str = ""
    subnet6: str = ""


@dataclass
class Entry:
    rules: list[nat.Rule]
    placement: Placement
    # The host the guest was migrated to ("": this one). On a bridged segment
    # it keeps its address, and this host's DNAT still reaches it: the
    # forwards stay here, and nothing that sees the domain gone from this
    # host's libvirt may drop them.
    moved_to: str = ""
    # The libvirt URI whose network holds the DHCP reservation a migration
    # made so the address cannot change under the forwards (released with them).
    pinned_on: str = ""

    def forwards(self, domain: str) -> list[nat.Forward]:
        p = self.placement
        return [
            nat.Forward(domain, r, p.address, p.bridge, p.subnet, p.address6, p.subnet6)
            for r in self.rules
        ]

    def to_json(self) -> dict:
        found = {"rules": [r.as_dict() for r in self.rules], **self.placement.__dict__}
        for key in ("moved_to", "pinned_on"):
            if getattr(self, key):
                found[key] = getattr(self, key)
        return found

    @property
    def pin(self) -> tuple[str, str, str, str] | None:
        """(URI, network, MAC, address) of the reservation a migration made."""
        if not self.pinned_on:
            return None
        p = self.placement
        return self.pinned_on, p.network, p.mac, p.address


def _entry(data: dict) -> Entry:
    fields = {k: data[k] for k in ("network", "bridge", "subnet", "address") if k in data}
    placement = Placement(
        **fields,
        mac=data.get("mac", ""),
        address6=data.get("address6", ""),
        subnet6=data.get("subnet6", ""),
    )
    return Entry(
        [nat.rule_from_dict(r) for r in data.get("rules", [])],
        placement,
        moved_to=data.get("moved_to", ""),
        pinned_on=data.get("pinned_on", ""),
    )


class Store:
    """The desired forwards of every domain, read and written under a lock."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path or os.environ.get("SALT_KVM_NAT_STATE") or DEFAULT_PATH)

    def load(self) -> dict[str, Entry]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {name: _entry(item) for name, item in data.get("domains", {}).items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise SaltKvmError(f"the NAT state file {self.path} is unreadable: {exc}") from exc

    def save(self, entries: dict[str, Entry]) -> None:
        """Write a new file and rename it over the old one: never half a file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "version": VERSION,
            "domains": {name: entries[name].to_json() for name in sorted(entries)},
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)

    @contextlib.contextmanager
    def locked(self, timeout: float = 60) -> Iterator[None]:
        """One writer at a time (a Salt call and a libvirt hook may overlap)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        busy = f"{self.path} is locked by another run"
        with locks.held(f"nat-{tag}.lock", f"writing {self.path}", timeout=timeout, busy=busy):
            yield


def all_forwards(entries: dict[str, Entry]) -> list[nat.Forward]:
    return [f for name, entry in entries.items() for f in entry.forwards(name)]
