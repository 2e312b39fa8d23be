"""Backups of a guest's disks with libvirt's backup API and checkpoints.

The first run of a domain (or of a new chain) is a full backup; later runs copy
only what changed since the previous point, as tracked by a libvirt checkpoint
(a persistent dirty bitmap in each qcow2 image). The guest's filesystems are
frozen through the guest agent around the instant the backup starts, so the
copy is consistent; the copy itself runs while the guest goes on.

A shut-off domain is started paused for the copy (its CPUs never run, so the
disks stay exactly as they were), since the backup API needs a running QEMU;
it is destroyed again afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
from lxml import etree

from . import backup_store as bs
from . import qemuimg
from .domxml import Disk, Domain
from .errors import SaltKvmError, SpecError
from .lifecycle import lookup

log = logging.getLogger(__name__)
Emit = Callable[[str, dict], None]

CHECKPOINT_PREFIX = "saltkvm-"
STARTED_PAUSED = "started-paused"
QUIESCE_VALUES = ("auto", True, False)
CONSISTENCY_FROZEN = "frozen"
CONSISTENCY_CRASH = "crash-consistent"
CONSISTENCY_OFFLINE = "shut-off"
POLL = 0.5
MIN_LIBVIRT = 7_006_000  # the backup API with checkpoints, usable without tech-preview flags
PROGRESS_EVERY = 2.0


def _no_emit(_step: str, _data: dict) -> None:
    return None


@dataclass
class SourceDisk:
    target: str
    path: str
    format: str
    bitmaps: bool  # the image can hold a persistent dirty bitmap (qcow2 v3)


def check_quiesce(value: object) -> str | bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value not in QUIESCE_VALUES:
        raise SpecError("quiesce", f"{value!r} is not a quiesce mode", ("auto", "True", "False"))
    return value


def source_disks(dom: libvirt.virDomain, only: list[str] | None = None) -> list[SourceDisk]:
    """The domain's file-backed disks (not CD-ROMs, read-only or shared ones)."""
    xml = Domain(dom.XMLDesc(0))
    found = []
    for disk in xml.disks:
        flags = {child.tag for child in disk.node}
        if disk.device != Disk.DEVICE_DISK or {"readonly", "shareable"} & flags or not disk.path:
            continue
        fmt = disk.driver_type or "raw"
        bitmaps = False
        if fmt == "qcow2":
            data = qemuimg.info(disk.path)
            bitmaps = (data.get("format-specific", {}).get("data", {}) or {}).get("compat") == "1.1"
        found.append(SourceDisk(disk.target_dev, disk.path, fmt, bitmaps))
    if only:
        known = [d.target for d in found]
        unknown = [t for t in only if t not in known]
        if unknown:
            raise SpecError("disks", f"{', '.join(unknown)} not a disk of {dom.name()}", known)
        found = [d for d in found if d.target in only]
    if not found:
        raise SaltKvmError(f"{dom.name()} has no file-backed disk to back up")
    return found


# ---- checkpoints ------------------------------------------------------------------
def store_tag(store: bs.Store) -> str:
    """Checkpoints are per destination: two destinations never delete each other's."""
    return hashlib.sha256(str(store.root).encode()).hexdigest()[:8]


def our_checkpoints(dom: libvirt.virDomain, tag: str | None = None) -> list[str]:
    """salt-kvm's checkpoints of ``dom`` (of one destination with ``tag``)."""
    prefix = f"{CHECKPOINT_PREFIX}{tag}-" if tag else CHECKPOINT_PREFIX
    return sorted(c.getName() for c in dom.listAllCheckpoints(0) if c.getName().startswith(prefix))


def delete_checkpoint(dom: libvirt.virDomain, name: str) -> None:
    """Delete a checkpoint; when its bitmaps are broken or gone, its metadata only."""
    try:
        cp = dom.checkpointLookupByName(name, 0)
    except libvirt.libvirtError:
        return
    try:
        cp.delete(0)
    except libvirt.libvirtError as exc:
        log.warning("checkpoint %s of %s: %s; removing its metadata only", name, dom.name(), exc)
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)


