"""A small NBD client: what a backup needs from libvirt's pull-mode export.

python3-libnbd is a Debian package, not on PyPI, so a onedir Salt cannot
import it; the protocol subset a backup uses is small: the fixed newstyle
handshake, ``NBD_OPT_SET_META_CONTEXT`` (``base:allocation`` and
``qemu:dirty-bitmap:NAME``), ``NBD_OPT_GO``, structured replies,
``NBD_CMD_READ`` and ``NBD_CMD_BLOCK_STATUS``. One request at a time.

The server is QEMU, which runs a hostile guest: whatever it sends is checked
against what was asked (sizes, offsets, lengths, reply types) before it is
used, and every length it names is bounded, so a confused or subverted server
gives an error, never an unbounded allocation or a write outside a buffer.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from salt_kvm.errors import SaltKvmError

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0

CMD_READ = 0
CMD_DISC = 2
CMD_BLOCK_STATUS = 7

REPLY_FLAG_DONE = 1
REPLY_NONE = 0
REPLY_OFFSET_DATA = 1
REPLY_OFFSET_HOLE = 2
REPLY_BLOCK_STATUS = 5
REPLY_ERROR_BIT = 1 << 15

STATE_HOLE = 1  # base:allocation
STATE_ZERO = 2  # base:allocation: reads as zeros
STATE_DIRTY = 1  # qemu:dirty-bitmap:NAME

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP = "qemu:dirty-bitmap:"

MAX_OPTION_REPLY = 64 * 1024  # an option reply's payload (names, infos)
MAX_READ = 32 * 1024 * 1024  # QEMU's own maximum request
MAX_STATUS = 1024 * 1024 * 1024  # one block-status request (QEMU answers in part)
MAX_STATUS_REPLY = 2 * 1024 * 1024  # a block-status chunk's payload
MAX_ERROR_REPLY = 4096
MAX_EXPORT_SIZE = 1 << 50  # 1 PiB: a larger disk is not a disk of this host
TIMEOUT = 300.0


class NbdError(SaltKvmError):
    """The NBD server refused a request or broke the protocol."""


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    flags: int


def dirty_bitmap(name: str) -> str:
    return f"{DIRTY_BITMAP}{name}"


class Client:
    """One export of an NBD server on a unix socket."""

    def __init__(
        self, path: str, export: str, contexts: tuple[str, ...] = (), timeout: float = TIMEOUT
    ):
        self.export = export
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.contexts: dict[str, int] = {}
        self.size = 0
        self._cookie = 0
        try:
            self.sock.connect(path)
            self._handshake(contexts)
        except OSError as exc:
            self.sock.close()
            raise NbdError(f"NBD export {export!r} at {path}: {exc}") from exc
        except BaseException:
            self.sock.close()
            raise

    # ---- plumbing ------------------------------------------------------------------
    def _recv(self, count: int) -> bytes:
        buf = bytearray(count)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        while view:
            got = self.sock.recv_into(view)
            if not got:
                raise NbdError(f"NBD export {self.export!r}: the server closed the connection")
            view = view[got:]

    def _skip(self, count: int) -> None:
        while count:
            count -= len(self._recv(min(count, 65536)))

    # ---- handshake -----------------------------------------------------------------
    def _handshake(self, contexts: tuple[str, ...]) -> None:
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("not an NBD server with the fixed newstyle handshake")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        self._option(OPT_STRUCTURED_REPLY, b"")
        self._expect_ack(OPT_STRUCTURED_REPLY)
        if contexts:
            self._set_meta_context(contexts)
        self._go()

    def _option(self, option: int, data: bytes) -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, kind, length = struct.unpack(">QIII", self._recv(20))
        if magic != REPLY_MAGIC or opt != option:
            raise NbdError(f"option {option}: a reply that does not answer it")
        if length > MAX_OPTION_REPLY:
            raise NbdError(
                f"option {option}: a reply of {length} bytes (at most {MAX_OPTION_REPLY})"
            )
        data = self._recv(length)
        if kind & REP_ERROR_BIT:
            message = data.decode("utf-8", "replace")[:200]
            raise NbdError(f"NBD export {self.export!r}: option {option} refused: {message}")
        return kind, data

    def _expect_ack(self, option: int) -> None:
        kind, _data = self._option_reply(option)
        if kind != REP_ACK:
            raise NbdError(f"option {option}: reply type {kind}, not an acknowledgement")

    def _set_meta_context(self, contexts: tuple[str, ...]) -> None:
        name = self.export.encode()
        queries = b"".join(struct.pack(">I", len(c.encode())) + c.encode() for c in contexts)
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts)) + queries
        self._option(OPT_SET_META_CONTEXT, data)
        while True:
            kind, reply = self._option_reply(OPT_SET_META_CONTEXT)
            if kind == REP_ACK:
                break
            if kind != REP_META_CONTEXT or len(reply) < 4:
                raise NbdError(f"meta context: unexpected reply type {kind}")
            (cid,) = struct.unpack(">I", reply[:4])
            found = reply[4:].decode("utf-8", "replace")
            if found not in contexts:
                raise NbdError(f"meta context: the server chose {found!r}, not asked for")
            self.contexts[found] = cid
        missing = [c for c in contexts if c not in self.contexts]
        if missing:
            raise NbdError(f"NBD export {self.export!r} has no {', '.join(missing)}")

    def _go(self) -> None:
        name = self.export.encode()
        self._option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        size = None
        while True:
            kind, data = self._option_reply(OPT_GO)
            if kind == REP_ACK:
                break
            if kind != REP_INFO or len(data) < 2:
                raise NbdError(f"go: unexpected reply type {kind}")
            if struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                if len(data) != 12:
                    raise NbdError("go: a malformed export info")
                size = struct.unpack(">QH", data[2:])[0]
        if size is None or size > MAX_EXPORT_SIZE:
            raise NbdError(f"NBD export {self.export!r}: no usable size ({size})")
        self.size = size

    # ---- transmission --------------------------------------------------------------
    def _request(self, command: int, offset: int, length: int) -> int:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise NbdError(f"a request for {length} bytes at {offset} leaves the export")
        self._cookie += 1
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, self._cookie, offset, length)
        self.sock.sendall(header)
        return self._cookie

    def _chunk(self, cookie: int) -> tuple[int, int, int]:
        """The next reply header: (flags, type, payload length); a simple reply
        (only for an error here) raises."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, got = struct.unpack(">IQ", self._recv(12))
            if got != cookie:
                raise NbdError("a reply to a request never made")
            if error:
                raise NbdError(f"NBD export {self.export!r}: error {error}")
            raise NbdError("a simple reply where a structured one was negotiated")
        if magic != STRUCTURED_REPLY_MAGIC:
            raise NbdError(f"a reply with magic {magic:#x}")
        flags, kind, got, length = struct.unpack(">HHQI", self._recv(16))
        if got != cookie:
            raise NbdError("a reply to a request never made")
        if kind & REPLY_ERROR_BIT:
            if length < 6 or length > MAX_ERROR_REPLY:
                raise NbdError(f"an error reply of {length} bytes")
            data = self._recv(length)
            error, size = struct.unpack(">IH", data[:6])
            message = data[6 : 6 + size].decode("utf-8", "replace")[:200]
            raise NbdError(f"NBD export {self.export!r}: error {error}: {message}")
        return flags, kind, length

    def read(self, offset: int, into: memoryview) -> None:
        """Fill ``into`` with the export's bytes from ``offset``."""
        length = len(into)
        if length > MAX_READ:
            raise NbdError(f"a read of {length} bytes (at most {MAX_READ})")
        cookie = self._request(CMD_READ, offset, length)
        covered = 0
        while True:
            flags, kind, size = self._chunk(cookie)
            if kind == REPLY_OFFSET_DATA:
                if size < 8:
                    raise NbdError("a data chunk without an offset")
                (start,) = struct.unpack(">Q", self._recv(8))
                rel, count = start - offset, size - 8
                if rel < 0 or count <= 0 or rel + count > length:
                    raise NbdError("a data chunk outside the request")
                self._recv_into(into[rel : rel + count])
                covered += count
            elif kind == REPLY_OFFSET_HOLE:
                if size != 12:
                    raise NbdError("a malformed hole chunk")
                start, count = struct.unpack(">QI", self._recv(12))
                rel = start - offset
                if rel < 0 or count <= 0 or rel + count > length:
                    raise NbdError("a hole chunk outside the request")
                into[rel : rel + count] = bytes(count)
                covered += count
            elif kind == REPLY_NONE and size == 0:
                pass
            else:
                raise NbdError(f"a read answered with chunk type {kind}")
            if flags & REPLY_FLAG_DONE:
                break
        if covered != length:
            raise NbdError(f"a read of {length} bytes answered with {covered}")

    def block_status(self, context: str, offset: int, length: int) -> list[Extent]:
        """The extents of ``context`` from ``offset``: at least one, contiguous,
        within the request (the server may describe less than asked)."""
        cid = self.contexts[context]
        length = min(length, MAX_STATUS, self.size - offset)
        cookie = self._request(CMD_BLOCK_STATUS, offset, length)
        found: list[Extent] = []
        while True:
            flags, kind, size = self._chunk(cookie)
            if kind == REPLY_BLOCK_STATUS:
                if size < 12 or (size - 4) % 8 or size > MAX_STATUS_REPLY:
                    raise NbdError(f"a block-status chunk of {size} bytes")
                data = self._recv(size)
                if struct.unpack(">I", data[:4])[0] == cid:
                    found = self._extents(data[4:], offset, length)
            elif not (kind == REPLY_NONE and size == 0):
                raise NbdError(f"a block status answered with chunk type {kind}")
            if flags & REPLY_FLAG_DONE:
                break
        if not found:
            raise NbdError(f"no block status for {context}")
        return found

    @staticmethod
    def _extents(data: bytes, offset: int, length: int) -> list[Extent]:
        extents = []
        at, end = offset, offset + length
        for count, flags in struct.iter_unpack(">II", data):
            if count == 0:
                raise NbdError("an extent of length 0")
            count = min(count, end - at)  # the last may reach past the request
            extents.append(Extent(at, count, flags))
            at += count
            if at >= end:
                break
        return extents

    def extents(self, context: str, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Every extent of ``context`` over a range (default: the whole export)."""
        end = self.size if length is None else offset + length
        found: list[Extent] = []
        at = offset
        while at < end:
            part = self.block_status(context, at, end - at)
            found += part
            at = part[-1].offset + part[-1].length
        return found

    def close(self) -> None:
        try:
            self._cookie += 1
            header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self._cookie, 0, 0)
            self.sock.sendall(header)
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
