"""The ``snapshot`` backup method: for hosts without libvirt's backup API (< 7.6),
or when asked for with ``method=snapshot``.

A running domain gets an external disk-only snapshot of the chosen disks (no
libvirt metadata; the guest's filesystems frozen through its agent for that
instant when it answers), so its images stop changing: new writes go to an
overlay ``<disk stem>.saltkvm-backup-<point>.qcow2`` beside each image. The
frozen images are copied with ``qemu-img``, then each overlay is merged back
(active block commit, one level down only, then a pivot), deleted, and both the
live and the persistent definitions point at the original images again. That
merge happens whatever became of the copy; a run killed before it is merged
back by the next run (``reconcile``).

A full point is ``qemu-img convert`` of the frozen image (its backing chain
flattened). An incremental needs no dirty bitmap: a new image on the frozen
image is rebased (safe mode) onto the previous point's image, and qemu-img
writes into it exactly the clusters where the two differ. It so reads the
whole disk but writes only what changed; it works for raw disks too, and may
follow any earlier point (the snapshot method leaves no checkpoint).

A shut-off domain is copied directly; qemu-img's image lock keeps a start of
the domain out while it reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TypeGuard

import libvirt

from salt_kvm.backup import core, snapshots
from salt_kvm.backup.core import Run
from salt_kvm.errors import ConflictError, SaltKvmError
from salt_kvm.virt import chains, qemuimg
from salt_kvm.virt.domain import Domain

log = logging.getLogger(__name__)

OVERLAY_PREFIX = snapshots.BACKUP_PREFIX
OVERLAY_RE = re.compile(r"\.saltkvm-backup-\d{8}T\d{6}Z(?:-\d+)?\.qcow2\Z", re.ASCII)
POLL = 0.5
COMMIT_TIMEOUT = 3600.0
SNAPSHOT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
)


def overlay_for(path: str, point_id: str) -> str:
    return snapshots.overlay_path(path, f"{OVERLAY_PREFIX}{point_id}")


def is_overlay(path: str | None) -> TypeGuard[str]:
    if not path:
        return False
    return bool(OVERLAY_RE.search(os.path.basename(path)))


@dataclass
class Frozen:
    """A disk whose ``image`` is frozen while the guest writes into ``overlay``."""

    target: str
    overlay: str
    image: str
    format: str


class SnapshotMethod(core.Method):
    name = core.METHOD_SNAPSHOT
    why_no_compression = (
        "its incremental is written by qemu-img rebase, which writes no compressed "
        "clusters (before QEMU 8.2)"
    )

    def plan(self, dom, disks, latest, full, full_every, chain_length):
        parent, reason = core.plan_chain(disks, latest, full)
        if parent is None:
            return None, reason
        reason = core.full_every_reached(full_every, chain_length)
        return (None, reason) if reason else (latest, None)

    def copy(self, run: Run) -> None:
        not_files = [d.target for d in run.disks if not os.path.isfile(d.path)]
        if not_files:
            raise SaltKvmError(
                f"method=snapshot backs up disks in files only; {', '.join(not_files)} of "
                f"{run.dom.name()} is not (use method=api)"
            )
        if not run.dom.isActive():
            run.offline = True
            _copy_disks(run, share=False)
            return
        frozen = _snapshot(run)
        try:
            _copy_disks(run, share=True)
        finally:
            run.progress(run.progress.processed or 0, run.progress.total or 0, True, phase="merge")
            merge_back(run.dom, frozen)


# ---- snapshot and copy ----------------------------------------------------------------
def _snapshot(run: Run) -> list[Frozen]:
    dom = run.dom
    frozen = [
        Frozen(d.target, overlay_for(d.path, run.point_id), d.path, d.format) for d in run.disks
    ]
    for each in frozen:
        if os.path.exists(each.overlay):
            raise ConflictError(f"{each.overlay} already exists")
    taken = {f.target for f in frozen}
    others = [
        d.target_dev
        for d in Domain(dom.XMLDesc(0)).disks
        if d.target_dev and d.target_dev not in taken
    ]
    xml = snapshots.external_xml(
        f"{OVERLAY_PREFIX}{run.point_id}", None, {f.target: f.overlay for f in frozen}, others
    )
    try:
        _snap, run.frozen = snapshots.create_quiesced(
            dom, xml, SNAPSHOT_FLAGS, run.quiesce is not False, run.quiesce
        )
    except libvirt.libvirtError as exc:
        what = "with its filesystems frozen (quiesce=True) " if run.quiesce is True else ""
        key = "quiesce: " if run.quiesce is True else ""
        raise SaltKvmError(f"{key}the snapshot of {dom.name()} {what}failed: {exc}") from exc
    if not run.frozen:
        log.info("%s: snapshot without a filesystem freeze; crash-consistent backup", dom.name())
    return frozen


def _copy_disks(run: Run, share: bool) -> None:
    sizes = {d.target: int(qemuimg.info(d.path, fmt=d.format)["virtual-size"]) for d in run.disks}
    total = sum(sizes.values())
    done = 0
    for disk in run.disks:
        dest = str(run.partial / f"{disk.target}.qcow2")
        phase = "copy" if run.parent is None else "compare"

        def report(percent: float, disk=disk, done=done, phase=phase) -> None:
            processed = done + int(sizes[disk.target] * percent / 100)
            run.progress(processed, total, disk=disk.target, phase=phase)

        run.progress(done, total, True, disk=disk.target, phase=phase)
        if run.parent is None:
            qemuimg.copy_flat(disk.path, disk.format, dest, share, report)
        else:
            previous = run.store.path(run.parent) / run.parent.disks[disk.target].file
            qemuimg.create_overlay(dest, disk.path, disk.format, size=sizes[disk.target])
            qemuimg.rebase_safe(dest, str(previous), "qcow2", share, report)
        os.chmod(dest, 0o600)
        done += sizes[disk.target]
    run.progress(total, total, True, phase="copied")


# ---- merging back -----------------------------------------------------------------
def _sources(dom: libvirt.virDomain, flags: int) -> dict[str, str | None]:
    return {d.target_dev: d.path for d in Domain(dom.XMLDesc(flags)).disks if d.target_dev}


def _commit_live(dom: libvirt.virDomain, frozen: Frozen) -> None:
    """Active block commit of the overlay into the frozen image, then the pivot."""
    job = dom.blockJobInfo(frozen.target, 0)
    if job and job.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT:
        raise ConflictError(
            f"{dom.name()}: {frozen.target} has another block job running; "
            f"its backup overlay {frozen.overlay} is merged back by the next backup run"
        )
    if not job:  # else: the commit of a killed run, still there
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
        dom.blockCommit(frozen.target, None, None, 0, flags)
    deadline = time.monotonic() + COMMIT_TIMEOUT
    while True:
        job = dom.blockJobInfo(frozen.target, 0)
        if not job:
            break
        if job.get("cur") == job.get("end"):
            try:
                dom.blockJobAbort(frozen.target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                break
            except libvirt.libvirtError as exc:  # not ready yet: the last writes go on
                log.debug("%s: pivot of %s: %s", dom.name(), frozen.target, exc)
        if time.monotonic() > deadline:
            raise SaltKvmError(f"{dom.name()}: block commit of {frozen.target} did not finish")
        time.sleep(POLL)
    if _sources(dom, 0).get(frozen.target) == frozen.overlay:
        raise SaltKvmError(
            f"{dom.name()}: after the block commit {frozen.target} still runs on {frozen.overlay}"
        )


def _fix_persistent(dom: libvirt.virDomain, frozen: list[Frozen]) -> bool:
    """Point the persistent definition at the original images where it names an overlay."""
    if not dom.isPersistent():
        return False
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    xml = Domain(dom.XMLDesc(flags))
    by_overlay: dict[str | None, Frozen] = {f.overlay: f for f in frozen}
    changed = False
    for disk in xml.disks:
        each = by_overlay.get(disk.path)
        if each is not None:
            disk.path = each.image
            disk.driver_type = each.format
            changed = True
    if changed:
        dom.connect().defineXML(xml.to_xml())
    return changed


def _needed(dom: libvirt.virDomain, path: str) -> str:
    """Who still needs an overlay file ('' when nobody): any disk of any domain
    (this one's running state and definition included) or any pool volume that
    has it as its file or anywhere in its backing chain (a snapshot taken on top
    of it while the run copied, for one)."""
    return "; ".join(str(d) for d in chains.dependents(dom.connect()).of(path))


def merge_back(dom: libvirt.virDomain, frozen: list[Frozen]) -> list[str]:
    """Merge each overlay into its image, restore the definitions, delete the overlays.

    Goes on past a failing disk (every overlay it can merge is merged), then raises.
    """
    done, errors, failed = [], [], set()
    for each in frozen:
        try:
            if dom.isActive():
                if _sources(dom, 0).get(each.target) == each.overlay:
                    _commit_live(dom, each)
                    done.append(f"merged {each.overlay} back into {each.image}")
            elif (
                dom.isPersistent()
                and _sources(dom, libvirt.VIR_DOMAIN_XML_INACTIVE).get(each.target) == each.overlay
                and os.path.exists(each.overlay)
            ):
                qemuimg.commit(each.overlay)  # the guest stopped meanwhile
                done.append(f"merged {each.overlay} back into {each.image} (offline)")
        except (libvirt.libvirtError, SaltKvmError) as exc:
            errors.append(f"{each.target}: {exc}")
            failed.add(each.target)
    try:
        # never for a disk still on its overlay: a later start would lose its writes
        _fix_persistent(dom, [f for f in frozen if f.target not in failed])
    except libvirt.libvirtError as exc:
        errors.append(f"persistent definition: {exc}")
    for each in frozen:
        if os.path.exists(each.overlay):
            needs = _needed(dom, each.overlay)
            if needs:
                errors.append(f"{each.target}: {each.overlay} kept, it is needed by {needs}")
            else:
                os.unlink(each.overlay)
    if errors:
        raise SaltKvmError(
            f"{dom.name()}: merging the backup overlays back failed ({'; '.join(errors)}); "
            "the next backup run retries it"
        )
    return done


# ---- a killed run's leftovers -----------------------------------------------------
def _leftover(path: str, target: str) -> Frozen | None:
    data = qemuimg.info(path, fmt="qcow2")  # our overlay
    image = data.get("full-backing-filename") or data.get("backing-filename")
    if not image:
        return None
    if not os.path.isabs(image):
        image = os.path.join(os.path.dirname(path), image)
    return Frozen(target, path, image, data.get("backing-filename-format") or "raw")


def reconcile(dom: libvirt.virDomain) -> list[str]:
    """Merge back the overlays of a run that died (or whose merge failed), and
    delete overlay files of ours that no definition uses any more."""
    current = _sources(dom, 0)
    stored = _sources(dom, libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else {}
    leftovers: dict[str, Frozen] = {}
    for sources in (current, stored):
        for target, path in sources.items():
            if is_overlay(path) and target not in leftovers and os.path.exists(path):
                found = _leftover(path, target)
                if found is not None:
                    leftovers[target] = found
    done = merge_back(dom, list(leftovers.values())) if leftovers else []
    if leftovers and not done:
        done = [f"restored the definition of {dom.name()} to {f.image}" for f in leftovers.values()]
    folders: dict[str, set[str]] = {}
    for path in {**stored, **current}.values():
        if path and not is_overlay(path):
            stem = os.path.basename(path).rsplit(".", 1)[0]
            folders.setdefault(os.path.dirname(path), set()).add(stem)
    for folder, stems in folders.items():
        try:
            names = os.listdir(folder)
        except OSError:
            continue  # a folder gone or unreadable holds no overlay of ours to remove
        for name in names:
            stray = os.path.join(folder, name)
            stem = name.split(f".{OVERLAY_PREFIX}", 1)[0]
            if stem in stems and is_overlay(stray) and not _needed(dom, stray):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stray)
                done.append(f"removed the stray backup overlay {stray}")
    return done
