"""Snapshots of a guest: external disk-only (the default) or internal.

An external snapshot freezes the current images and sends new writes to an
overlay per disk (``<disk stem>.<snapshot>.qcow2`` next to the image);
deleting it merges the overlay back (libvirt's block commit, into the image
the overlay was made on and never further down, so a linked clone's base is
never written). libvirt 9.0 cannot revert to an external snapshot, so salt-kvm
does it: the guest is powered off, the overlay emptied (re-created on the same
backing image), and the guest started again if it ran. Only the newest
snapshot of a chain can be reverted that way; older ones are refused, naming
the snapshots to delete first, because emptying an overlay others depend on
would lose their data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator

import libvirt

from salt_kvm.backup import core as backup_core
from salt_kvm.backup import store as backup_store
from salt_kvm.backup.core import check_quiesce
from salt_kvm.errors import ConflictError, NotFoundError, SaltKvmError, SpecError
from salt_kvm.virt import chains, qemuimg
from salt_kvm.virt.domain import Disk, Domain
from salt_kvm.virt.lifecycle import lookup
from salt_kvm.virt.snapshots import DomainSnapshot

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, 64 at most"
KIND_EXTERNAL = "external"
KIND_INTERNAL = "internal"
# The overlays of method=snapshot backups are named like a snapshot with this prefix.
BACKUP_PREFIX = "saltkvm-backup-"


@contextlib.contextmanager
def locked(dom: libvirt.virDomain, doing: str) -> Iterator[None]:
    """The per-domain lock backup runs hold: a snapshot taken (or merged, or
    reverted) while a ``method=snapshot`` run copies would put a new overlay on
    the run's overlay, which the run's merge-back would then pull away."""
    uuid, name = dom.UUIDString(), dom.name()
    with backup_store.domain_locked(uuid, name, None, what=f"{doing} of {name}"):
        yield


def check_name(value: object, key: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise SpecError(key, f"{value!r} is not a snapshot name", NAME_RULE)
    if value.startswith(BACKUP_PREFIX):
        raise SpecError(
            key, f"{value!r} is reserved for backups", f"{NAME_RULE}, not {BACKUP_PREFIX}*"
        )
    return value


def _snapshottable(dom: libvirt.virDomain) -> tuple[list[Disk], list[Disk]]:
    """(file-backed disks that get an overlay, every other disk)."""
    take: list[Disk] = []
    skip: list[Disk] = []
    for disk in Domain(dom.XMLDesc(0)).disks:
        flags = {child.tag for child in disk.node}
        ok = disk.device == Disk.DEVICE_DISK and disk.path and not {"readonly", "shareable"} & flags
        (take if ok else skip).append(disk)
    return take, skip


def overlay_path(disk_path: str, snapshot: str) -> str:
    folder, base = os.path.split(disk_path)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return os.path.join(folder, f"{stem}.{snapshot}.qcow2")


def external_xml(
    name: str, description: str | None, overlays: dict[str, str], skipped: list[str]
) -> str:
    """A disk-only snapshot: an overlay per target of ``overlays``, none for ``skipped``."""
    snap = DomainSnapshot.new(name, description)
    snap.memory_snapshot = "no"
    snap.node.append(snap.node.makeelement("disks"))  # there even when empty, as before
    for target, overlay in overlays.items():
        snap.add_overlay(target, overlay)
    for target in skipped:
        snap.skip_disk(target)
    return snap.to_xml()


def _overlay(disk: Disk, snapshot: str) -> str:
    """The overlay of a disk ``_snapshottable`` takes (a file-backed one)."""
    assert disk.path, f"{disk.target_dev} has no file"
    return overlay_path(disk.path, snapshot)


def _external_xml(name: str, description: str | None, take: list[Disk], skip: list[Disk]) -> str:
    overlays = {d.target_dev: _overlay(d, name) for d in take}
    return external_xml(name, description, overlays, [d.target_dev for d in skip if d.target_dev])


def _offline_checkpoints(dom: libvirt.virDomain) -> list[str]:
    """libvirt 9.0 refuses block operations on a shut-off domain with checkpoints.

    salt-kvm's own backup checkpoints are dropped (the next backup is then a
    full one, reported in the result); anyone else's are not ours to drop.
    """
    if dom.isActive():
        return []
    return _drop_our_checkpoints(
        dom,
        lambda foreign: (
            f"{dom.name()} is shut off and has checkpoints ({foreign}) that libvirt "
            "does not allow block operations with; start it, or delete them first"
        ),
    )


def _drop_our_checkpoints(dom: libvirt.virDomain, refusal: Callable[[str], str]) -> list[str]:
    """Delete salt-kvm's checkpoints of ``dom``; refuse (``refusal`` names why)
    when anyone else's exist, which are not ours to drop."""
    ours = backup_core.our_checkpoints(dom)
    foreign = sorted({c.getName() for c in dom.listAllCheckpoints(0)} - set(ours))
    if foreign:
        raise ConflictError(refusal(", ".join(foreign)))
    for name in ours:
        backup_core.delete_checkpoint(dom, name)
    return ours


