"""virtiofs: the domain's ``<filesystem>`` devices and shared memory, and what
the hypervisor can share with them.

libvirt starts one virtiofsd per share (as root) and finds it through the
vhost-user descriptors QEMU's interop spec defines (``"type": "fs"``), the
same way as this module does: a host without one cannot start the guest.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

import libvirt
from lxml import etree

from salt_kvm.errors import SpecError
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.xmlmodel import XMLFlag, XMLObject, XMLProperty, parse

# Lowest priority first: a file of the same name in a later directory
# replaces an earlier one (QEMU's firmware/vhost-user interop rule).
DESCRIPTOR_DIRS = ("/usr/share/qemu/vhost-user", "/etc/qemu/vhost-user")
PACKAGE = "virtiofsd"
# libvirt refused <readonly/> on virtiofs before 11.0.0 (its NEWS: "virtiofs:
# Allow read only mode"); since then it passes --readonly to virtiofsd.
READONLY_LIBVIRT = 11_000_000
INSTALL = (
    f"install the package {PACKAGE} (Debian 13, Ubuntu 24.04: virtiofsd; Debian 12: "
    "scripts/setup-host with SALT_KVM_GUEST_FEATURES=1 names QEMU 7.2's to libvirt), "
    "or leave shares out"
)


class Filesystem(XMLObject):
    """``<filesystem type='mount'>`` with the virtiofs driver."""

    TAG = "filesystem"
    DRIVER = "virtiofs"

    type = XMLProperty("./@type")
    accessmode = XMLProperty("./@accessmode")
    driver_type = XMLProperty("./driver/@type")
    source_dir = XMLProperty("./source/@dir")
    tag = XMLProperty("./target/@dir")
    readonly = XMLFlag("readonly")

    @classmethod
    def new(cls, source: str, tag: str, readonly: bool) -> Filesystem:
        fs = cls(etree.Element(cls.TAG, type="mount", accessmode="passthrough"))
        fs.driver_type = cls.DRIVER
        fs.source_dir = source
        fs.tag = tag
        fs.readonly = readonly
        return fs


@dataclass(frozen=True)
class Share:
    """One share as the domain gets it: the host's real path."""

    source: str
    tag: str
    readonly: bool


def filesystems(xml: Domain) -> list[Filesystem]:
    found = xml._devices().findall(Filesystem.TAG)
    return [fs for fs in map(Filesystem, found) if fs.driver_type == Filesystem.DRIVER]


def share_memory(xml: Domain) -> None:
    """vhost-user needs guest memory the daemon can map: ``<access
    mode='shared'/>``, backed by memfd unless the base chose a source
    (hugepages or a file) already."""
    backing = xml.node.find("memoryBacking")
    if backing is None:
        backing = etree.Element("memoryBacking")
        # After <currentMemory>/<memory> as libvirt writes it (order is cosmetic).
        anchor = xml.node.find("currentMemory")
        anchor = anchor if anchor is not None else xml.node.find("memory")
        if anchor is not None:
            anchor.addnext(backing)
        else:
            xml.node.append(backing)
    if backing.find("source") is None and backing.find("hugepages") is None:
        etree.SubElement(backing, "source", type="memfd")
    access = backing.find("access")
    if access is None:
        access = etree.SubElement(backing, "access")
    access.set("mode", "shared")


def add_shares(xml: Domain, shares: Iterable[Share]) -> None:
    shares = list(shares)
    if not shares:
        return
    share_memory(xml)
    devices = xml._devices()
    for share in shares:
        devices.append(Filesystem.new(share.source, share.tag, share.readonly).node)


# ---- what the host can do ------------------------------------------------------


def find_daemon(dirs: Iterable[str] | None = None) -> str | None:
    """The virtiofsd libvirt would run: the binary of the first ``fs``
    descriptor (by file name, a later directory's file replacing an earlier
    one's), when it is an executable file."""
    files: dict[str, str] = {}
    for folder in DESCRIPTOR_DIRS if dirs is None else dirs:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if name.endswith(".json"):
                files[name] = os.path.join(folder, name)
    for name in sorted(files):
        try:
            with open(files[name], encoding="utf-8") as handle:
                descriptor = json.load(handle)
        except (OSError, ValueError):
            continue
        if not isinstance(descriptor, dict) or descriptor.get("type") != "fs":
            continue
        binary = descriptor.get("binary")
        if isinstance(binary, str) and os.path.isfile(binary) and os.access(binary, os.X_OK):
            return binary
    return None


def has_readonly(binary: str) -> bool:
    """Whether ``binary`` takes ``--readonly``, which libvirt passes for
    ``<readonly/>`` (QEMU 7.2's C virtiofsd does not: the guest's start fails)."""
    try:
        out = subprocess.run(
            [binary, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return "--readonly" in out.stdout + out.stderr


def _version(number: int) -> str:
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def qemu_has_virtiofs(conn: libvirt.virConnect) -> bool | None:
    """Whether the hypervisor's QEMU offers virtiofs devices (its domain
    capabilities), None when libvirt cannot tell (not QEMU: the test driver)."""
    if conn.getType() != "QEMU":
        return None
    try:
        caps = parse(conn.getDomainCapabilities(None, None, None, None, 0))
    except libvirt.libvirtError:
        return None
    values = caps.findall("devices/filesystem/enum[@name='driverType']/value")
    return any(v.text == "virtiofs" for v in values)


def check_host(
    conn: libvirt.virConnect,
    readonly_at: int | None,
    local: bool,
    dirs: tuple[str, ...] | None = None,
) -> str | None:
    """Refuse shares the hypervisor cannot serve. ``readonly_at``: the index of
    the first readonly share. Returns what could not be checked (a remote
    hypervisor's virtiofsd), None when everything was."""
    if qemu_has_virtiofs(conn) is False:
        raise SpecError(
            "shares",
            f"the QEMU of {conn.getURI()} has no virtiofs device",
            "a QEMU with vhost-user-fs (5.0 or later), or leave shares out",
        )
    if readonly_at is not None and conn.getLibVersion() < READONLY_LIBVIRT:
        raise SpecError(
            f"shares[{readonly_at}].readonly",
            f"libvirt {_version(conn.getLibVersion())} on {conn.getURI()} has no read-only "
            "virtiofs (since 11.0.0)",
            "readonly: false, or libvirt 11.0 or later with a virtiofsd that has --readonly",
        )
    if not local:
        return (
            "virtiofsd (and its --readonly) on the remote hypervisor: libvirt reports "
            "neither; a missing one fails the guest's start, which is rolled back"
        )
    dirs = DESCRIPTOR_DIRS if dirs is None else dirs
    binary = find_daemon(dirs)
    if binary is None:
        raise SpecError(
            "shares",
            f"no virtiofsd on this host: libvirt finds it through an 'fs' descriptor in "
            f"{' or '.join(dirs)}, and there is none with an executable binary",
            INSTALL,
        )
    if readonly_at is not None and not has_readonly(binary):
        raise SpecError(
            f"shares[{readonly_at}].readonly",
            f"the host's virtiofsd ({binary}) has no --readonly option, which libvirt passes "
            "for a read-only share (the guest's start would fail); a read-only mount inside "
            "the guest would not stop its root from writing",
            "readonly: false, or a virtiofsd with --readonly (package virtiofsd, the Rust "
            "virtiofsd)",
        )
    return None