def _has_checkpoint(dom: libvirt.virDomain, name: str | None) -> bool:
    return bool(name) and name in our_checkpoints(dom)


# ---- a killed run's leftovers -----------------------------------------------------
def _backup_job_active(dom: libvirt.virDomain) -> bool:
    if not dom.isActive():
        return False
    stats = dom.jobStats(0)
    return (
        stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
        and stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
    )


def reconcile(dom: libvirt.virDomain, store: bs.Store, keep_checkpoint: str | None) -> list[str]:
    """Clean up after a run that died (under the lock, so no run is live).

    Stops its backup job, powers off a domain it started paused, removes its
    partial folder and the checkpoint it created; the previous chain is untouched.
    """
    done = []
    partials = store.partials()
    if partials and _backup_job_active(dom):
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        _wait_job_end(dom, None)
        done.append("aborted the backup job of an interrupted run")
    if any((p / STARTED_PAUSED).exists() for p in partials) and dom.isActive():
        if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.destroy()
            done.append("powered off the domain an interrupted run had started paused")
    done += [f"removed {name}" for name in store.clean_partials()]
    for name in our_checkpoints(dom, store_tag(store)):
        if name != keep_checkpoint:
            delete_checkpoint(dom, name)
            done.append(f"deleted checkpoint {name}")
    return done


# ---- the job ----------------------------------------------------------------------
def _wait_job_end(dom: libvirt.virDomain, progress: Callable[[dict], None] | None) -> dict:
    while True:
        try:
            stats = dom.jobStats(0)
        except libvirt.libvirtError:
            stats = {"type": libvirt.VIR_DOMAIN_JOB_NONE}
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            break
        if progress is not None:
            progress(stats)
        time.sleep(POLL)
    try:
        return dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        return {}


def _backup_xml(disks: list[SourceDisk], folder: Path, incremental: str | None) -> str:
    root = etree.Element("domainbackup", mode="push")
    if incremental:
        etree.SubElement(root, "incremental").text = incremental
    node = etree.SubElement(root, "disks")
    for disk in disks:
        entry = etree.SubElement(node, "disk", name=disk.target, backup="yes", type="file")
        etree.SubElement(entry, "target", file=str(folder / f"{disk.target}.qcow2"))
        etree.SubElement(entry, "driver", type="qcow2")
    return etree.tostring(root, encoding="unicode")


def _checkpoint_xml(name: str, disks: list[SourceDisk], all_targets: list[str]) -> str:
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = name
    node = etree.SubElement(root, "disks")
    wanted = {d.target for d in disks}
    for target in all_targets:
        etree.SubElement(
            node, "disk", name=target, checkpoint="bitmap" if target in wanted else "no"
        )
    return etree.tostring(root, encoding="unicode")


@contextlib.contextmanager
def _running(dom: libvirt.virDomain, partial: Path) -> Iterator[bool]:
    """Yield whether the domain was shut off (and is now started paused for the copy)."""
    if dom.isActive():
        yield False
        return
    (partial / STARTED_PAUSED).write_text(dom.UUIDString())
    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    try:
        yield True
    finally:
        if dom.isActive():
            dom.destroy()


def freeze(dom: libvirt.virDomain, quiesce: str | bool) -> bool:
    """Freeze the guest's filesystems through its agent; ``False`` when not done."""
    if quiesce is False:
        return False
    try:
        dom.fsFreeze(None, 0)
        return True
    except libvirt.libvirtError as exc:
        if quiesce is True:
            raise SaltKvmError(
                f"quiesce: the guest agent of {dom.name()} could not freeze its filesystems: {exc}"
            ) from exc
        log.info("%s: no filesystem freeze (%s); crash-consistent backup", dom.name(), exc)
        return False


def thaw(dom: libvirt.virDomain) -> None:
    for _ in range(3):
        try:
            dom.fsThaw(None, 0)
            return
        except libvirt.libvirtError as exc:
            log.warning("%s: thaw failed (%s), retrying", dom.name(), exc)
            time.sleep(1)
    raise SaltKvmError(f"{dom.name()}: the guest's filesystems could not be thawed")