def _internal_xml(name: str, description: str | None) -> str:
    return DomainSnapshot.new(name, description).to_xml()


def create(
    conn: libvirt.virConnect,
    domain: str,
    name: str | None = None,
    disk_only: bool = True,
    quiesce: str | bool = "auto",
    description: str | None = None,
) -> dict:
    """Take a snapshot; the result says whether the guest's filesystems were quiesced."""
    quiesce = check_quiesce(quiesce)
    name = check_name(name or time.strftime("snap-%Y%m%dT%H%M%SZ", time.gmtime()))
    dom = lookup(conn, domain)
    with locked(dom, f"snapshot {name}"):
        return _create(dom, domain, name, disk_only, quiesce, description)


def _create(dom, domain, name, disk_only, quiesce, description) -> dict:
    with contextlib.suppress(libvirt.libvirtError):
        dom.snapshotLookupByName(name, 0)
        raise ConflictError(f"name: {domain} already has a snapshot named {name!r}")
    if not disk_only:
        flags = 0
        xml = _internal_xml(name, description)
        quiesced = False
    else:
        take, skip = _snapshottable(dom)
        if not take:
            raise SaltKvmError(f"{domain} has no file-backed disk to snapshot")
        for disk in take:
            if os.path.exists(_overlay(disk, name)):
                raise ConflictError(f"{_overlay(disk, name)} already exists")
        xml = _external_xml(name, description, take, skip)
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        quiesced = bool(dom.isActive()) and quiesce is not False
    dropped = _offline_checkpoints(dom) if disk_only else []
    try:
        snap, quiesced = create_quiesced(dom, xml, flags, quiesced, quiesce)
    except libvirt.libvirtError as exc:
        raise SaltKvmError(f"snapshot {name} of {domain}: {exc}") from exc
    return {**describe(snap), "quiesced": quiesced, "checkpoints_dropped": dropped}


def create_quiesced(dom, xml: str, flags: int, try_quiesce: bool, quiesce) -> tuple:
    """Create with the agent's freeze when asked and possible; return (snapshot, quiesced)."""
    if try_quiesce:
        try:
            quiet = flags | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
            return dom.snapshotCreateXML(xml, quiet), True
        except libvirt.libvirtError as exc:
            if quiesce is True:
                raise
            log.info("%s: snapshot without quiesce (%s)", dom.name(), exc)
    return dom.snapshotCreateXML(xml, flags), False


def describe(snap: libvirt.virDomainSnapshot) -> dict:
    xml = DomainSnapshot(snap.getXMLDesc(0))
    created = xml.creation_time or 0
    return {
        "name": snap.getName(),
        "kind": KIND_EXTERNAL if xml.external else KIND_INTERNAL,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "state": xml.state,
        "parent": xml.parent,
        "current": bool(snap.isCurrent(0)),
        "description": xml.description,
        "overlays": xml.overlays(),
    }


def list_snapshots(conn: libvirt.virConnect, domain: str) -> list[dict]:
    dom = lookup(conn, domain)
    found = [describe(s) for s in dom.listAllSnapshots(0)]
    return sorted(found, key=lambda s: (s["created"], s["name"]))


