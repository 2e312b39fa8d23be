"""What depends on a file: the guard every delete of salt-kvm goes through.

A file may be deleted only when nothing on the host needs it: no volume of any
pool and no disk of any domain (running state and definition) has it in its
backing chain (the whole chain, not only the first level), and no other domain
uses it. Files are compared by device and inode where they are this host's
(else by resolved path): a second name (symlink, ``..``, bind mount, hard
link, a backing file named relative to its overlay as QEMU opens it, a
``json:`` or ``file:`` name) does not hide a dependent. A qcow2 image's
external data file counts like its backing file. Nothing here changes anything.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import libvirt

from salt_kvm.errors import ConflictError
from salt_kvm.virt import connection, pools
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.firmware import nvram_path
from salt_kvm.virt.rollback import Rollback
from salt_kvm.virt.volumes import Volume

QCOW2_MAGIC = b"QFI\xfb"
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
MAX_DEPTH = 64
HEADER_MAX = 64 * 1024


@dataclass(frozen=True)
class Dependent:
    """Something that needs a file: a pool volume (``domain`` None) or a domain's disk."""

    top: str  # the volume's or the disk's own file
    domain: str | None = None
    target: str | None = None
    backing: bool = True  # the file is below ``top`` (False: ``top`` is the file itself)

    def __str__(self) -> str:
        if self.domain is None:
            return f"volume {self.top}"
        how = "backing chain of its disk" if self.backing else "its disk"
        return f"domain {self.domain!r} ({how} {self.target}: {self.top})"


def _norm(path: str, local: bool) -> str:
    return os.path.realpath(path) if local else os.path.normpath(path)


def _key(path: str, local: bool) -> str:
    """One key per file: locally its device and inode when it exists (a second
    name through a bind mount or a hard link is the same file), else the
    resolved path."""
    if local:
        try:
            info = os.stat(path)
            return f"inode:{info.st_dev}:{info.st_ino}"
        except OSError:
            pass
    return _norm(path, local)


def _qcow2_links(path: str) -> list[tuple[str, str | None]]:
    """(file name as written, its format or None) of every file a qcow2 image
    needs: its backing file and its external data file."""
    try:
        with open(path, "rb", buffering=0) as handle:
            head = handle.read(HEADER_MAX)
    except OSError:
        return []
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        return []
    links: list[tuple[str, str | None]] = []
    version = struct.unpack(">I", head[4:8])[0]
    offset, size = struct.unpack(">QI", head[8:20])
    backing = None
    if offset and size and offset + size <= len(head) and size <= 1023:
        backing = head[offset : offset + size].decode(errors="replace")
    fmt = None
    header_len = 72 if version < 3 or len(head) < 104 else struct.unpack(">I", head[100:104])[0]
    pos, end = header_len, offset if backing is not None else len(head)
    while version >= 2 and pos + 8 <= min(end, len(head)):
        kind, length = struct.unpack(">II", head[pos : pos + 8])
        if kind == 0:
            break
        value = head[pos + 8 : pos + 8 + length].decode(errors="replace")
        if kind == EXT_BACKING_FORMAT:
            fmt = value
        elif kind == EXT_DATA_FILE and value:
            links.append((value, "raw"))
        pos += 8 + (length + 7) // 8 * 8
    if backing is not None:
        links.append((backing, fmt))
    return links


def _json_filenames(value) -> list[str]:
    """Every ``filename`` in a ``json:{...}`` file name (QEMU's block options)."""
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            if key.split(".")[-1] == "filename" and isinstance(item, str):
                found.append(item)
            else:
                found += _json_filenames(item)
        return found
    if isinstance(value, list):
        return [f for item in value for f in _json_filenames(item)]
    return []


def _joined(overlay: str, name: str, local: bool) -> set[str]:
    """Where QEMU finds backing file ``name`` of ``overlay``: a relative name is
    relative to the overlay's directory (as named, and as resolved: both count)."""
    if name.startswith("json:"):
        try:
            names = _json_filenames(json.loads(name[5:]))
        except ValueError:
            return set()
        return {p for each in names for p in _joined(overlay, each, local)}
    if "://" in name:
        return set()  # a network URL: no file of this host
    if name.startswith("file:"):
        name = name[5:]
    if os.path.isabs(name):
        return {_norm(name, local)}
    found = {_norm(os.path.join(os.path.dirname(overlay), name), local)}
    if local:
        found.add(_norm(os.path.join(os.path.dirname(os.path.realpath(overlay)), name), local))
    return found


