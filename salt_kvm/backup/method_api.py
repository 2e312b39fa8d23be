"""The ``api`` backup method: libvirt's backup API (push mode) with checkpoints.

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
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt

from salt_kvm.backup import core
from salt_kvm.backup import store as bs
from salt_kvm.backup.core import CHECKPOINT_PREFIX, Run, SourceDisk
from salt_kvm.errors import SaltKvmError
from salt_kvm.virt.snapshots import BackupJob, Checkpoint

log = logging.getLogger(__name__)

STARTED_PAUSED = "started-paused"
POLL = 0.5


def _has_checkpoint(dom: libvirt.virDomain, name: str | None) -> bool:
    return bool(name) and name in core.our_checkpoints(dom)


# ---- a killed run's leftovers -----------------------------------------------------
def _backup_job_active(dom: libvirt.virDomain) -> bool:
    if not dom.isActive():
        return False
    stats = dom.jobStats(0)
    return (
        stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
        and stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
    )


def reconcile(dom: libvirt.virDomain, partials: list[Path]) -> list[str]:
    """Stop a dead run's backup job; power off a domain it had started paused."""
    done = []
    if partials and _backup_job_active(dom):
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        _wait_job_end(dom, None)
        done.append("aborted the backup job of an interrupted run")
    if any((p / STARTED_PAUSED).exists() for p in partials) and dom.isActive():
        if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.destroy()
            done.append("powered off the domain an interrupted run had started paused")
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
    job = BackupJob.push(incremental)
    for disk in disks:
        job.add_file(disk.target, str(folder / f"{disk.target}.qcow2"))
    return job.to_xml()


def _checkpoint_xml(name: str, disks: list[SourceDisk], all_targets: list[str]) -> str:
    return Checkpoint.new(name, [d.target for d in disks], all_targets).to_xml()


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
    frozen = False if offline else core.freeze(dom, quiesce)
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
            core.thaw(dom)
    return frozen


def _plan_kind(
    dom, disks, latest: bs.Point | None, full: bool, full_every: int | None, chain_length: int
) -> tuple[bs.Point | None, str | None]:
    """Return (the point an incremental follows, or None; why a new chain starts)."""
    parent, reason = core.plan_chain(disks, latest, full)
    if parent is None:
        return None, reason
    if not all(d.bitmaps for d in disks):
        plain = [d.target for d in disks if not d.bitmaps]
        return None, f"{', '.join(plain)} cannot hold dirty bitmaps (not qcow2 v3): full only"
    # parent is latest (plan_chain returns it when a chain may go on)
    if parent.checkpoint is None and parent.method == core.METHOD_SNAPSHOT:
        return None, (
            f"the last point {parent.id} was taken with method=snapshot, which leaves no "
            "checkpoint for the backup API to follow"
        )
    if not _has_checkpoint(dom, parent.checkpoint):
        return None, f"checkpoint {parent.checkpoint} of the last point is missing"
    reason = core.full_every_reached(full_every, chain_length)
    return (None, reason) if reason else (parent, None)


class ApiMethod(core.Method):
    name = core.METHOD_API

    def plan(self, dom, disks, latest, full, full_every, chain_length):
        return _plan_kind(dom, disks, latest, full, full_every, chain_length)

    def copy(self, run: Run) -> None:
        dom, disks, partial = run.dom, run.disks, run.partial
        if all(d.bitmaps for d in disks):
            run.checkpoint = f"{CHECKPOINT_PREFIX}{core.store_tag(run.store)}-{run.point_id}"
        all_targets = [d.target for d in core.source_disks(dom)]

        def progress(stats: dict) -> None:
            run.progress(stats.get("disk_processed") or 0, stats.get("disk_total") or 0)

        with _running(dom, partial) as offline:
            run.offline = offline
            cp_xml = _checkpoint_xml(run.checkpoint, disks, all_targets) if run.checkpoint else None
            parent = run.parent
            try:
                run.frozen = _start_job(
                    dom,
                    disks,
                    partial,
                    parent.checkpoint if parent else None,
                    cp_xml,
                    run.quiesce,
                    offline,
                )
            except libvirt.libvirtError as exc:
                if parent is None:
                    raise
                # SlapOS's "bitmap is inconsistent": start a new chain, do not fail forever.
                run.reason = f"incremental from {parent.checkpoint} failed ({exc}); new full chain"
                log.warning("%s: %s", dom.name(), run.reason)
                core.delete_checkpoint(dom, parent.checkpoint)
                core.delete_checkpoint(dom, run.checkpoint)
                run.parent = None
                run.frozen = _start_job(dom, disks, partial, None, cp_xml, run.quiesce, offline)
            stats = _wait_job_end(dom, progress)
        if stats and not stats.get("success", True):
            raise SaltKvmError(f"the backup job failed: {stats.get('errmsg', stats)}")
        run.stats = stats
        if stats.get("disk_total") is not None:
            run.progress.processed = stats.get("disk_processed")
            run.progress.total = stats.get("disk_total")
        with contextlib.suppress(FileNotFoundError):
            (partial / STARTED_PAUSED).unlink()

    def abort(self, run: Run) -> None:
        if not run.checkpoint:
            return
        with contextlib.suppress(libvirt.libvirtError):
            if _backup_job_active(run.dom):
                run.dom.abortJob()
                _wait_job_end(run.dom, None)
            core.delete_checkpoint(run.dom, run.checkpoint)
