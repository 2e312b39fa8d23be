"""What each host of a several-host provider offers, and placements that
parallel creates cannot both take.

``salt-cloud -P -m`` creates in parallel processes on the master. Each create
takes the master's placement lock, reads every host's room, counts the
placements of the other creates still running (their guest may not be defined
or started yet, so libvirt does not count it), picks a host and writes its own
placement down, then lets the lock go: two creates never both see the last
room of a host. A placement is removed when its create ends; one whose process
is gone (a killed create) no longer counts, and tells where that create was
going (its guest, if any, is on that host).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt

from salt_kvm.cloud import locations
from salt_kvm.cloud.inventory import managed_min
from salt_kvm.cloud.locations import Room
from salt_kvm.cloud.spec import VMSpec
from salt_kvm.errors import SaltKvmError
from salt_kvm.virt import locks
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.host import network_active

log = logging.getLogger(__name__)
SUBDIR = "salt-kvm/placing"
ROLE = "placement directory"


def _committed(conn: libvirt.virConnect) -> tuple[int, set[str]]:
    """MiB of the running and autostart guests, and their names."""
    counted: dict[str, int] = {}
    for flag in (
        libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE,
        libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART,
    ):
        for dom in conn.listAllDomains(flag):
            with contextlib.suppress(libvirt.libvirtError):  # gone since the listing
                counted[dom.name()] = dom.maxMemory() // 1024
    return sum(counted.values()), set(counted)


def _base_needs(conn: libvirt.virConnect, spec: VMSpec, room: Room) -> list[str]:
    """The networks the guest will use (its NICs, else its base domain's);
    fills the size the base gives when the profile leaves it out."""
    networks = [nic.network for nic in spec.nics or [] if nic.network]
    if spec.base_domain:
        try:
            base = Domain(
                conn.lookupByName(spec.base_domain).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            )
        except libvirt.libvirtError:
            room.missing.append(f"base domain {spec.base_domain}")
            return networks
        room.need_memory_mib = spec.memory_mib or base.memory_mib()
        room.need_cpus = spec.cpus or base.vcpus
        if spec.nics is None:
            networks = [i.source_network for i in base.interfaces if i.source_network]
    elif spec.image is not None:
        room.need_memory_mib, room.need_cpus = spec.memory_mib or 1024, spec.cpus or 1
        try:
            conn.storagePoolLookupByName(spec.image.pool)
        except libvirt.libvirtError:
            room.missing.append(f"pool {spec.image.pool}")
    return networks


def room(conn: libvirt.virConnect, name: str, spec: VMSpec | None = None) -> Room:
    """Host ``name``'s memory, CPUs, committed memory and salt-kvm guests; with
    ``spec``, also what the guest needs there and what the host lacks for it."""
    info = conn.getInfo()
    committed, counted = _committed(conn)
    found = Room(name=name, memory_mib=int(info[1]), cpus=int(info[2]), committed_mib=committed)
    found.counted = counted
    found.guests = sorted(managed_min(conn))
    if spec is not None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(spec.name)
            found.holds_name = True
        for network in dict.fromkeys(_base_needs(conn, spec, found)):
            if not network_active(conn, network):
                found.missing.append(f"network {network}")
    return found


def rooms(
    hosts: dict[str, str], connect: Callable[[str], libvirt.virConnect], spec: VMSpec | None = None
) -> list[Room]:
    """Every host's room; a host that does not answer is a Room with its error."""
    found = []
    for name, uri in hosts.items():
        try:
            conn = connect(uri)
        except SaltKvmError as exc:
            log.warning("host %s did not answer: %s", name, exc)
            found.append(Room(name=name, error=str(exc)))
            continue
        try:
            found.append(room(conn, name, spec))
        except libvirt.libvirtError as exc:
            found.append(Room(name=name, error=str(exc)))
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
    return found


# ---- placements of creates still running ----------------------------------------


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class Placements:
    """The master's record of where running creates put their guests."""

    def __init__(self, cachedir: str | os.PathLike) -> None:
        self.top = Path(cachedir) / "salt-kvm"
        self.dir = Path(cachedir) / SUBDIR

    def _made(self) -> Path:
        for folder in (self.top, self.dir):
            locks.secure_dir(folder, ROLE, "place a guest")
        return self.dir

    @contextlib.contextmanager
    def locked(self) -> Iterator[Placements]:
        """Held from reading the hosts' room to writing the placement down."""
        fd = os.open(self._made() / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self
        finally:
            os.close(fd)

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def _records(self) -> Iterator[dict]:
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                if isinstance(record, dict):
                    yield record

    @staticmethod
    def _alive(record: dict) -> bool:
        pid = record.get("pid")
        return isinstance(pid, int) and _start_time(pid) == record.get("start") is not None

    def running(self) -> list[dict]:
        """The placements of creates whose process still runs."""
        return [r for r in self._records() if self._alive(r)]

    def killed(self, name: str) -> str | None:
        """The host a killed create of ``name`` had been placed on."""
        for record in self._records():
            if record.get("name") == name and not self._alive(record):
                return record.get("host")
        return None

    def add(self, name: str, host: str, memory_mib: int | None) -> None:
        pid = os.getpid()
        record = {"name": name, "host": host, "memory_mib": memory_mib or 0, "pid": pid}
        record["start"] = _start_time(pid)
        tmp = self._made() / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        os.replace(tmp, self._path(name))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def release(self, name: str) -> None:
        """Remove this process's placement of ``name`` (its create ended)."""
        for record in self._records():
            if record.get("name") == name and record.get("pid") == os.getpid():
                self.remove(name)


def count_running(found: list[Room], running: list[dict], exclude: str) -> None:
    """Add the memory of other creates placed on each host whose guests libvirt
    does not count yet (not running, not autostart)."""
    by_name = {r.name: r for r in found}
    for record in running:
        host = by_name.get(str(record.get("host")))
        if host is None or record.get("name") == exclude or record.get("name") in host.counted:
            continue
        host.committed_mib += int(record.get("memory_mib") or 0)


def place(
    placements: Placements,
    hosts: dict[str, str],
    connect: Callable[[str], libvirt.virConnect],
    spec: VMSpec,
    location: str,
) -> Room:
    """Choose the host for ``spec`` and write the placement down, under the
    lock. Every host is asked, whatever ``location``: a name is unique across them."""
    with placements.locked():
        found = rooms(hosts, connect, spec)
        count_running(found, placements.running(), spec.name)
        chosen = locations.choose(found, location, spec.name)
        placements.add(spec.name, chosen.name, chosen.need_memory_mib)
        return chosen
