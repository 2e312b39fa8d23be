"""The ``api`` backup method: libvirt's backup API (pull mode) with checkpoints.

The first run of a domain (or of a new chain) is a full backup; later runs copy
only what changed since the previous point, as tracked by a libvirt checkpoint
(a persistent dirty bitmap in each qcow2 image). The guest's filesystems are
frozen through the guest agent around the instant the backup starts, so the
copy is consistent; the copy itself runs while the guest goes on.

In pull mode QEMU serves each disk, as it was at that instant, over NBD on a
unix socket in a private folder (0700, owned by QEMU's user; its scratch files
there too), and this process reads what is allocated (full) or dirty
(incremental) and writes the point's images itself (``pull``): as the caller,
so the destination needs no permission for QEMU. The job is ended when every
disk is read.

A shut-off domain is started paused for the copy (its CPUs never run, so the
disks stay exactly as they were), since the backup API needs a running QEMU;
it is destroyed again afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
from lxml import etree

from salt_kvm.backup import core, nbd, pull
from salt_kvm.backup import store as bs
from salt_kvm.backup.core import CHECKPOINT_PREFIX, Run, SourceDisk
from salt_kvm.errors import SaltKvmError
from salt_kvm.virt import qemuimg
from salt_kvm.virt.snapshots import BackupJob, Checkpoint

log = logging.getLogger(__name__)

STARTED_PAUSED = "started-paused"
POLL = 0.5
# The NBD socket and the scratch files of a pull backup (the guest's writes to
# blocks not read yet go there while the job runs): a local disk, not the store.
SCRATCH_DIR = "/var/tmp"
SCRATCH_PREFIX = "salt-kvm-backup-"
QEMU_USER = "libvirt-qemu"  # Debian's; a killed run's folder of another owner stays


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
    if not _backup_job_active(dom):
        owner = _qemu_owner()
        for folder in glob.glob(os.path.join(SCRATCH_DIR, f"{_scratch_prefix(dom)}*")):
            if _remove_scratch(folder, owner):
                done.append(f"removed the scratch folder {folder} of an interrupted run")
    return done


# ---- the private folder of a pull backup ---------------------------------------------
def _scratch_prefix(dom: libvirt.virDomain) -> str:
    return f"{SCRATCH_PREFIX}{dom.UUIDString()}-"


def _qemu_ids(dom: libvirt.virDomain) -> tuple[int, int] | None:
    """The uid and gid QEMU runs as (the running domain's DAC label)."""
    label = etree.fromstring(dom.XMLDesc(0)).findtext("./seclabel[@model='dac']/label")
    if not label or ":" not in label:
        return None
    uid, gid = (part.lstrip("+") for part in label.split(":", 1))
    return (int(uid), int(gid)) if uid.isdigit() and gid.isdigit() else None


def _qemu_owner() -> int | None:
    """The uid of QEMU's usual user on this host (for leftovers of a killed run,
    when no QEMU of the domain runs to ask)."""
    try:
        return pwd.getpwnam(QEMU_USER).pw_uid
    except KeyError:
        return None


def _scratch_folder(dom: libvirt.virDomain) -> str:
    """A fresh folder only QEMU's user (and root) can enter: QEMU creates the
    socket and the scratch files in it, and nobody else can connect."""
    folder = tempfile.mkdtemp(prefix=_scratch_prefix(dom), dir=SCRATCH_DIR)  # 0700
    ids = _qemu_ids(dom)
    if ids is not None and os.geteuid() == 0 and ids != (0, 0):
        os.chown(folder, *ids)
    return folder


def _remove_scratch(folder: str, owner: int | None = None) -> bool:
    """Remove a scratch folder of ours: a real folder, 0700, owned by root or by
    ``owner`` (QEMU's user, to whom it was given)."""
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode) or stat.S_IMODE(info.st_mode) & 0o077:
        return False  # not one of ours: never removed
    if info.st_uid != 0 and (owner is None or info.st_uid != owner):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


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


def export_bitmap(target: str) -> str:
    """The dirty bitmap an incremental's export carries. The export's name
    (the disk's target) and this are libvirt's own defaults too, so a libvirt
    that ignored ``exportname``/``exportbitmap`` would serve the same names."""
    return f"backup-{target}"


def _backup_xml(disks: list[SourceDisk], folder: str, incremental: str | None) -> str:
    job = BackupJob.pull(os.path.join(folder, "nbd.sock"), incremental)
    for disk in disks:
        bitmap = export_bitmap(disk.target) if incremental else None
        job.add_export(
            disk.target, disk.target, bitmap, os.path.join(folder, f"{disk.target}.scratch")
        )
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
    folder: str,
    incremental: str | None,
    cp_xml: str | None,
    quiesce: str | bool,
    offline: bool,
) -> bool:
    """Start the backup job; the guest is frozen only around its start, which is
    the instant the backup captures."""
    frozen = False if offline else core.freeze(dom, quiesce)
    try:
        dom.backupBegin(_backup_xml(disks, folder, incremental), cp_xml, 0)
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