def _volume_backing(conn: libvirt.virConnect, path: str) -> tuple[str, str | None] | None:
    try:
        vol = Volume(conn.storageVolLookupByPath(path).XMLDesc(0))
    except libvirt.libvirtError:
        return None
    if not vol.backing_path:
        return None
    return vol.backing_path, vol.backing_format


def chain_below(conn: libvirt.virConnect, path: str, fmt: str | None, local: bool) -> set[str]:
    """Every file below ``path`` in its backing chain (resolved paths).

    A file declared ``raw`` has no chain (a qcow2 header a guest wrote inside a
    raw disk is its data). Locally the qcow2 headers are read; libvirt's
    volume description is used too (and alone on a remote hypervisor).
    """
    found: set[str] = set()
    todo = [(path, fmt, 0)]
    seen = set()
    while todo:
        current, current_fmt, depth = todo.pop()
        if current in seen or depth > MAX_DEPTH or current_fmt == "raw":
            continue
        seen.add(current)
        links: list[tuple[str, str | None] | None] = list(_qcow2_links(current)) if local else []
        links.append(_volume_backing(conn, current))
        for link in links:
            if link is None:
                continue
            name, below_fmt = link
            for below in _joined(current, name, local):
                found.add(below)
                todo.append((below, below_fmt, depth + 1))
    found.discard(_norm(path, local))
    return found


class Dependents(dict):
    """File (``_key``) -> everything on the host that needs that file."""

    def __init__(
        self,
        found: dict[str, list[Dependent]],
        local: bool,
        files_of: dict[str, set[str]] | None = None,
    ):
        super().__init__(found)
        self.local = local
        self.files_of = files_of or {}  # domain -> every file of its disks' chains

    def of(self, path: str) -> list[Dependent]:
        return self.get(_key(path, self.local), [])

    def blocking(
        self,
        paths: list[str] | tuple[str, ...] | set[str],
        domains: tuple[str, ...] = (),
        disks: tuple[tuple[str, str], ...] = (),
        chains_of: tuple[str, ...] = (),
    ) -> dict[str, list[Dependent]]:
        """Of ``paths`` (all deleted together), those something else still needs:
        dependents among ``paths`` themselves, uses by ``domains`` and by the
        (domain, target) ``disks`` (the ones going away with them) do not count,
        nor volumes that are files of the chains of ``chains_of`` (a domain's
        own snapshot overlays, which libvirt rebases when it merges one)."""
        doomed = {_key(p, self.local) for p in paths}
        own = set().union(*(self.files_of.get(name, set()) for name in chains_of))
        blocked = {}
        for path in paths:
            needs = [
                d
                for d in self.of(path)
                if not (d.domain is None and _key(d.top, self.local) in doomed | own)
                and d.domain not in domains
                and (d.domain, d.target) not in disks
            ]
            if needs:
                blocked[path] = needs
        return blocked

    def deletable(
        self, paths: list[str], domains: tuple[str, ...] = ()
    ) -> tuple[list[str], dict[str, list[Dependent]]]:
        """(those of ``paths`` that may go together, those kept and why): a file
        kept keeps the files below it too."""
        doomed, kept = list(paths), dict[str, list[Dependent]]()
        while True:
            blocked = self.blocking(doomed, domains)
            if not blocked:
                return doomed, kept
            kept.update(blocked)
            doomed = [p for p in doomed if p not in blocked]


def _add(found: dict, path: str, dependent: Dependent) -> None:
    found.setdefault(path, [])
    if dependent not in found[path]:
        found[path].append(dependent)


def _disk_path(conn: libvirt.virConnect, disk) -> str | None:
    if disk.path:
        return disk.path
    if disk.source_pool and disk.source_volume:
        try:
            pool = conn.storagePoolLookupByName(disk.source_pool)
            return pool.storageVolLookupByName(disk.source_volume).path()
        except libvirt.libvirtError:
            return None
    return None