def _get(dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot:
    try:
        return dom.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as exc:
        names = ", ".join(s.getName() for s in dom.listAllSnapshots(0)) or "none"
        raise NotFoundError(
            f"name: {dom.name()} has no snapshot {name!r} (it has: {names})"
        ) from exc


def revert(conn: libvirt.virConnect, domain: str, name: str, force: bool = False) -> dict:
    """Return the guest's disks (and memory, for internal ones) to the snapshot."""
    dom = lookup(conn, domain)
    with locked(dom, f"revert to snapshot {name}"):
        return _revert(dom, domain, name, force)


def _revert(dom, domain: str, name: str, force: bool) -> dict:
    snap = _get(dom, check_name(name))
    info = describe(snap)
    if info["kind"] == KIND_INTERNAL:
        if dom.isActive() and not force:
            raise SpecError(
                "force",
                f"{domain} is running: reverting it to {name} throws away its memory and every "
                "disk write since the snapshot",
                "force=True to revert the running guest, or shut it off first",
            )
        # QEMU loads no internal snapshot while a disk has dirty bitmaps ("Device has
        # active dirty bitmaps", and the guest would be gone), and the disks go back in
        # time anyway: salt-kvm's checkpoints are dropped (the next backup is full).
        dropped = _drop_checkpoints_for_revert(dom)
        try:
            dom.revertToSnapshot(snap, 0)
        except libvirt.libvirtError as exc:
            raise SaltKvmError(f"revert of {domain} to {name}: {exc}") from exc
        return {
            "name": name,
            "kind": KIND_INTERNAL,
            "reverted": True,
            "checkpoints_dropped": dropped,
        }
    return _revert_external(dom, snap, info, force)


def _drop_checkpoints_for_revert(dom: libvirt.virDomain) -> list[str]:
    return _drop_our_checkpoints(
        dom,
        lambda foreign: (
            f"{dom.name()} has checkpoints ({foreign}) whose dirty bitmaps keep "
            "QEMU from loading an internal snapshot; delete them first"
        ),
    )


def _check_overlays(dom: libvirt.virDomain, info: dict, what: str) -> None:
    """Merging an overlay away (delete) or emptying it (revert) is refused while
    anything but this domain's own disks and snapshot chain stands on it (a
    quick clone made from the guest, a volume made on the overlay by hand)."""
    name = dom.name()
    chains.check_deletable(
        dom.connect(),
        sorted(info["overlays"].values()),
        what,
        disks=tuple((name, target) for target in info["overlays"]),
        chains_of=(name,),
    )


def _revert_external(dom, snap, info: dict, force: bool) -> dict:
    current = {d.target_dev: d.path for d in Domain(dom.XMLDesc(0)).disks}
    stale = [t for t, overlay in info["overlays"].items() if current.get(t) != overlay]
    if stale:
        children = [s.getName() for s in snap.listAllChildren(0)]
        raise ConflictError(
            f"{info['name']} is not the newest snapshot of {dom.name()} "
            f"({', '.join(stale)} moved on); delete {', '.join(children) or 'the newer ones'} "
            "first, or revert to the newest"
        )
    _check_overlays(dom, info, f"revert of {dom.name()} to {info['name']}")
    was_running = bool(dom.isActive())
    if was_running and not force:
        raise ConflictError(
            f"{dom.name()} is running; reverting a disk-only snapshot loses its memory state: "
            "shut it off, or pass force=True to power it off (and start it again)"
        )
    plans = []
    for overlay in info["overlays"].values():
        data = qemuimg.info(overlay, fmt="qcow2")  # an overlay salt-kvm made
        backing = data.get("full-backing-filename") or data.get("backing-filename")
        if not backing:
            raise SaltKvmError(f"{overlay} has no backing image; cannot revert")
        plans.append((overlay, backing, data.get("backing-filename-format", "qcow2")))
    # The overlays carry the checkpoints' dirty bitmaps: emptying them would let an
    # incremental backup miss writes. Drop salt-kvm's checkpoints (while the guest
    # runs, libvirt removes their bitmaps too): the next backup is full.
    dropped = backup_core.our_checkpoints(dom)
    for checkpoint in dropped:
        backup_core.delete_checkpoint(dom, checkpoint)
    if was_running:
        dom.destroy()
    for overlay, backing, fmt in plans:
        fresh = f"{overlay}.revert"
        qemuimg.create_overlay(fresh, backing, fmt)
        os.chmod(fresh, 0o600)
        os.replace(fresh, overlay)
    if was_running:
        dom.create()
    return {
        "name": info["name"],
        "kind": KIND_EXTERNAL,
        "reverted": True,
        "restarted": was_running,
        "checkpoints_dropped": dropped,
    }


def delete(conn: libvirt.virConnect, domain: str, name: str) -> dict:
    """Delete a snapshot; an external one's overlays are merged back first (block commit)."""
    dom = lookup(conn, domain)
    with locked(dom, f"delete of snapshot {name}"):
        return _delete(dom, domain, name)


def _delete(dom, domain: str, name: str) -> dict:
    snap = _get(dom, check_name(name))
    info = describe(snap)
    _check_overlays(dom, info, f"delete of snapshot {name} of {domain}")
    dropped = _offline_checkpoints(dom) if info["kind"] == KIND_EXTERNAL else []
    try:
        snap.delete(0)
    except libvirt.libvirtError as exc:
        raise SaltKvmError(f"deleting snapshot {name} of {domain}: {exc}") from exc
    return {
        "name": name,
        "kind": info["kind"],
        "deleted": True,
        "merged": info["overlays"],
        "checkpoints_dropped": dropped,
    }
