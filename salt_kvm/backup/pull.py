"""Copying one disk from libvirt's pull-mode NBD export into a point's image.

The export is the disk as it was when the backup job began (QEMU keeps that
view with copy-before-write into a scratch file while the guest goes on).
Block status says which parts to read: for a full point every cluster that
is not known to read as zeros (``base:allocation``); for an incremental the
clusters of the job's dirty bitmap (``qemu:dirty-bitmap:NAME``: what changed
since the checkpoint the point follows), of which those that now read as
zeros are stored as zero clusters. Only those are read, once, and streamed
into a qcow2 laid out front to back (``qcow2.Writer``) that is hashed while
it is written: the process writes the image as the caller, so a destination
only the caller can write is enough.

While the next chunk is read, a second thread writes the last one and a
third hashes it (both calls release the GIL; QEMU serves the reads in its own
process). Alone, each of the three runs at about 1 GB/s on the 2-core test
machine; together, with QEMU's NBD server on the same cores, the reads are
the slowest (docs/performance.md, "where a full run's time goes"). The
writer starts the image's writeback every ``WRITEBACK`` bytes, so the
fsync at the end has little left to write.

A compressed image (``compress``) cannot be laid out front to back: qcow2's
tables, before the data, hold each compressed cluster's offset and length,
known only once it is compressed. So the export is first written, unhashed,
into a scratch image beside the point's (``vda.uncompressed.qcow2``, in the
partial folder: removed with it on any failure), then ``qemu-img convert -c``
writes the point's image from it (for an incremental only the scratch
image's own clusters, on the same backing file) and the scratch image goes;
the final file is hashed in one read. That second pass is the price of
compression, paid only when it is asked for.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from salt_kvm.backup import nbd, qcow2
from salt_kvm.backup.core import timed
from salt_kvm.backup.manifest import new_hash
from salt_kvm.errors import SaltKvmError
from salt_kvm.virt import qemuimg

CHUNK = 4 * 1024 * 1024
BUFFERS = 4
# Written data is handed to the disk every WRITEBACK bytes while the copy goes
# on (sync_file_range, a hint): the fsync that makes the image durable before
# its manifest then finds little left to write, instead of all of it.
WRITEBACK = 64 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[..., int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None  # not Linux: the fsync at the end does it all
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Start writing ``length`` bytes of ``fd`` from ``offset`` to the disk,
    without waiting for them: only a head start for the fsync that follows,
    which alone says the bytes are on the disk (an error here shows there)."""
    if _SYNC_FILE_RANGE is None or length <= 0:
        return False
    return _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0


def cluster_map(client: nbd.Client, dirty: str | None) -> bytearray:
    """One byte per 64 KiB cluster: ``DATA``, ``ZERO`` or ``UNALLOCATED``."""
    count = qcow2.clusters(client.size)
    nonzero = bytearray(count)
    for ext in client.extents(nbd.BASE_ALLOCATION):
        if not ext.flags & nbd.STATE_ZERO:
            first, last = ext.offset // qcow2.CLUSTER, qcow2.clusters(ext.offset + ext.length)
            nonzero[first:last] = b"\x01" * (last - first)
    if dirty is None:
        return nonzero  # DATA == 1; everything else is unallocated: reads as zeros
    kinds = bytearray(count)
    for ext in client.extents(dirty):
        if ext.flags & nbd.STATE_DIRTY:
            first, last = ext.offset // qcow2.CLUSTER, qcow2.clusters(ext.offset + ext.length)
            kinds[first:last] = bytes(qcow2.DATA if n else qcow2.ZERO for n in nonzero[first:last])
    return kinds


SCRATCH = ".uncompressed"


def scratch_for(dest: Path) -> Path:
    """Where a compressed image's data is written first: beside it."""
    return dest.with_name(f"{dest.stem}{SCRATCH}{dest.suffix}")


