"""Reading a disk image from a URL or a file: checksums, decompression, format.

Pure byte work, no libvirt: ``images`` streams what this yields into the pool.
The checksum a profile gives is compared with the bytes as served (what
``sha256sum file.qcow2.xz`` prints) and, for a compressed download, with the
decompressed image too: a match with either is accepted.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import itertools
import logging
import lzma
import os
import struct
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from salt_kvm import redact
from salt_kvm.errors import SaltKvmError, SpecError

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# Enough for every magic number below (a VDI's is at 0x40) and the qcow2 header.
HEAD_SIZE = 64 * 1024
# Bounds what one compressed chunk may expand to (an image is mostly zeros).
MAX_OUTPUT = 4 * 1024 * 1024
RETRIES = 3

ALGORITHMS = {"sha256": 64, "sha512": 128, "md5": 32}
ACCEPTED_CHECKSUM = "sha256:<64 hex digits>, sha512:<128 hex digits> or md5:<32 hex digits>"
FORMATS = ("qcow2", "raw")
FORMAT_CHOICES = ("auto", *FORMATS)
# Formats recognised by their magic number, refused with a conversion hint.
_MAGIC = (
    (0, b"QFI\xfb", "qcow2"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"QED\x00", "qed"),
)
_COMPRESSION_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"))
QCOW2_EXTERNAL_DATA_FILE = 1 << 2


class ChecksumMismatch(SaltKvmError):
    """The downloaded image is not the one the profile names."""


@dataclass(frozen=True)
class Checksum:
    algorithm: str
    digest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.digest}"


def parse_checksum(value: object, key: str = "image_checksum") -> Checksum:
    if not isinstance(value, str):
        raise SpecError(key, f"{value!r} is not a checksum", ACCEPTED_CHECKSUM)
    algorithm, sep, digest = value.strip().partition(":")
    algorithm, digest = algorithm.strip().lower(), digest.strip().lower()
    if not sep or algorithm not in ALGORITHMS:
        raise SpecError(key, f"{value!r} does not start with its algorithm", ACCEPTED_CHECKSUM)
    if len(digest) != ALGORITHMS[algorithm] or any(c not in "0123456789abcdef" for c in digest):
        raise SpecError(
            key,
            f"{digest!r} is not a {algorithm} digest ({ALGORITHMS[algorithm]} hex digits)",
            ACCEPTED_CHECKSUM,
        )
    return Checksum(algorithm, digest)


# ---- formats ---------------------------------------------------------------


def detect_format(head: bytes) -> str:
    """The image format its first bytes announce; ``raw`` when none does."""
    for offset, magic, fmt in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return fmt
    return "raw"


def check_image(head: bytes, wanted: str = "auto") -> str:
    """The format to store the image as; refuses what must not reach qemu.

    A qcow2 naming a backing file or an external data file would make qemu open
    a path of the image's choosing on the hypervisor: such images are refused.
    ``wanted`` (the profile's ``image_format``) must agree with the content, so a
    raw image cannot be taken for a qcow2 or the other way round.
    """
    fmt = detect_format(head)
    if fmt not in FORMATS:
        raise SpecError(
            "image_format",
            f"the image is {fmt}, which salt-kvm does not store; convert it first "
            f"(qemu-img convert -O qcow2 IMAGE IMAGE.qcow2)",
            FORMATS,
        )
    if wanted not in ("auto", fmt):
        raise SpecError("image_format", f"the image is {fmt}, not {wanted}", ("auto", fmt))
    if fmt == "qcow2":
        version, backing_offset = struct.unpack(">IQ", head[4:16])
        if backing_offset:
            raise SaltKvmError(
                "image: the qcow2 names a backing file; only self-contained images are used "
                "(qemu-img convert -O qcow2 IMAGE FLAT.qcow2 makes one)"
            )
        if version >= 3 and len(head) >= 80:
            (incompatible,) = struct.unpack(">Q", head[72:80])
            if incompatible & QCOW2_EXTERNAL_DATA_FILE:
                raise SaltKvmError("image: the qcow2 keeps its data in an external file")
    return fmt


# ---- decompression ---------------------------------------------------------


def _peek(chunks: Iterator[bytes], size: int) -> tuple[bytes, Iterator[bytes]]:
    """The first ``size`` bytes (fewer at the end), and an iterator over all."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= size:
            break
    return head, itertools.chain([head] if head else [], chunks)


def head_of(chunks: Iterator[bytes], size: int = HEAD_SIZE) -> tuple[bytes, Iterator[bytes]]:
    return _peek(chunks, size)


def compression_of(head: bytes) -> str | None:
    for magic, kind in _COMPRESSION_MAGIC:
        if head.startswith(magic):
            return kind
    return None


def _decompressor(kind: str):
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    return lzma.LZMADecompressor()


def _drain(dec, data: bytes, kind: str) -> Iterator[bytes]:
    """Feed ``data``; yield output in bounded pieces."""
    while True:
        out = dec.decompress(data, MAX_OUTPUT)
        if out:
            yield out
        if kind == "gzip":
            data = dec.unconsumed_tail
            if not data:
                return
        else:
            data = b""
            if dec.eof or dec.needs_input:
                return


def decompressed(chunks: Iterator[bytes]) -> tuple[str | None, Iterator[bytes]]:
    """Detect gzip or xz from the first bytes and decompress while streaming;
    anything else passes through. Concatenated members/streams are followed."""
    head, chunks = _peek(chunks, 8)
    kind = compression_of(head)
    if kind is None:
        return None, chunks

    def stream() -> Iterator[bytes]:
        dec = _decompressor(kind)
        for chunk in chunks:
            while chunk:
                yield from _drain(dec, chunk, kind)
                chunk = dec.unused_data if dec.eof else b""
                if chunk:
                    dec = _decompressor(kind)  # the next gzip member / xz stream
        if not dec.eof:
            raise SaltKvmError(f"image: the {kind} data ends before its end marker (truncated)")

    return kind, stream()


# ---- digests ---------------------------------------------------------------


class Digests:
    """The profile's algorithm over the bytes as served and as decompressed."""

    def __init__(self, checksum: Checksum | None):
        self.checksum = checksum
        new = (lambda: hashlib.new(checksum.algorithm)) if checksum else (lambda: None)
        self.served, self.image = new(), new()

    def wrap(self, chunks: Iterable[bytes], which: str) -> Iterator[bytes]:
        digest = getattr(self, which)
        for chunk in chunks:
            if digest is not None:
                digest.update(chunk)
            yield chunk

    def verify(self, compressed: bool) -> None:
        if self.checksum is None:
            return
        assert self.served is not None and self.image is not None  # made with the checksum
        got = {self.served.hexdigest()}
        if compressed:
            got.add(self.image.hexdigest())
        if self.checksum.digest not in got:
            raise ChecksumMismatch(
                f"image_checksum: the download's {self.checksum.algorithm} is "
                f"{self.served.hexdigest()}, the profile expects {self.checksum.digest}; "
                "nothing was kept"
            )


# ---- sources ---------------------------------------------------------------


@dataclass
class Source:
    """Where an image comes from: ``size`` (if known) and a ``validator`` that
    changes when the content does (ETag/Last-Modified, or size and mtime)."""

    location: str
    size: int | None
    validator: str | None
    chunks: Callable[[], Iterator[bytes]]


def local_path(location: str) -> str | None:
    """The file path of ``location`` (a path or file:// URL), else None."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        return urllib.parse.unquote(parsed.path)
    if parsed.scheme == "" and location.startswith("/"):
        return location
    return None


def open_source(location: str, timeout: float = 60) -> Source:
    path = local_path(location)
    if path is not None:
        return _file_source(location, path)
    return _http_source(location, timeout)


def _file_source(location: str, path: str) -> Source:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SaltKvmError(f"image: cannot read {path!r}: {exc.strerror}") from exc

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as handle:
            while data := handle.read(CHUNK):
                yield data

    return Source(location, st.st_size, f"{st.st_size}:{st.st_mtime_ns}", chunks)


def _http_error(url: str, exc: Exception) -> SaltKvmError:
    shown = redact.url(url)
    if isinstance(exc, urllib.error.HTTPError):
        return SaltKvmError(f"image: {shown} answered {exc.code} {exc.reason}")
    return SaltKvmError(f"image: cannot download {shown}: {redact.text(str(exc), _userinfo(url))}")


def _userinfo(url: str) -> list[str]:
    parts = urllib.parse.urlsplit(url)
    return [s for s in (parts.username, parts.password, parts.query) if s]


def _request(url: str, method: str = "GET", headers: dict | None = None) -> urllib.request.Request:
    """A request for ``url``; its userinfo (``user:password@``) becomes HTTP basic
    authentication (urllib would take it for part of the host name)."""
    parts = urllib.parse.urlsplit(url)
    auth = None
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        netloc = parts.netloc.rpartition("@")[2]
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    request = urllib.request.Request(url, method=method, headers=headers or {})
    if auth:
        # Unredirected: a redirect to another host does not get the credentials.
        request.add_unredirected_header("Authorization", auth)
    return request


def _http_source(url: str, timeout: float) -> Source:
    try:
        head = _request(url, method="HEAD")
        with urllib.request.urlopen(head, timeout=timeout) as resp:
            headers = resp.headers
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise _http_error(url, exc) from exc
        # No HEAD (405/501), or a URL signed for GET only (403): the GET tells.
        log.debug(
            "image %s: HEAD answered %s; downloading without a validator",
            redact.url(url),
            exc.code,
        )
        headers = {}
    except (OSError, http.client.HTTPException) as exc:
        raise _http_error(url, exc) from exc
    length = headers.get("Content-Length")
    validator = headers.get("ETag") or headers.get("Last-Modified")
    size = int(length) if length and length.isdigit() else None
    return Source(url, size, validator, lambda: _http_chunks(url, size, validator, timeout))


def _http_chunks(url: str, size: int | None, validator: str | None, timeout: float):
    """GET ``url``; an interrupted transfer resumes with a Range request (when
    the server names a validator, If-Range makes sure the content is the same)."""
    offset, failures = 0, 0
    while True:
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator
        try:
            with urllib.request.urlopen(_request(url, headers=headers), timeout=timeout) as resp:
                if offset and resp.status != 206:
                    raise SaltKvmError(
                        f"image: {redact.url(url)} cannot resume at byte {offset} (the server "
                        "sent the whole file or it changed); start again"
                    )
                while data := resp.read(CHUNK):
                    offset += len(data)
                    yield data
            if size is None or offset >= size:
                return
            raise http.client.IncompleteRead(b"", size - offset)
        except urllib.error.HTTPError as exc:
            raise _http_error(url, exc) from exc
        except (OSError, http.client.HTTPException) as exc:
            failures += 1
            if failures > RETRIES or not size:
                raise _http_error(url, exc) from exc
            log.warning(
                "image %s: interrupted at byte %d (%s); resuming", redact.url(url), offset, exc
            )
