"""libvirt connections and what the hypervisor behind one can do."""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import Iterator

import libvirt
from lxml import etree

from salt_kvm import redact
from salt_kvm.errors import SaltKvmError
from salt_kvm.virt.choices import (  # noqa: F401 - re-exported: the names' old home
    DEFAULT_URI,
    VIRT_AUTO,
    VIRT_KVM,
    VIRT_QEMU,
    VIRT_TYPES,
    check_virt_type,
)

log = logging.getLogger(__name__)


def _silence_libvirt_stderr() -> None:
    # libvirt prints every error to stderr by default; we raise them instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_silence_libvirt_stderr()


def open_connection(
    uri: str = DEFAULT_URI, username: str | None = None, password: str | None = None
) -> libvirt.virConnect:
    """Open ``uri``; with credentials, answer libvirt's auth callbacks with them."""
    try:
        if username is None and password is None:
            return libvirt.open(uri)

        def answer(creds, _data):
            for cred in creds:
                if cred[0] == libvirt.VIR_CRED_AUTHNAME:
                    cred[4] = username
                elif cred[0] == libvirt.VIR_CRED_PASSPHRASE:
                    cred[4] = password
            return 0

        auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], answer, None]
        return libvirt.openAuth(uri, auth, 0)
    except libvirt.libvirtError as exc:
        message = f"cannot connect to libvirt at {uri!r}: {exc}"
        raise SaltKvmError(redact.text(message, [password])) from exc


def remote_host(conn: libvirt.virConnect) -> str | None:
    """The host a connection's URI names when it is not this one (``qemu+ssh://hv1/system``),
    else None: files, kernel tables and paths are then out of this process's reach."""
    host = urllib.parse.urlparse(conn.getURI()).hostname
    return None if host in (None, "", "localhost", "127.0.0.1", "::1") else host


@contextlib.contextmanager
def connected(uri: str = DEFAULT_URI, **auth: str | None) -> Iterator[libvirt.virConnect]:
    conn = open_connection(uri, **auth)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def kvm_available(conn: libvirt.virConnect) -> bool:
    """Whether libvirt offers hardware acceleration (``type='kvm'``) for x86_64 guests.

    Read from the host's capabilities (a guest of arch x86_64 with a ``kvm``
    domain), as virt-manager does: domain capabilities asked for ``kvm`` are
    not a test, some drivers (libvirt 11's test driver) answer for any type.
    """
    try:
        caps = etree.fromstring(conn.getCapabilities().encode())
    except (libvirt.libvirtError, etree.XMLSyntaxError):
        return False
    return any(
        arch.get("name") == "x86_64" and arch.find(f"domain[@type='{VIRT_KVM}']") is not None
        for arch in caps.findall("guest/arch")
    )
