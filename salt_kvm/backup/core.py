"""What the two backup methods share: the disks to copy, the guest's freeze,
checkpoint names, progress, and turning copied images into a point's files.

A method (``backup_api.ApiMethod``: libvirt's backup API with checkpoints;
``backup_snap.SnapshotMethod``: an external snapshot, a copy with qemu-img,
then a block commit back) only plans a point and copies the disks into the
partial folder of a ``Run``; ``backup.create`` does the rest (lock, leftovers
of killed runs, manifest, commit, events) the same way for both.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from salt_kvm.backup import store as bs
from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt import qemuimg
from salt_kvm.virt.checks import boolean
from salt_kvm.virt.domain import Disk, Domain

log = logging.getLogger(__name__)
Emit = Callable[[str, dict], None]

CHECKPOINT_PREFIX = "saltkvm-"
QUIESCE_VALUES = ("auto", True, False)
CONSISTENCY_FROZEN = "frozen"
CONSISTENCY_CRASH = "crash-consistent"
CONSISTENCY_OFFLINE = "shut-off"
METHOD_AUTO = "auto"
METHOD_API = "api"
METHOD_SNAPSHOT = "snapshot"
METHODS = (METHOD_AUTO, METHOD_API, METHOD_SNAPSHOT)
MIN_LIBVIRT = 7_006_000  # the backup API with checkpoints, usable without tech-preview flags
PROGRESS_EVERY = 2.0


def no_emit(_step: str, _data: dict) -> None:
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


def check_method(value: object) -> str:
    if value is None:
        return METHOD_AUTO
    if not isinstance(value, str) or value.lower() not in METHODS:
        raise SpecError("method", f"{value!r} is not a backup method", METHODS)
    return value.lower()


def check_compress(value: object) -> bool:
    """A yes/no like every other flag of kvm_backup (``saltutil.flag``): a
    boolean or its usual spellings (``'false'`` from a CLI is false);
    ``None`` is the default, off; ``zstd`` or ``2`` are refused, not guessed."""
    return boolean({"compress": value}, "compress", False)


def check_full_every(value: object) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SpecError("full_every", f"{value!r} is not a number of points", "1 or more")
    return value


DISKS_ACCEPTED = "disk targets: vdb, vda,vdb or [vda, vdb]"


def check_disks(value: object) -> list[str] | None:
    """``disks`` as the CLI gives it: ``disks=vdb`` is a string (one target,
    or several with commas), not a list of its letters; None: every disk."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, list | tuple):
        raise SpecError("disks", f"{value!r} is not a list of disk targets", DISKS_ACCEPTED)
    for target in value:
        if not isinstance(target, str) or not re.fullmatch(r"[a-z]{2,4}[a-z0-9]*", target):
            raise SpecError("disks", f"{target!r} is not a disk target", DISKS_ACCEPTED)
    return list(value)


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
            data = qemuimg.info(disk.path, fmt="qcow2")
            bitmaps = (data.get("format-specific", {}).get("data", {}) or {}).get("compat") == "1.1"
        found.append(SourceDisk(disk.target_dev, disk.path, fmt, bitmaps))
    only = check_disks(only)
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


def delete_checkpoint(dom: libvirt.virDomain, name: str | None) -> None:
    """Delete a checkpoint; when its bitmaps are broken or gone, its metadata only.

    libvirt 9.0 deletes checkpoints of running domains only; for a shut-off one
    the metadata goes and qemu-img removes the bitmaps from the images: a stale
    persistent bitmap would make QEMU refuse to load an internal snapshot.
    """
    if not name:
        return  # a point without a checkpoint
    try:
        cp = dom.checkpointLookupByName(name, 0)
    except libvirt.libvirtError:
        return
    if not dom.isActive():
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        remove_bitmaps(dom, name)
        return
    try:
        cp.delete(0)
    except libvirt.libvirtError as exc:
        log.warning("checkpoint %s of %s: %s; removing its metadata only", name, dom.name(), exc)
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)


def remove_bitmaps(dom: libvirt.virDomain, name: str) -> list[str]:
    """Remove bitmap ``name`` from every qcow2 image of a shut-off domain's disks."""
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    removed = []
    for disk in xml.disks:
        if disk.driver_type != "qcow2" or not disk.path or disk.readonly:
            continue
        try:
            chain = qemuimg.info(disk.path, chain=True, fmt="qcow2")
        except SaltKvmError as exc:
            log.warning("%s: bitmaps of %s not checked: %s", dom.name(), disk.path, exc)
            continue
        for image in chain:
            data = (image.get("format-specific") or {}).get("data") or {}
            if any(b.get("name") == name for b in data.get("bitmaps") or []):
                try:
                    qemuimg.run("bitmap", "--remove", "-f", "qcow2", image["filename"], name)
                    removed.append(image["filename"])
                except SaltKvmError as exc:  # only a stale bitmap: never fail a run for it
                    log.warning("%s: bitmap %s stays in %s: %s", dom.name(), name, image, exc)
    return removed


# ---- the guest's filesystems --------------------------------------------------------
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


