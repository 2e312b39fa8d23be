"""A guest's graphical console: VNC (or SPICE) with a per-guest password, on a
listen address of the operator's choosing; where to reach it; a screenshot.

The password lives only in the domain's definition, which libvirt keeps
root-only (``/etc/libvirt/qemu``) and shows only to a full (not read-only)
connection that asks with ``VIR_DOMAIN_XML_SECURE``. salt-kvm never logs it
nor puts it in an event or ``show_instance``; the ``console`` action returns it
to the caller who asked.
"""

from __future__ import annotations

import os
import secrets
import string
import struct
import tempfile
import zlib

import libvirt
from lxml import etree

from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt.checks import plain
from salt_kvm.virt.domain import Domain

# VNC's authentication uses the first 8 characters only: 8, from 62 letters and digits.
PASSWORD_LENGTH = 8
PASSWORD_ALPHABET = string.ascii_letters + string.digits
CONSOLE_TYPES = ("vnc", "spice")
SCREENSHOT_MAX = 256 * 1024 * 1024


def new_password() -> str:
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


def _listen_on(graphics: etree._Element, address: str) -> None:
    for child in graphics.findall("listen") + graphics.findall("gl"):
        graphics.remove(child)
    for attr in ("socket", "listen", "port", "tlsPort", "websocket"):
        graphics.attrib.pop(attr, None)
    graphics.set("autoport", "yes")
    graphics.set("listen", address)
    etree.SubElement(graphics, "listen", type="address", address=address)


def set_consoles(xml: Domain, kind: str | None, listen: str) -> list[str]:
    """Give the domain its console: ``kind`` (vnc, spice) replaces the base's,
    ``none`` removes them, ``None`` keeps the base's. Every console gets a new
    password and listens on ``listen``. Returns the passwords (one per console)."""
    devices = xml._devices()
    if kind is not None:
        for old in devices.findall("graphics"):
            devices.remove(old)
        if kind != "none":
            etree.SubElement(devices, "graphics", type=kind)
    passwords = []
    for graphics in devices.findall("graphics"):
        if graphics.get("type") not in CONSOLE_TYPES:
            continue  # sdl, egl-headless, dbus: local displays, no port to protect
        _listen_on(graphics, listen)
        password = new_password()
        graphics.set("passwd", password)
        passwords.append(password)
    return passwords


def console_info(dom: libvirt.virDomain) -> list[dict]:
    """Each console of a running guest: type, address, port, password. Reads the
    live definition with ``VIR_DOMAIN_XML_SECURE`` (it holds the password): needs
    a read-write connection."""
    if not dom.isActive():
        raise SaltKvmError(f"{dom.name()} is not running: its console has no port")
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
    found = []
    for graphics in xml.node.findall("devices/graphics"):
        kind = graphics.get("type")
        if kind not in CONSOLE_TYPES:
            continue
        listen = graphics.find("listen")
        address = (listen.get("address") if listen is not None else None) or graphics.get("listen")
        found.append(
            {
                "type": kind,
                "address": address or "127.0.0.1",
                "port": int(graphics.get("port") or -1),
                "password": graphics.get("passwd"),
            }
        )
    if not found:
        raise SaltKvmError(f"{dom.name()} has no VNC or SPICE console (profile key graphics)")
    return found


# ---- screenshots ------------------------------------------------------------------


def _ppm_tokens(data: bytes) -> tuple[int, int, int, int]:
    """Width, height, maxval and the offset of the pixels of a binary PPM (P6)."""
    fields: list[int] = []
    pos = 2
    while len(fields) < 3:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        start = pos
        while pos < len(data) and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise SaltKvmError("the screenshot is not a PPM image")
        fields.append(int(data[start:pos]))
    return fields[0], fields[1], fields[2], pos + 1


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def ppm_to_png(data: bytes) -> bytes:
    """QEMU's screendump (PPM, P6, 8 bits) as a PNG: RGB rows, filter 0, zlib."""
    if not data.startswith(b"P6"):
        raise SaltKvmError("the screenshot is not a binary PPM image")
    width, height, maxval, offset = _ppm_tokens(data)
    if maxval != 255 or width <= 0 or height <= 0:
        raise SaltKvmError(f"unexpected screenshot format ({width}x{height}, maxval {maxval})")
    row = width * 3
    pixels = data[offset : offset + row * height]
    if len(pixels) != row * height:
        raise SaltKvmError("the screenshot is truncated")
    raw = b"".join(b"\x00" + pixels[y * row : (y + 1) * row] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def screenshot(dom: libvirt.virDomain, screen: int = 0) -> bytes:
    """The guest's screen as PNG bytes (libvirt's stream; PPM is converted)."""
    if not dom.isActive():
        raise SaltKvmError(f"{dom.name()} is not running: it has no screen")
    stream = dom.connect().newStream(0)
    try:
        mime = dom.screenshot(stream, screen, 0)
        chunks, size = [], 0
        while True:
            chunk = stream.recv(1024 * 1024)
            if not isinstance(chunk, bytes) or not chunk:
                break
            size += len(chunk)
            if size > SCREENSHOT_MAX:
                raise SaltKvmError("the screenshot is larger than 256 MiB: refused")
            chunks.append(chunk)
        stream.finish()
    except BaseException:
        try:
            stream.abort()
        except libvirt.libvirtError:
            pass
        raise
    data = b"".join(chunks)
    if mime == "image/png" or data.startswith(b"\x89PNG"):
        return data
    return ppm_to_png(data)


def check_file_path(path: str) -> None:
    """A path an operator typed or templated: a name with surrounding spaces
    or a control character (``$(mktemp)``'s trailing newline) is refused by
    name rather than made into a file beside the one looked for."""
    plain(path, "path")
    if any(part != part.strip() for part in path.split("/")):
        raise SpecError(
            "path", f"{path!r} has a name with surrounding whitespace", "a file path without it"
        )


def write_new_file(path: str, data: bytes, overwrite: bool = False) -> str:
    """Write ``data`` to ``path`` as this process's user, mode 0600, never through a
    link planted at ``path``: a temporary file in the same folder, then linked
    (refused if ``path`` exists) or, with ``overwrite``, renamed over it (a link
    there is replaced, not followed). Returns the absolute path."""
    check_file_path(path)
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise SpecError("path", f"{folder} is not a directory", "a path in an existing folder")
    if os.path.lexists(path) and not overwrite:
        raise SpecError("path", f"{path} exists", "a new file name, or overwrite=true")
    if os.path.isdir(path):
        raise SpecError("path", f"{path} is a directory", "a file name")
    fd, tmp = tempfile.mkstemp(prefix=".screenshot-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise SpecError(
                    "path", f"{path} exists", "a new file name, or overwrite=true"
                ) from None
            os.unlink(tmp)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path
