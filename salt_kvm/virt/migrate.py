"""Moving a domain to another hypervisor: the request's options, libvirt's
flags and migration URI, what makes a domain unmovable, the definition the
target gets, and the migration call itself.

The migration is client-managed (``virDomainMigrate3`` with a connection to
the target): this process speaks to both libvirtds, the QEMU stream goes
straight from the source QEMU to the target's over TCP (``tcp://ADDRESS:PORT``,
unencrypted: a network between the hypervisors only), and the disks are copied
by QEMU (NBD) into volumes made on the target beforehand. The orchestration
(checks against the target, volumes, reservations, clean-up) is
:mod:`salt_kvm.cloud.migration`.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import libvirt

from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt import firmware, virtiofs
from salt_kvm.virt.checks import boolean, shown, whole_number
from salt_kvm.virt.domain import DISKS_NS, Disk, Domain, has_hostdevs

OPTIONS = ("copy_base", "address", "port")
ACCEPTED_OPTIONS = ", ".join(OPTIONS)
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\Z")
LOOPBACK = "127.0.0.1"
# The QEMU stream and the disks' NBD server use two ports: PORT and PORT + 1.
PORT_LOW, PORT_HIGH = 1024, 65534

# Always: the definition goes with the guest, and leaves the source only
# when the guest runs on the target (libvirt undefines the source last).
BASE_FLAGS = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE


@dataclass(frozen=True)
class Request:
    """The caller's migration options, checked."""

    copy_base: bool = False
    address: str | None = None
    port: int | None = None


def parse_request(values: dict[str, Any], ignore: tuple[str, ...] = ()) -> Request:
    """``copy_base``, ``address``, ``port``; any other key is refused by name."""
    unknown = sorted(str(k) for k in values if k not in OPTIONS and k not in ignore)
    if unknown:
        raise SpecError(unknown[0], "is not a migration option", ACCEPTED_OPTIONS)
    address = values.get("address")
    if address not in (None, ""):
        if not isinstance(address, str) or not _is_address(address):
            raise SpecError(
                "address",
                f"{shown('address', address)} is not an IP address or host name",
                "the target hypervisor's address on the network between the hosts",
            )
    port = values.get("port")
    if port not in (None, ""):
        port = whole_number(port, "port", PORT_LOW, PORT_HIGH)
    return Request(
        copy_base=boolean(values, "copy_base", False),
        address=address or None,
        port=port or None,
    )


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return bool(HOSTNAME_RE.match(value))


def stream_address(target_uri: str, request: Request) -> str:
    """Where the source QEMU sends the stream: ``address``, else the host the
    target's URI names, else loopback (a target on this machine)."""
    if request.address:
        return request.address
    host = urllib.parse.urlparse(target_uri).hostname
    return host if host not in (None, "", "localhost") else LOOPBACK


def migration_uri(address: str, port: int | None) -> str:
    """``tcp://ADDRESS[:PORT]``; without a port the target's libvirtd picks one
    of its ``migration_port_min``..``max`` (qemu.conf, 49152-49215)."""
    host = f"[{address}]" if ":" in address else address
    return f"tcp://{host}" + (f":{port}" if port else "")


def flags(live: bool, incremental: bool) -> int:
    """A running guest moves live; a shut-off one is started paused and moved
    paused (it never runs a CPU cycle). ``incremental``: only the guest's
    overlays cross, their base is already on the target (a quick clone)."""
    disks = (
        libvirt.VIR_MIGRATE_NON_SHARED_INC if incremental else libvirt.VIR_MIGRATE_NON_SHARED_DISK
    )
    mode = libvirt.VIR_MIGRATE_LIVE if live else libvirt.VIR_MIGRATE_PAUSED
    return BASE_FLAGS | disks | mode


def params(
    dest_xml: str,
    persist_xml: str,
    uri: str,
    listen: str,
    disks: list[str],
    port: int | None,
) -> dict[str, Any]:
    """``virDomainMigrate3``'s parameters. The XML holds secrets (a graphics
    password): these go to libvirt only, never to a log."""
    found: dict[str, Any] = {
        libvirt.VIR_MIGRATE_PARAM_URI: uri,
        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: listen,
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: persist_xml,
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: disks,
    }
    if port:
        found[libvirt.VIR_MIGRATE_PARAM_DISKS_PORT] = port + 1
    return found


