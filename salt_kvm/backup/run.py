"""Backups of a guest's disks: full, then incremental, into a store of points.

Two methods copy the disks (``method``): ``api``, libvirt's backup API with
checkpoints (``backup_api``), and ``snapshot``, an external snapshot, a copy
with qemu-img and a block commit back (``backup_snap``), for hosts whose
libvirt is older than 7.6. ``auto`` takes the API where libvirt has it. Both
go through the same run here: one run per domain and destination (a lock),
the leftovers of a killed run cleaned first, the copy written into a partial
folder, checked, its manifest written, and only then given its final name;
events on the way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import libvirt

from salt_kvm.backup import core, firmware_state, method_api, method_snapshot, verify
from salt_kvm.backup import store as bs
from salt_kvm.backup.core import (
    MIN_LIBVIRT,
    Emit,
    check_method,
    check_quiesce,
    delete_checkpoint,
    our_checkpoints,
    source_disks,
    store_tag,
    timed,
)
from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt import chains
from salt_kvm.virt.lifecycle import lookup

log = logging.getLogger(__name__)


def choose_method(conn: libvirt.virConnect, method: str) -> core.Method:
    """``auto``: the backup API where libvirt has it (7.6 or later), else the snapshot."""
    has_api = conn.getLibVersion() >= MIN_LIBVIRT
    if method == core.METHOD_API and not has_api:
        raise SaltKvmError(
            f"method=api needs libvirt 7.6 or later (backup API with checkpoints) on "
            f"{conn.getURI()}; method=snapshot (or auto) works there"
        )
    if method == core.METHOD_SNAPSHOT or (method == core.METHOD_AUTO and not has_api):
        return method_snapshot.SnapshotMethod()
    return method_api.ApiMethod()


def clean_partials(dom: libvirt.virDomain, store: bs.Store) -> list[str]:
    """Remove unfinished points, never while anything stands on an image in them."""
    files = [str(f) for p in store.partials() for f in sorted(p.rglob("*")) if f.is_file()]
    chains.check_deletable(dom.connect(), files, f"cleanup of unfinished backups in {store.root}")
    return store.clean_partials()


def reconcile(dom: libvirt.virDomain, store: bs.Store, keep_checkpoint: str | None) -> list[str]:
    """Clean up after a run that died, whatever its method (under the lock, so no
    run is live): its backup job, a domain it started paused, its snapshot
    overlays, its partial folder and the checkpoint it created; the previous
    chain is untouched."""
    partials = store.partials()
    done = method_api.reconcile(dom, partials)
    done += method_snapshot.reconcile(dom)
    done += [f"removed {name}" for name in clean_partials(dom, store)]
    for name in our_checkpoints(dom, store_tag(store)):
        if name != keep_checkpoint:
            delete_checkpoint(dom, name)
            done.append(f"deleted checkpoint {name}")
    return done


def create(
    conn: libvirt.virConnect,
    name: str,
    dest: str,
    quiesce: str | bool = "auto",
    full: bool = False,
    full_every: int | None = None,
    disks: list[str] | None = None,
    emit: Emit | None = None,
    method: str = core.METHOD_AUTO,
    compress: bool = False,
) -> dict:
    """Back up ``name`` into ``dest``/``name``: full, or incremental after the last
    point; with ``compress``, into qcow2 images with compressed clusters."""
    emit = emit or core.no_emit
    quiesce = check_quiesce(quiesce)
    full_every = core.check_full_every(full_every)
    compress = core.check_compress(compress)
    engine = choose_method(conn, check_method(method))
    if compress and not engine.compresses:
        raise SpecError(
            "compress",
            f"method={engine.name} cannot compress: {engine.why_no_compression}",
            "False with method=snapshot; True with method=api",
        )
    dom = lookup(conn, name)
    store = bs.Store(dest, name)
    source_disks(dom, disks)  # checked before anything is written
    with store.locked("backup"), bs.domain_locked(dom.UUIDString(), name, store.dest):
        points, unusable = store.scan()
        latest = points[-1] if points else None
        cleaned = reconcile(dom, store, latest.checkpoint if latest else None)
        chosen = source_disks(dom, disks)  # again: a killed run's overlay is merged back now
        length = len([p for p in points if latest and p.chain == latest.chain])
        parent, reason = engine.plan(dom, chosen, latest, full, full_every, length)
        if parent is not None and (engine.name == core.METHOD_SNAPSHOT or compress):
            # qemu-img opens the previous point's images, through their chain
            parent, reason = _readable_parent(store, parent, reason)
        point_id = bs.new_point_id({p.id for p in points} | set(unusable))
        result = _run(engine, dom, store, point_id, chosen, parent, reason, quiesce, emit, compress)
        result["cleaned"] = cleaned
        return result


def _readable_parent(
    store: bs.Store, parent: bs.Point, reason: str | None
) -> tuple[bs.Point | None, str | None]:
    """method=snapshot and a compressed incremental read the previous point's
    images (and their chain): only when their headers fit the store's layout,
    else a new full chain."""
    try:
        chain = store.chain(parent.id)[1]
    except SaltKvmError as exc:
        return None, f"the chain of {parent.id} is unusable ({exc}); new full chain"
    problems = [p for link in chain for p in verify.verify_point(store, link, deep=False)]
    if problems:
        return (
            None,
            f"the chain of {parent.id} does not fit the store ({problems[0]}); new full chain",
        )
    return parent, reason


def _run(
    engine: core.Method, dom, store, point_id, disks, parent, reason, quiesce, emit, compress
) -> dict:
    started = time.monotonic()
    base = {"domain": dom.name(), "point": point_id}
    kind = bs.KIND_INCREMENTAL if parent else bs.KIND_FULL
    emit(
        "start",
        {**base, "kind": kind, "reason": reason, "method": engine.name, "compress": compress},
    )
    partial = store.begin(point_id)
    run = core.Run(
        dom, store, point_id, partial, disks, parent, reason, quiesce, core.Progress(emit, base)
    )
    run.compress = compress
    try:
        engine.copy(run)
        with timed(run.phases, "check"):
            images = core.finish_images(disks, partial, run.parent, run.digests, run.algorithm)
        with timed(run.phases, "manifest"):
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
            # a secure dump (it may hold passwords): 0600 from its first byte
            fd = os.open(
                partial / bs.DOMAIN_XML, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
            with os.fdopen(fd, "w") as handle:
                handle.write(xml)
            point = bs.Point(
                id=point_id,
                domain=dom.name(),
                kind=bs.KIND_INCREMENTAL if run.parent else bs.KIND_FULL,
                chain=run.parent.chain if run.parent else point_id,
                parent=run.parent.id if run.parent else None,
                checkpoint=run.checkpoint,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                consistency=run.consistency,
                frozen=run.frozen,
                disks=images,
                domain_xml_sha256=bs.sha256_file(partial / bs.DOMAIN_XML),
                duration=round(time.monotonic() - started, 2),
                method=engine.name,
                firmware=firmware_state.capture(dom, partial),
                compression=run.compression,
            )
            store.commit(partial, point)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            engine.abort(run)
        try:
            clean_partials(dom, store)
        except SaltKvmError as refused:
            log.warning("%s", refused)
        emit("failed", {**base, "error": str(exc), "method": engine.name})
        raise
    with timed(run.phases, "old checkpoints"):
        for old in our_checkpoints(dom, store_tag(store)):  # only the newest one is needed
            if old != run.checkpoint:
                delete_checkpoint(dom, old)
    stats = run.stats
    result = {
        **point.summary(),
        "domain": dom.name(),
        "point": point.id,
        "new_chain_reason": run.reason if point.kind == bs.KIND_FULL else None,
        "duration": point.duration,
        "disk_bytes": {t: d.size for t, d in images.items()},
        "job_seconds": round(stats["time_elapsed"] / 1000, 2) if "time_elapsed" in stats else None,
        # seconds per step, in the order they ran (docs/backup.rst lists them)
        "phases": {step: round(spent, 3) for step, spent in run.phases.items()},
        "progress": {
            "processed": run.progress.processed,
            "total": run.progress.total,
            "samples": run.progress.samples,
        },
        "path": str(store.path(point)),
    }
    emit("done", {**base, "kind": point.kind, "bytes": point.bytes, "duration": point.duration})
    return result