class _Progress:
    def __init__(self, emit: Emit, base: dict):
        self.emit, self.base = emit, base
        self.started = time.monotonic()
        self.last = 0.0
        self.samples: list[dict] = []

    def __call__(self, stats: dict) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        total = stats.get("disk_total") or 0
        done = stats.get("disk_processed") or 0
        sample = {
            "elapsed": round(now - self.started, 1),
            "processed": done,
            "total": total,
            "percent": round(100.0 * done / total, 1) if total else None,
        }
        self.samples = (self.samples + [sample])[-20:]
        self.emit("progress", {**self.base, **sample})


def _start_job(
    dom: libvirt.virDomain,
    disks,
    partial: Path,
    incremental: str | None,
    cp_xml: str | None,
    quiesce: str | bool,
    offline: bool,
) -> bool:
    """Start the backup job; the guest is frozen only around its start, which is
    the instant the backup captures."""
    frozen = False if offline else freeze(dom, quiesce)
    try:
        dom.backupBegin(_backup_xml(disks, partial, incremental), cp_xml, 0)
    except libvirt.libvirtError as exc:
        if "Permission denied" in str(exc):
            raise SaltKvmError(
                f"dest: QEMU (not root) cannot create the images in {partial.parent.parent}: "
                "make every folder of the path traversable by it (chmod 711)"
            ) from exc
        raise
    finally:
        if frozen:
            thaw(dom)
    return frozen


def _finish_images(
    point_id: str, disks: list[SourceDisk], partial: Path, parent: bs.Point | None
) -> dict[str, bs.DiskImage]:
    images = {}
    for disk in disks:
        path = partial / f"{disk.target}.qcow2"
        if not path.is_file():
            raise SaltKvmError(f"the backup of {disk.target} wrote no image")
        backing = None
        if parent is not None:
            backing = f"../{parent.id}/{parent.disks[disk.target].file}"
            qemuimg.rebase_unsafe(str(path), backing)
        qemuimg.check(str(path))
        info = qemuimg.info(str(path))
        images[disk.target] = bs.DiskImage(
            target=disk.target,
            file=path.name,
            format="qcow2",
            virtual_size=int(info["virtual-size"]),
            size=path.stat().st_size,
            sha256=bs.sha256_file(path),
            backing=backing,
            source=disk.path,
        )
    return images


def _plan_kind(
    dom, disks, latest: bs.Point | None, full: bool, full_every: int | None, chain_length: int
) -> tuple[bs.Point | None, str | None]:
    """Return (the point an incremental follows, or None; why a new chain starts)."""
    if full:
        return None, "full requested"
    if latest is None:
        return None, "first backup"
    if not all(d.bitmaps for d in disks):
        plain = [d.target for d in disks if not d.bitmaps]
        return None, f"{', '.join(plain)} cannot hold dirty bitmaps (not qcow2 v3): full only"
    if set(latest.disks) != {d.target for d in disks}:
        return None, "the set of disks changed"
    if not _has_checkpoint(dom, latest.checkpoint):
        return None, f"checkpoint {latest.checkpoint} of the last point is missing"
    if full_every and chain_length >= full_every:
        return None, f"the chain has {chain_length} points (full_every={full_every})"
    return latest, None


def create(
    conn: libvirt.virConnect,
    name: str,
    dest: str,
    quiesce: str | bool = "auto",
    full: bool = False,
    full_every: int | None = None,
    disks: list[str] | None = None,
    emit: Emit | None = None,
) -> dict:
    """Back up ``name`` into ``dest``/``name``: full, or incremental after the last point."""
    emit = emit or _no_emit
    quiesce = check_quiesce(quiesce)
    if full_every is not None and (
        isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1
    ):
        raise SpecError("full_every", f"{full_every!r} is not a number of points", "1 or more")
    if conn.getLibVersion() < MIN_LIBVIRT:
        raise SaltKvmError(
            f"backups need libvirt 7.6 or later (backup API with checkpoints) on {conn.getURI()}"
        )
    dom = lookup(conn, name)
    store = bs.Store(dest, name)
    chosen = source_disks(dom, disks)  # checked before anything is written
    with store.locked("backup"):
        points = store.points()
        latest = points[-1] if points else None
        cleaned = reconcile(dom, store, latest.checkpoint if latest else None)
        length = len([p for p in points if latest and p.chain == latest.chain])
        parent, reason = _plan_kind(dom, chosen, latest, full, full_every, length)
        point_id = bs.new_point_id({p.id for p in points})
        result = _run(dom, store, point_id, chosen, parent, reason, quiesce, emit)
        result["cleaned"] = cleaned
        return result