# ---- one run ----------------------------------------------------------------------
class Progress:
    """Throttled ``progress`` events, and the last samples for the result."""

    def __init__(self, emit: Emit, base: dict):
        self.emit, self.base = emit, base
        self.started = time.monotonic()
        self.last = 0.0
        self.samples: list[dict] = []
        self.processed: int | None = None
        self.total: int | None = None

    def __call__(self, processed: int, total: int, force: bool = False, **extra) -> None:
        self.processed, self.total = processed, total
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        sample = {
            "elapsed": round(now - self.started, 1),
            "processed": processed,
            "total": total,
            "percent": round(100.0 * processed / total, 1) if total else None,
            **extra,
        }
        self.samples = (self.samples + [sample])[-20:]
        self.emit("progress", {**self.base, **sample})


@contextlib.contextmanager
def timed(phases: dict[str, float], step: str) -> Iterator[None]:
    """Add the seconds the block takes to ``phases[step]`` (a run's steps,
    ``Run.phases``; a step done once per disk adds up)."""
    started = time.monotonic()
    try:
        yield
    finally:
        phases[step] = phases.get(step, 0.0) + time.monotonic() - started


@dataclass
class Run:
    """One backup run: what the skeleton gives a method, and what the method reports."""

    dom: libvirt.virDomain
    store: bs.Store
    point_id: str
    partial: Path
    disks: list[SourceDisk]
    parent: bs.Point | None
    reason: str | None
    quiesce: str | bool
    progress: Progress
    # set by the method
    checkpoint: str | None = None
    frozen: bool = False
    offline: bool = False
    stats: dict = field(default_factory=dict)
    # the digest of each image, when the method hashed it while writing it
    # (then its header already names its parent's image)
    digests: dict[str, str] = field(default_factory=dict)
    read_bytes: int = 0
    algorithm: str = field(default_factory=lambda: bs.preferred_algorithm())  # of every digest
    compress: bool = False  # asked for: images with compressed clusters
    compression: str | None = None  # set by the method: what it wrote (zstd, zlib)
    # seconds per step of the run (job start, map, stream, sync, check, ...): where time goes
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def consistency(self) -> str:
        if self.offline:
            return CONSISTENCY_OFFLINE
        return CONSISTENCY_FROZEN if self.frozen else CONSISTENCY_CRASH


class Method:
    """A way of copying a domain's disks into a run's partial folder."""

    name = ""
    compresses = False  # can write images with compressed clusters (``compress``)
    why_no_compression = ""

    def plan(
        self,
        dom: libvirt.virDomain,
        disks: list[SourceDisk],
        latest: bs.Point | None,
        full: bool,
        full_every: int | None,
        chain_length: int,
    ) -> tuple[bs.Point | None, str | None]:
        """Return (the point an incremental follows, or None; why a new chain starts)."""
        raise NotImplementedError

    def copy(self, run: Run) -> None:
        """Write ``<target>.qcow2`` per disk into ``run.partial``; an incremental's
        images may have any backing file (``finish_images`` makes it relative)."""
        raise NotImplementedError

    def abort(self, run: Run) -> None:
        """Undo what a failed run left in libvirt (the skeleton removes the files)."""
        return None


def plan_chain(
    disks: list[SourceDisk], latest: bs.Point | None, full: bool
) -> tuple[bs.Point | None, str | None]:
    """The reasons for a new chain that do not depend on the method."""
    if full:
        return None, "full requested"
    if latest is None:
        return None, "first backup"
    if set(latest.disks) != {d.target for d in disks}:
        return None, "the set of disks changed"
    return latest, None


def full_every_reached(full_every: int | None, chain_length: int) -> str | None:
    if full_every and chain_length >= full_every:
        return f"the chain has {chain_length} points (full_every={full_every})"
    return None


def finish_images(
    disks: list[SourceDisk],
    partial: Path,
    parent: bs.Point | None,
    digests: dict[str, str] | None = None,
    algorithm: str = bs.SHA256,
) -> dict[str, bs.DiskImage]:
    """Check each copied image, point an incremental's at its parent's (relative
    path: a copy of the folder stays usable anywhere), record size and checksum.

    An image in ``digests`` was hashed while it was written, its header naming
    its parent's image already: it is checked (header, metadata) but neither
    changed nor read again."""
    digests = digests or {}
    images = {}
    for disk in disks:
        path = partial / f"{disk.target}.qcow2"
        if not path.is_file():
            raise SaltKvmError(f"the backup of {disk.target} wrote no image")
        backing = None
        if parent is not None:
            backing = f"../{parent.id}/{parent.disks[disk.target].file}"
            if disk.target not in digests:
                qemuimg.rebase_unsafe(str(path), backing)
        qemuimg.check(str(path), fmt="qcow2", backing=False)
        info = qemuimg.info(str(path), fmt="qcow2")
        if info.get("backing-filename") != backing:
            raise SaltKvmError(
                f"the backup of {disk.target} names the backing file "
                f"{info.get('backing-filename')!r}, not {backing!r}"
            )
        images[disk.target] = bs.DiskImage(
            target=disk.target,
            file=path.name,
            format="qcow2",
            virtual_size=int(info["virtual-size"]),
            size=path.stat().st_size,
            backing=backing,
            source=disk.path,
            **bs.digest_fields(
                algorithm, digests.get(disk.target) or bs.checksum_file(path, algorithm)
            ),
        )
    return images