def _end_job(dom: libvirt.virDomain) -> None:
    """A pull backup runs until it is ended: end it (the checkpoint stays)."""
    if _backup_job_active(dom):
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        _wait_job_end(dom, None)


def _check_socket(dom: libvirt.virDomain, path: str) -> None:
    """The socket QEMU made, not something planted in its place: a socket of
    QEMU's user (or root), never followed through a link."""
    ids = _qemu_ids(dom)
    try:
        info = os.lstat(path)
    except FileNotFoundError as exc:
        raise SaltKvmError(f"{dom.name()}: the backup job made no NBD socket {path}") from exc
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid not in {0, ids[0] if ids else 0}:
        raise SaltKvmError(f"{dom.name()}: {path} is not the NBD socket of the backup job")


def _read_exports(run: Run, socket: str) -> None:
    """Copy every disk's export into the partial folder, hashing as it goes."""
    dom, parent = run.dom, run.parent
    _check_socket(dom, socket)
    sizes = {d.target: dom.blockInfo(d.target, 0)[0] for d in run.disks}
    total, done = sum(sizes.values()), 0
    for disk in run.disks:
        dirty = nbd.dirty_bitmap(export_bitmap(disk.target)) if parent else None
        contexts = (nbd.BASE_ALLOCATION,) + ((dirty,) if dirty else ())
        with nbd.Client(socket, disk.target, contexts) as client:
            if client.size != sizes[disk.target]:
                raise SaltKvmError(
                    f"the export of {disk.target} has {client.size} bytes, "
                    f"the disk {sizes[disk.target]}"
                )
            backing = bs.image_backing(parent, disk.target) if parent else None

            def progress(read: int, _expected: int, done=done, target=disk.target) -> None:
                run.progress(done + read, total, disk=target, phase="copy")

            def compressing(percent: float, done=done, target=disk.target) -> None:
                run.progress(done, total, disk=target, phase="compress", percent_done=percent)

            digest, read = pull.copy_disk(
                client,
                run.partial / bs.image_file(disk.target),
                backing,
                dirty,
                progress,
                run.algorithm,
                compress=compressing if run.compression else False,
                phases=run.phases,
            )
        run.digests[disk.target] = digest
        run.read_bytes += read
        done += sizes[disk.target]
    run.progress(total, total, True, phase="copied")


class ApiMethod(core.Method):
    name = core.METHOD_API
    compresses = True

    def plan(self, dom, disks, latest, full, full_every, chain_length):
        return _plan_kind(dom, disks, latest, full, full_every, chain_length)

    def copy(self, run: Run) -> None:
        dom, disks, partial = run.dom, run.disks, run.partial
        run.compression = qemuimg.compression_type() if run.compress else None
        if all(d.bitmaps for d in disks):
            run.checkpoint = f"{CHECKPOINT_PREFIX}{core.store_tag(run.store)}-{run.point_id}"
        all_targets = [d.target for d in core.source_disks(dom)]
        with _running(dom, partial) as offline:
            run.offline = offline
            cp_xml = _checkpoint_xml(run.checkpoint, disks, all_targets) if run.checkpoint else None
            folder = _scratch_folder(dom)
            try:
                started = time.monotonic()
                with core.timed(run.phases, "job start"):
                    self._begin(run, folder, cp_xml)
                try:
                    _read_exports(run, os.path.join(folder, "nbd.sock"))
                finally:
                    with core.timed(run.phases, "job end"):
                        _end_job(dom)
                run.stats = {"time_elapsed": int((time.monotonic() - started) * 1000)}
            finally:
                ids = _qemu_ids(dom) if dom.isActive() else None
                _remove_scratch(folder, ids[0] if ids else None)
        with contextlib.suppress(FileNotFoundError):
            (partial / STARTED_PAUSED).unlink()

    @staticmethod
    def _begin(run: Run, folder: str, cp_xml: str | None) -> None:
        dom, parent = run.dom, run.parent
        try:
            run.frozen = _start_job(
                dom,
                run.disks,
                folder,
                parent.checkpoint if parent else None,
                cp_xml,
                run.quiesce,
                run.offline,
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
            run.frozen = _start_job(dom, run.disks, folder, None, cp_xml, run.quiesce, run.offline)

    def abort(self, run: Run) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            _end_job(run.dom)
            core.delete_checkpoint(run.dom, run.checkpoint)