def copy_disk(
    client: nbd.Client,
    dest: Path,
    backing: str | None,
    dirty: str | None,
    progress: Callable[[int, int], None] | None = None,
    algorithm: str = qcow2.SHA256,
    compress: Callable[[float], None] | bool = False,
    phases: dict[str, float] | None = None,
) -> tuple[str, int]:
    """Write the export into the new qcow2 ``dest`` (0600, never through a link);
    return its digest in ``algorithm`` and the guest bytes read. ``compress``
    (true, or a callback for the compression's percentage) makes ``dest`` a
    qcow2 with compressed clusters, through a scratch image. ``phases`` gets
    the seconds of each step added (``map``, ``stream``, ``sync``, ``compress``)."""
    phases = {} if phases is None else phases
    if not compress:
        return _write(client, dest, backing, dirty, progress, algorithm, True, phases)
    scratch = scratch_for(dest)
    try:
        _digest, read = _write(client, scratch, backing, dirty, progress, algorithm, False, phases)
        percent = compress if callable(compress) else None
        with timed(phases, "compress"):
            qemuimg.compress(str(scratch), str(dest), backing, progress=percent)
    finally:
        scratch.unlink(missing_ok=True)
    with timed(phases, "sync"):
        return digest_synced(dest, algorithm), read


def digest_synced(path: Path, algorithm: str, chunk: int = CHUNK) -> str:
    """The digest of a file another process wrote, read once, then the file
    synced (a point's images are on disk before its manifest)."""
    digest = new_hash(algorithm)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
        os.fsync(handle.fileno())
    return digest.hexdigest()


def _write(
    client: nbd.Client,
    dest: Path,
    backing: str | None,
    dirty: str | None,
    progress: Callable[[int, int], None] | None,
    algorithm: str,
    final: bool,
    phases: dict[str, float],
) -> tuple[str, int]:
    """The export into ``dest``; a ``final`` image is hashed and synced (its
    writeback started as it is written), a scratch image (read back at once,
    then deleted) neither."""
    with timed(phases, "map"):
        kinds = cluster_map(client, dirty)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with timed(phases, "stream"):
            writer = qcow2.Writer(fd, client.size, kinds, backing, algorithm)
            writer.begin()
            _stream(client, writer, progress, hashed=final, writeback=final)
            digest = writer.finish()
        if final:
            with timed(phases, "sync"):
                os.fsync(fd)
    finally:
        os.close(fd)
    return digest, writer.expected


def _stream(
    client: nbd.Client,
    writer: qcow2.Writer,
    progress: Callable[[int, int], None] | None,
    hashed: bool = True,
    writeback: bool = False,
) -> None:
    """Read (this thread), write (a second) and hash (a third, when ``hashed``),
    in file order; a buffer is read into again only once it is written and hashed.
    With ``writeback`` the writer starts the disk's writes every ``WRITEBACK`` bytes."""
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(BUFFERS):
        free.put(bytearray(CHUNK))
    to_write: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    to_hash: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    failed: list[BaseException] = []

    def write() -> None:
        kicked = pending = 0  # file offsets: written back from, and not yet
        if writeback:
            kicked = pending = os.lseek(writer.fd, 0, os.SEEK_CUR)
        while (item := to_write.get()) is not None:
            try:
                if not failed:
                    writer.write(memoryview(item[0])[: item[1]], digest=False)
                    pending += item[1]
                    if writeback and pending - kicked >= WRITEBACK:
                        start_writeback(writer.fd, kicked, pending - kicked)
                        kicked = pending
            except BaseException as exc:  # handed to the reading thread
                failed.append(exc)
            to_hash.put(item)
        to_hash.put(None)

    def digest() -> None:
        while (item := to_hash.get()) is not None:
            if hashed:
                writer.digest.update(memoryview(item[0])[: item[1]])
            free.put(item[0])

    threads = [
        threading.Thread(target=write, name="backup-writer", daemon=True),
        threading.Thread(target=digest, name="backup-hasher", daemon=True),
    ]
    for thread in threads:
        thread.start()
    done = 0
    try:
        for offset, length in writer.data_ranges():
            end = offset + length
            while offset < end and not failed:
                count = min(CHUNK, end - offset)
                buf = free.get()
                try:
                    client.read(offset, memoryview(buf)[:count])
                except BaseException:
                    free.put(buf)
                    raise
                to_write.put((buf, count))
                offset += count
                done += count
                if progress is not None:
                    progress(done, writer.expected)
            if failed:
                break
    finally:
        to_write.put(None)
        for thread in threads:
            thread.join()
    if failed:
        raise SaltKvmError(f"writing the backup image failed: {failed[0]}") from failed[0]
