"""Several hypervisors behind one provider: the provider's ``hosts`` and a
profile's ``location``, and where ``location: auto`` puts a guest.

Pure logic (no libvirt): the facts each host reports are gathered by
:mod:`salt_kvm.cloud.placement`; here they are compared.

``auto`` takes the host with the most **uncommitted memory** (its memory
minus the memory of its running and autostart guests and of the creates
placed there that have not finished), among the hosts that answered, have the
base domain (or the image's pool) and the networks, and fit the guest's memory
and vCPUs. Ties go to the host with fewer salt-kvm guests, then to the name
first in alphabetical order: the same facts always give the same host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt.checks import shown
from salt_kvm.virt.names import HOST_NAME_RE

AUTO = "auto"
HOSTS_ACCEPTED = "a mapping of host name (letters, digits, '.', '_', '-') to a libvirt URI"


def parse_hosts(hosts: Any, url: Any = None) -> dict[str, str] | None:
    """The provider's ``hosts`` (name → URI), or None for a one-host provider
    (``url`` alone, or neither: the default URI). Both given: refused, one
    would silently win."""
    if hosts is None:
        return None
    if url not in (None, ""):
        raise SpecError(
            "hosts",
            "is given together with url",
            "either url (one hypervisor) or hosts (several), not both",
        )
    if not isinstance(hosts, dict) or not hosts:
        raise SpecError(
            "hosts", f"{shown('hosts', hosts)} is not a non-empty mapping", HOSTS_ACCEPTED
        )
    parsed: dict[str, str] = {}
    for name, uri in hosts.items():
        if not isinstance(name, str) or not HOST_NAME_RE.match(name) or name == AUTO:
            raise SpecError(
                "hosts",
                f"{name!r} is not a usable host name"
                + (" (auto means: let salt-kvm choose)" if name == AUTO else ""),
                HOSTS_ACCEPTED,
            )
        if not isinstance(uri, str) or not uri.strip() or any(c.isspace() for c in uri):
            raise SpecError(
                f"hosts:{name}",
                f"{shown('url', uri)} is not a libvirt URI",
                "e.g. qemu+ssh://root@hv1/system",
            )
        parsed[name] = uri
    return parsed


def check_location(value: Any, hosts: dict[str, str] | None) -> str | None:
    """A profile's (or map entry's) ``location``: a host name, or ``auto`` (the
    default with several hosts). None for a one-host provider."""
    if hosts is None:
        if value in (None, "", AUTO):
            return None
        raise SpecError(
            "location",
            f"{shown('location', value)}: this provider has one hypervisor (url), no named hosts",
            "auto, or give the provider hosts: (name → URI) to choose among",
        )
    if value in (None, ""):
        return AUTO
    if value == AUTO or (isinstance(value, str) and value in hosts):
        return value
    raise SpecError(
        "location",
        f"{shown('location', value)} is not one of this provider's hosts",
        accepted(hosts),
    )


def accepted(hosts: Iterable[str]) -> str:
    return ", ".join([AUTO, *sorted(hosts)])


@dataclass
class Room:
    """What one host offers a new guest (memory in MiB)."""

    name: str
    error: str | None = None  # the host did not answer: why
    memory_mib: int = 0
    cpus: int = 0
    committed_mib: int = 0
    guests: list[str] = field(default_factory=list)
    holds_name: bool = False  # a domain of the new guest's name is defined here
    # The domains whose memory committed_mib counts (running or autostart).
    counted: set[str] = field(default_factory=set)
    missing: list[str] = field(default_factory=list)  # base domain, pool, networks it lacks
    # The guest's size as this host's base domain gives it (profiles may leave it out).
    need_memory_mib: int | None = None
    need_cpus: int | None = None

    @property
    def free_mib(self) -> int:
        return self.memory_mib - self.committed_mib

    def refusal(self) -> str | None:
        """Why this host cannot take the guest, or None."""
        if self.error is not None:
            return f"did not answer: {self.error}"
        if self.missing:
            return "has no " + ", no ".join(self.missing)
        if self.need_memory_mib is not None and self.need_memory_mib > self.free_mib:
            need = self.need_memory_mib
            return f"{self.free_mib} MiB uncommitted memory, the guest needs {need} MiB"
        if self.need_cpus is not None and self.need_cpus > self.cpus:
            return f"{self.cpus} CPUs, the guest needs {self.need_cpus} vCPUs"
        return None


def rank(room: Room) -> tuple:
    """Most uncommitted memory first; then fewer salt-kvm guests; then by name."""
    return (-room.free_mib, len(room.guests), room.name)


def choose(rooms: list[Room], location: str, name: str = "the guest") -> Room:
    """The room for ``location`` (a host name, or ``auto``), or an error that
    names every host considered and why it was not taken.

    A guest name is unique across the hosts: where a domain of that name is
    already defined (a salt-kvm guest a create is resumed on, as on one host,
    or what a killed create left), the create goes there, and a ``location``
    naming another host is refused."""
    holders = sorted(r.name for r in rooms if r.holds_name)
    if len(holders) > 1:
        raise SaltKvmError(
            f"{name} is defined on several hosts ({', '.join(holders)}): remove all but one"
        )
    if holders:
        if location not in (AUTO, holders[0]):
            raise SaltKvmError(
                f"location {location}: {name} already exists on host {holders[0]} "
                "(guest names are unique across the provider's hosts)"
            )
        return next(r for r in rooms if r.name == holders[0])
    candidates = rooms if location == AUTO else [r for r in rooms if r.name == location]
    fitting = sorted((r for r in candidates if r.refusal() is None), key=rank)
    if fitting:
        return fitting[0]
    why = "; ".join(f"{r.name} {r.refusal()}" for r in sorted(candidates, key=lambda r: r.name))
    if location == AUTO:
        raise SaltKvmError(f"location auto: no host can take the guest ({why})")
    raise SaltKvmError(f"location {location}: {why}")
