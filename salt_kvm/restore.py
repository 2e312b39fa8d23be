"""Restore a backup point: as a new domain, or over a shut-off domain's disks.

Every image of the point's chain is checked against its recorded checksum
first; then ``qemu-img convert`` flattens the chain (full image plus each
incremental on top) into one standalone qcow2 per disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import libvirt
from lxml import etree

from . import backup_core, chains, names, qemuimg
from . import backup_store as bs
from .clone import define, prepare_identity, used_macs
from .domxml import Disk, Domain
from .errors import ConflictError, NotFoundError, SaltKvmError
from .rollback import Rollback

log = logging.getLogger(__name__)


def _pool_dir(conn: libvirt.virConnect, pool: str) -> tuple[libvirt.virStoragePool, str]:
    try:
        handle = conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError as exc:
        raise NotFoundError(f"pool: no storage pool named {pool!r} on {conn.getURI()}") from exc
    path = etree.fromstring(handle.XMLDesc(0).encode()).findtext("target/path")
    if not path:
        raise SaltKvmError(f"pool: {pool!r} is not a directory pool")
    return handle, path


def checked_chain(store: bs.Store, point_ref: str) -> tuple[bs.Point, list[bs.Point]]:
    point = store.point(point_ref)
    chain = bs.chain_to(store.points(), point.id)
    problems = [p for link in chain for p in bs.verify_point(store, link)]
    if problems:
        raise SaltKvmError(f"backup point {point.id} cannot be restored: {'; '.join(problems)}")
    return point, chain


def restore(
    conn: libvirt.virConnect,
    name: str,
    dest: str,
    point: str = bs.LATEST,
    target: str | None = None,
    force: bool = False,
    pool: str = "default",
    start: bool = False,
) -> dict:
    """Restore ``point`` of ``name``'s backups in ``dest`` (a replica folder works too)."""
    point = bs.check_point_ref(point)
    if target is not None:
        names.check_vm_name(target, "target")
        if target == name and _exists(conn, name):
            target = None  # restoring onto itself is the in-place restore
        # else a takeover: the domain lives on under its own name on this host
    store = bs.Store(dest, name)
    store.point(point)  # no such backup: fail before taking the lock (which writes)
    with store.locked("restore"):
        found, chain = checked_chain(store, point)
        started = time.monotonic()
        if target is None:
            result = _in_place(conn, store, found, force)
        else:
            result = _as_new(conn, store, found, target, pool, start)
    result.update(
        point=found.id,
        kind=found.kind,
        chain=[p.id for p in chain],
        duration=round(time.monotonic() - started, 2),
    )
    return result


def _exists(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError:
        return False


def _as_new(
    conn: libvirt.virConnect, store: bs.Store, point: bs.Point, target: str, pool: str, start: bool
) -> dict:
    with contextlib.suppress(libvirt.libvirtError):
        conn.lookupByName(target)
        raise ConflictError(f"target: a domain named {target!r} already exists")
    pool_handle, pool_dir = _pool_dir(conn, pool)
    xml = Domain((store.path(point) / bs.DOMAIN_XML).read_text())
    prepare_identity(xml, target, xml.type or "kvm", used_macs(conn))
    devices = xml.node.find("devices")
    plan: list[tuple[Disk, bs.DiskImage, str]] = []
    for disk in xml.disks:
        if disk.device != Disk.DEVICE_DISK:
            continue
        image = point.disks.get(disk.target_dev)
        if image is None:  # not in the backup: never share the original's disk
            devices.remove(disk.node)
            continue
        vol = (
            names.root_volume_name(target, "qcow2")
            if not plan
            else names.extra_volume_name(target, disk.target_dev, "qcow2")
        )
        path = os.path.join(pool_dir, vol)
        if os.path.exists(path):
            raise ConflictError(f"volume {vol!r} already exists in pool {pool!r}")
        plan.append((disk, image, path))
    with Rollback() as rollback:
        for disk, image, path in plan:
            rollback.add(f"volume {path}", lambda p=path: _remove(conn, p))
            qemuimg.convert(str(store.path(point) / image.file), path)
            os.chmod(path, 0o600)
            disk.path = path
            disk.driver_type = "qcow2"
        pool_handle.refresh(0)
        volumes = [path for _, _, path in plan]
        xml.set_managed_info(
            {
                "restored_from": point.domain,
                "point": point.id,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "volumes": volumes,
            }
        )
        dom = define(conn, xml, rollback)
        if start:
            dom.create()
        rollback.forget()
    return {"domain": target, "volumes": volumes, "started": bool(start)}


def _remove(conn: libvirt.virConnect, path: str) -> None:
    """Delete a file this restore wrote, unless something came to need it."""
    with contextlib.suppress(FileNotFoundError):
        chains.delete_file(conn, path, "restore cleanup")


def _in_place(conn: libvirt.virConnect, store: bs.Store, point: bs.Point, force: bool) -> dict:
    try:
        dom = conn.lookupByName(point.domain)
    except libvirt.libvirtError as exc:
        raise NotFoundError(
            f"{point.domain} does not exist here; restore it with target=<new name>"
        ) from exc
    if dom.isActive():
        raise ConflictError(f"{point.domain} is running: shut it off before an in-place restore")
    if not force:
        raise ConflictError(
            f"an in-place restore overwrites the disks of {point.domain}; pass force=True"
        )
    if dom.snapshotNum(0):
        raise ConflictError(f"{point.domain} has snapshots; delete them before restoring in place")
    current = {d.target_dev: d.path for d in Domain(dom.XMLDesc(0)).disks}
    missing = [t for t in point.disks if not current.get(t)]
    if missing:
        raise SaltKvmError(f"{point.domain} has no disk {', '.join(missing)} to restore onto")
    # The old images are replaced: a quick clone standing on one would be corrupted.
    chains.check_deletable(
        conn,
        [current[t] for t in sorted(point.disks)],
        f"in-place restore of {point.domain}",
        disks=tuple((point.domain, t) for t in point.disks),
    )
    temps: list[tuple[str, str]] = []
    try:
        for target_dev, image in sorted(point.disks.items()):
            final = current[target_dev]
            tmp = f"{final}.restore-{point.id}"
            temps.append((tmp, final))
            qemuimg.convert(str(store.path(point) / image.file), tmp)
            os.chmod(tmp, 0o600)
    except BaseException:
        for tmp, _ in temps:
            _remove(conn, tmp)
        raise
    for tmp, final in temps:
        os.replace(tmp, final)
    # The images are new: the old checkpoints' bitmaps went with the old files.
    for name in backup_core.our_checkpoints(dom):
        dom.checkpointLookupByName(name, 0).delete(
            libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
        )
    return {"domain": point.domain, "volumes": [final for _, final in temps], "in_place": True}