def refusals(dom: libvirt.virDomain, xml: Domain) -> list[str]:
    """What makes the domain unmovable, each named (empty: movable)."""
    why = []
    snapshots = dom.snapshotListNames(0)
    if snapshots:
        why.append(f"it has snapshots ({', '.join(sorted(snapshots))}): delete them first")
    checkpoints = [c.getName() for c in dom.listAllCheckpoints(0)]
    if checkpoints:
        why.append(
            f"it has backup checkpoints ({', '.join(sorted(checkpoints))}): "
            "a full backup starts a new chain on the target"
        )
    if has_hostdevs(xml):
        why.append("it has host devices (hostdevs): they belong to the source host")
    shares = virtiofs.filesystems(xml)
    if shares:
        tags = ", ".join(sorted(fs.tag or "?" for fs in shares))
        why.append(f"it has virtiofs shares ({tags}): a folder of the source host")
    if firmware.has_tpm(xml):
        why.append(
            "it has a TPM: its state (swtpm's files, outside any storage pool) "
            "is not moved, and a TPM whose state forks breaks what it sealed"
        )
    for disk in xml.disks:
        label = disk.target_dev or "?"
        if disk.device not in (Disk.DEVICE_DISK, Disk.DEVICE_CDROM):
            why.append(f"disk {label} is a {disk.device}")
        elif disk.device == Disk.DEVICE_CDROM or disk.readonly:
            if disk.path:
                why.append(f"disk {label} is a read-only medium ({disk.path}): eject it first")
        elif disk.shareable:
            why.append(f"disk {label} is shareable: storage the hosts would have to share")
        elif disk.type != "file" or not disk.path:
            why.append(f"disk {label} is not a file ({disk.type}): only pool volumes move")
    return why


def rewrite(xml: Domain, paths: dict[str, str]) -> Domain:
    """The definition for the target: each moved disk and the UEFI variables
    on their target paths, and salt-kvm's metadata (the volumes it made, the
    NVRAM) naming the target's files."""
    moved = Domain(xml.to_xml())
    for disk in moved.disks:
        if disk.path in paths:
            disk.path = paths[disk.path]
    nvram = firmware.nvram_path(moved)
    if nvram in paths:
        firmware.set_nvram_path(moved, paths[nvram])
    info = moved.managed_info()
    if info is not None:
        volumes = info.get("volumes")
        if isinstance(volumes, list):
            info["volumes"] = [paths.get(v, v) for v in volumes]
        recorded = info.get("nvram")
        if isinstance(recorded, str) and recorded in paths:
            info["nvram"] = paths[recorded]
        moved.set_managed_info(info)
    _rewrite_created_disks(moved, paths)
    return moved


def _rewrite_created_disks(xml: Domain, paths: dict[str, str]) -> None:
    node = xml.node.find(f"metadata/{{{DISKS_NS}}}disks")
    if node is None:
        return
    for vol in node.findall(f"{{{DISKS_NS}}}volume"):
        if vol.text in paths:
            vol.text = paths[vol.text]


def migrate(
    dom: libvirt.virDomain, dconn: libvirt.virConnect, parameters: dict, migrate_flags: int
) -> libvirt.virDomain:
    """Run the migration; libvirt's error is translated: the source keeps the guest."""
    try:
        return dom.migrate3(dconn, parameters, migrate_flags)
    except libvirt.libvirtError as exc:
        message = str(exc)
        hint = ""
        if "CPU" in message or "cpu" in message:
            hint = " (the target's CPU cannot run the guest's CPU model: CPU incompatibility)"
        raise SaltKvmError(f"libvirt's migration failed: {message}{hint}") from exc


CHUNK = 4 * 1024 * 1024


def copy_volume(
    src: libvirt.virStorageVol, dconn: libvirt.virConnect, dst: libvirt.virStorageVol
) -> int:
    """Stream ``src``'s bytes into the (just made) volume ``dst`` on another
    hypervisor through both libvirtds; returns the bytes copied."""
    conn = src.connect()
    down, up = conn.newStream(0), dconn.newStream(0)
    copied = 0
    try:
        src.download(down, 0, 0, 0)
        dst.upload(up, 0, 0, 0)
        while True:
            data = down.recv(CHUNK)
            if data in (None, b"", -2):
                break
            if not isinstance(data, bytes):
                raise SaltKvmError(f"reading {src.path()} through libvirt failed")
            _send(up, data)
            copied += len(data)
        down.finish()
        up.finish()
    except BaseException:
        for stream in (down, up):
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
        raise
    return copied


def _send(stream: libvirt.virStream, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = stream.send(bytes(view))
        if sent < 0:
            raise SaltKvmError("writing to the target volume through libvirt failed")
        view = view[sent:]