def _run(dom, store, point_id, disks, parent, reason, quiesce, emit) -> dict:
    started = time.monotonic()
    base = {"domain": dom.name(), "point": point_id}
    emit("start", {**base, "kind": "incremental" if parent else "full", "reason": reason})
    partial = store.begin(point_id)
    capable = all(d.bitmaps for d in disks)
    checkpoint = f"{CHECKPOINT_PREFIX}{store_tag(store)}-{point_id}" if capable else None
    all_targets = [d.target for d in source_disks(dom)]
    progress = _Progress(emit, base)
    try:
        with _running(dom, partial) as offline:
            cp_xml = _checkpoint_xml(checkpoint, disks, all_targets) if checkpoint else None
            try:
                frozen = _start_job(
                    dom,
                    disks,
                    partial,
                    parent.checkpoint if parent else None,
                    cp_xml,
                    quiesce,
                    offline,
                )
            except libvirt.libvirtError as exc:
                if parent is None:
                    raise
                # SlapOS's "bitmap is inconsistent": start a new chain, do not fail forever.
                reason = f"incremental from {parent.checkpoint} failed ({exc}); new full chain"
                log.warning("%s: %s", dom.name(), reason)
                delete_checkpoint(dom, parent.checkpoint)
                delete_checkpoint(dom, checkpoint)
                parent = None
                frozen = _start_job(dom, disks, partial, None, cp_xml, quiesce, offline)
            stats = _wait_job_end(dom, progress)
        if stats and not stats.get("success", True):
            raise SaltKvmError(f"the backup job failed: {stats.get('errmsg', stats)}")
        images = _finish_images(point_id, disks, partial, parent)
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        (partial / bs.DOMAIN_XML).write_text(xml)
        os.chmod(partial / bs.DOMAIN_XML, 0o600)  # a secure dump: may hold passwords
        point = bs.Point(
            id=point_id,
            domain=dom.name(),
            kind=bs.KIND_INCREMENTAL if parent else bs.KIND_FULL,
            chain=parent.chain if parent else point_id,
            parent=parent.id if parent else None,
            checkpoint=checkpoint,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            consistency=CONSISTENCY_OFFLINE
            if offline
            else (CONSISTENCY_FROZEN if frozen else CONSISTENCY_CRASH),
            frozen=frozen,
            disks=images,
            domain_xml_sha256=bs.sha256_file(partial / bs.DOMAIN_XML),
            duration=round(time.monotonic() - started, 2),
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial / STARTED_PAUSED)
        store.commit(partial, point)
    except BaseException as exc:
        if checkpoint:
            with contextlib.suppress(libvirt.libvirtError):
                if _backup_job_active(dom):
                    dom.abortJob()
                    _wait_job_end(dom, None)
                delete_checkpoint(dom, checkpoint)
        store.clean_partials()
        emit("failed", {**base, "error": str(exc)})
        raise
    for old in our_checkpoints(dom, store_tag(store)):  # only the newest one is needed
        if old != checkpoint:
            delete_checkpoint(dom, old)
    result = {
        **point.summary(),
        "domain": dom.name(),
        "point": point.id,
        "new_chain_reason": reason if point.kind == bs.KIND_FULL else None,
        "duration": point.duration,
        "disk_bytes": {t: d.size for t, d in images.items()},
        "job_seconds": round(stats["time_elapsed"] / 1000, 2) if "time_elapsed" in stats else None,
        "progress": {
            "processed": stats.get("disk_processed"),
            "total": stats.get("disk_total"),
            "samples": progress.samples,
        },
        "path": str(store.path(point)),
    }
    emit("done", {**base, "kind": point.kind, "bytes": point.bytes, "duration": point.duration})
    return result