def _domain_xmls(dom: libvirt.virDomain) -> list[Domain]:
    xmls = []
    if dom.isActive():
        xmls.append(Domain(dom.XMLDesc(0)))
    if dom.isPersistent():
        xmls.append(Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
    return xmls


def dependents(conn: libvirt.virConnect) -> Dependents:
    """Everything on the host that needs a file: pool volumes (their whole
    backing chains) and every domain's disks (running state and definition:
    the file itself and its whole chain)."""
    local = connection.remote_host(conn) is None
    found: dict[str, list[Dependent]] = {}
    files_of: dict[str, set[str]] = {}
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        try:
            pools.refresh(pool)  # files copied in since libvirt last looked
        except (libvirt.libvirtError, ConflictError):
            pass
        try:
            volumes = pool.listAllVolumes(0)
        except libvirt.libvirtError:
            continue
        for vol in volumes:
            try:
                top = vol.path()
                fmt = Volume(vol.XMLDesc(0)).format
            except libvirt.libvirtError:
                continue  # deleted since the listing
            for below in chain_below(conn, top, fmt, local):
                _add(found, _key(below, local), Dependent(top))
    for dom in conn.listAllDomains(0):
        try:
            name, xmls = dom.name(), _domain_xmls(dom)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # undefined since the listing
            raise
        for xml in xmls:
            for disk in xml.disks:
                top = _disk_path(conn, disk)
                if not top:
                    continue
                _add(found, _key(top, local), Dependent(top, name, disk.target_dev, False))
                chain = set(chain_below(conn, top, disk.driver_type, local))
                chain |= {_norm(p, local) for p in disk.backing_paths()}
                keys = {_key(p, local) for p in chain}
                for key in keys:
                    _add(found, key, Dependent(top, name, disk.target_dev))
                files_of.setdefault(name, set()).update({_key(top, local), *keys})
            nvram = nvram_path(xml)
            if nvram:  # a UEFI variables file: the domain writes it
                _add(found, _key(nvram, local), Dependent(nvram, name, "nvram", False))
    return Dependents(found, local, files_of)


def describe(blocked: dict[str, list[Dependent]]) -> str:
    parts = []
    for path, needs in blocked.items():
        names = "; ".join(str(d) for d in needs[:5])
        more = f" and {len(needs) - 5} more" if len(needs) > 5 else ""
        parts.append(f"{path} is needed by {names}{more}")
    return ". ".join(parts)


def check_deletable(
    conn: libvirt.virConnect,
    paths: list[str] | tuple[str, ...],
    what: str = "delete",
    domains: tuple[str, ...] = (),
    disks: tuple[tuple[str, str], ...] = (),
    chains_of: tuple[str, ...] = (),
) -> None:
    """Refuse (ConflictError naming the dependents) to delete any of ``paths``
    while something outside ``paths``, ``domains`` and ``disks`` still needs it."""
    if not paths:
        return
    blocked = dependents(conn).blocking(paths, domains, disks, chains_of)
    if blocked:
        raise ConflictError(
            f"{what}: refused, nothing was deleted: {describe(blocked)} "
            "(delete or flatten those first)"
        )


def delete_volume(
    conn: libvirt.virConnect,
    path: str,
    what: str = "delete",
    domains: tuple[str, ...] = (),
    missing_ok: bool = True,
) -> bool:
    """Delete the pool volume at ``path`` after the guard; False if already gone."""
    check_deletable(conn, [path], what, domains)
    try:
        vol = conn.storageVolLookupByPath(path)
    except libvirt.libvirtError:
        if missing_ok:
            return False
        raise
    vol.delete(0)
    return True


def delete_file(conn: libvirt.virConnect, path: str, what: str = "delete") -> None:
    """Unlink a local file (an overlay outside any pool) after the guard."""
    check_deletable(conn, [path], what)
    os.unlink(path)


def delete_on_rollback(
    rollback: Rollback, conn: libvirt.virConnect, path: str, label: str = "volume"
) -> None:
    """Record the undo of a volume just created at ``path``: deleted through the guard
    (never while something else needs it), on a live connection."""
    rollback.add(f"{label} {path}", lambda: delete_volume(rollback.live(conn), path, "rollback"))
