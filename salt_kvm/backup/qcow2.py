"""Writing a qcow2 v3 image front to back in one pass, hashing it as it goes.

A point's checksum is a digest (sha256 or BLAKE2b) of its image file's bytes. Written by QEMU or
qemu-img, the file had to be read again to get it; laid out here, every byte
of the file is known in file order before it is written: the header (with the
backing file an incremental follows), the refcount table and blocks, the L1
and L2 tables (all computed from the map of clusters, known up front from the
export's block status), then the data clusters in the guest's order. So the
file is written sequentially and hashed while it is written; nothing is read
back. ``qemu-img check`` reads its metadata afterwards, as for any point.

Clusters are 64 KiB; a cluster is ``DATA`` (stored), ``ZERO`` (reads as zeros
whatever the backing file holds: qcow2 v3's zero flag, nothing stored) or
``UNALLOCATED`` (reads from the backing file, or as zeros without one).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator

from salt_kvm.backup.manifest import SHA256, new_hash
from salt_kvm.errors import SaltKvmError

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
REFCOUNTS_PER_BLOCK = CLUSTER // 2  # 16-bit refcounts (refcount_order 4)
MAGIC = 0x514649FB
HEADER_LENGTH = 104
EXT_BACKING_FORMAT = 0xE2792ACA
COPIED = 1 << 63
ZERO_FLAG = 1

UNALLOCATED, DATA, ZERO = 0, 1, 2
RUN_RE = {DATA: re.compile(rb"\x01+"), ZERO: re.compile(rb"\x02+")}


def clusters(size: int) -> int:
    return -(-size // CLUSTER)


def _runs(kinds: bytes | bytearray, kind: int) -> Iterator[tuple[int, int]]:
    for found in RUN_RE[kind].finditer(kinds):
        yield found.start(), found.end() - found.start()


class Writer:
    """``kinds``: one byte per cluster of a ``size``-byte disk (``DATA``, ``ZERO``
    or ``UNALLOCATED``). Create the file, then ``write`` exactly the guest's
    bytes of every ``DATA`` cluster in order (the last cluster's may stop at
    ``size``), then ``finish`` for the file's digest in ``algorithm``."""

    def __init__(
        self,
        fd: int,
        size: int,
        kinds: bytes | bytearray,
        backing: str | None = None,
        algorithm: str = SHA256,
    ):
        if len(kinds) != clusters(size):
            raise SaltKvmError(f"a map of {len(kinds)} clusters for a disk of {size} bytes")
        self.fd, self.size, self.kinds, self.backing = fd, size, kinds, backing
        self.digest = new_hash(algorithm)
        self.data_clusters = kinds.count(DATA)
        self.l1_entries = max(1, -(-len(kinds) // L2_ENTRIES))
        self.l2_used = [
            j
            for j in range(self.l1_entries)
            if kinds[j * L2_ENTRIES : (j + 1) * L2_ENTRIES].strip(b"\x00")
        ]
        l1_clusters = -(-self.l1_entries * 8 // CLUSTER)
        fixed = 1 + l1_clusters + len(self.l2_used) + self.data_clusters
        blocks, table = 1, 1
        while True:  # the refcount structures count themselves
            total = fixed + blocks + table
            need_blocks = -(-total // REFCOUNTS_PER_BLOCK)
            need_table = -(-need_blocks * 8 // CLUSTER)
            if (need_blocks, need_table) == (blocks, table):
                break
            blocks, table = need_blocks, need_table
        self.total = total
        self.refcount_table = 1
        self.refcount_blocks = self.refcount_table + table
        self.table_clusters = table
        self.l1 = self.refcount_blocks + blocks
        self.l1_clusters = l1_clusters
        self.l2 = self.l1 + l1_clusters
        self.data = self.l2 + len(self.l2_used)
        self.expected = self._data_bytes()
        self.written = 0

    def _data_bytes(self) -> int:
        tail = self.size - (len(self.kinds) - 1) * CLUSTER if self.kinds else 0
        count = self.data_clusters * CLUSTER
        if self.kinds and self.kinds[-1] == DATA:
            count -= CLUSTER - tail
        return count

    @property
    def file_size(self) -> int:
        return self.total * CLUSTER

    # ---- output --------------------------------------------------------------------
    def _out(self, data: bytes | bytearray | memoryview, digest: bool = True) -> None:
        view = memoryview(data)
        if digest:
            self.digest.update(view)
        while view:
            done = os.write(self.fd, view)
            view = view[done:]

    def _header(self) -> bytes:
        backing = self.backing.encode() if self.backing else b""
        ext = b""
        if backing:
            fmt = b"qcow2"
            ext += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt.ljust(8, b"\x00")
        ext += struct.pack(">II", 0, 0)
        backing_offset = HEADER_LENGTH + len(ext) if backing else 0
        if len(backing) > 1023:
            raise SaltKvmError(f"backing file name {self.backing!r} is too long")
        header = struct.pack(
            ">IIQIIQIIQQIIQQQQII",
            MAGIC,
            3,
            backing_offset,
            len(backing),
            CLUSTER_BITS,
            self.size,
            0,  # no encryption
            self.l1_entries,
            self.l1 * CLUSTER,
            self.refcount_table * CLUSTER,
            self.table_clusters,
            0,  # no snapshots
            0,
            0,  # incompatible features
            0,  # compatible features
            0,  # autoclear features
            4,  # 16-bit refcounts
            HEADER_LENGTH,
        )
        return (header + ext + backing).ljust(CLUSTER, b"\x00")

    def _refcounts(self) -> Iterator[bytes | bytearray]:
        blocks = self.l1 - self.refcount_blocks
        table = bytearray(self.table_clusters * CLUSTER)
        for i in range(blocks):
            struct.pack_into(">Q", table, i * 8, (self.refcount_blocks + i) * CLUSTER)
        yield table
        one = struct.pack(">H", 1)
        for i in range(blocks):
            used = min(REFCOUNTS_PER_BLOCK, self.total - i * REFCOUNTS_PER_BLOCK)
            yield (one * used).ljust(CLUSTER, b"\x00")

    def _tables(self) -> Iterator[bytes | bytearray]:
        l1 = bytearray(self.l1_clusters * CLUSTER)
        for n, j in enumerate(self.l2_used):
            struct.pack_into(">Q", l1, j * 8, ((self.l2 + n) * CLUSTER) | COPIED)
        yield l1
        host = self.data
        for j in self.l2_used:
            table = bytearray(CLUSTER)
            part = self.kinds[j * L2_ENTRIES : (j + 1) * L2_ENTRIES]
            for start, count in sorted(list(_runs(part, DATA)) + list(_runs(part, ZERO))):
                if part[start] == ZERO:
                    struct.pack_into(f">{count}Q", table, start * 8, *([ZERO_FLAG] * count))
                    continue
                entries = [((host + k) * CLUSTER) | COPIED for k in range(count)]
                struct.pack_into(f">{count}Q", table, start * 8, *entries)
                host += count
            yield table

    def begin(self) -> None:
        """Write everything before the data clusters."""
        self._out(self._header())
        for part in self._refcounts():
            self._out(part)
        for part in self._tables():
            self._out(part)

    def write(self, data: bytes | bytearray | memoryview, digest: bool = True) -> None:
        """The next bytes of the data clusters, in the guest's order; with
        ``digest=False`` the caller hands the same bytes, in the same order, to
        ``self.digest.update`` itself (in another thread) before ``finish``."""
        if self.written + len(data) > self.expected:
            raise SaltKvmError("more data than the image's map holds")
        self._out(data, digest)
        self.written += len(data)

    def finish(self) -> str:
        if self.written != self.expected:
            raise SaltKvmError(f"{self.written} bytes of data written, {self.expected} expected")
        pad = self.file_size - (self.data * CLUSTER + self.written)
        if pad:
            self._out(bytes(pad))  # the last cluster, past the disk's end
        return self.digest.hexdigest()

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        """The guest's byte ranges to ``write``, in order: (offset, length)."""
        for start, count in _runs(self.kinds, DATA):
            offset = start * CLUSTER
            yield offset, min(count * CLUSTER, self.size - offset)
