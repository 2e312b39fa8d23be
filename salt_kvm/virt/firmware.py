"""UEFI firmware, secure boot, an emulated TPM and the console's video: what the
host offers (its domain capabilities) and the domain XML that asks for them.

The firmware is libvirt's auto-selection (``<os firmware='efi'>`` with
``<firmware><feature .../>``): libvirt picks the loader and the variables
template from the host's firmware descriptors (``/usr/share/qemu/firmware``),
with Microsoft's keys enrolled for secure boot. Each guest's UEFI variables
(NVRAM) are a file of its own in its pool, named after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import libvirt
from lxml import etree

from salt_kvm.errors import SpecError
from salt_kvm.virt import connection, pools
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.volumes import Volume

log = logging.getLogger(__name__)
EFI_PACKAGE = "ovmf (Debian/Ubuntu) or edk2-ovmf (Fedora/RHEL)"
TPM_PACKAGE = "swtpm swtpm-tools (Debian/Ubuntu; swtpm swtpm-tools on Fedora/RHEL)"
# libvirt's own NVRAM folder: a file it made there from a template is the domain's.
LIBVIRT_NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"
Q35 = "q35"


@dataclass
class HostSupport:
    """The host's domain capabilities for one emulator, machine and virt type."""

    efi: bool = False
    secure_boot: bool = False
    tpm_emulator: bool = False
    tpm_known: bool = False  # the capabilities name TPMs at all (libvirt >= 8.x)
    graphics: set[str] = field(default_factory=set)
    graphics_known: bool = False


def _values(node: etree._Element | None, path: str) -> set[str]:
    if node is None:
        return set()
    return {(v.text or "").strip() for v in node.findall(path)}


def parse_capabilities(xml: str) -> HostSupport:
    root = etree.fromstring(xml.encode())
    os_node = root.find("os")
    firmware = _values(os_node, "enum[@name='firmware']/value")
    loaders = {v for v in _values(os_node, "loader/value") if v}
    secure = _values(os_node, "loader/enum[@name='secure']/value")
    tpm = root.find("devices/tpm")
    return HostSupport(
        efi="efi" in firmware and bool(loaders),
        secure_boot="efi" in firmware and bool(loaders) and "yes" in secure,
        tpm_emulator=tpm is not None
        and tpm.get("supported") == "yes"
        and "emulator" in _values(tpm, "enum[@name='backendModel']/value"),
        tpm_known=tpm is not None,
        graphics=_values(root.find("devices/graphics"), "enum[@name='type']/value"),
        graphics_known=root.find("devices/graphics") is not None,
    )


def machine_of(xml: Domain) -> str:
    os_type = xml.node.find("os/type")
    return (os_type.get("machine") if os_type is not None else None) or "pc"


def is_q35(machine: str) -> bool:
    return Q35 in machine


def host_support(conn: libvirt.virConnect, xml: Domain, virt_type: str) -> HostSupport:
    """What the host offers a guest like ``xml`` (its emulator, arch, machine)."""
    os_type = xml.node.find("os/type")
    arch = os_type.get("arch") if os_type is not None else None
    emulator = xml.node.findtext("devices/emulator")
    try:
        caps = conn.getDomainCapabilities(emulator, arch or "x86_64", machine_of(xml), virt_type, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        # A driver without domain capabilities (older test drivers): nothing is
        # known, nothing refused here; libvirt's define says what it cannot do.
        return HostSupport(efi=True, secure_boot=True, tpm_known=False)
    return parse_capabilities(caps)


def uses_efi(xml: Domain) -> bool:
    os_node = xml.node.find("os")
    if os_node is None:
        return False
    return os_node.get("firmware") == "efi" or os_node.find("loader") is not None


def check_host(
    conn: libvirt.virConnect,
    xml: Domain,
    virt_type: str,
    efi: bool,
    secure_boot: bool,
    tpm: bool,
    graphics: str | None,
) -> None:
    """Refuse by key what this host cannot give the guest, naming what to install."""
    if not (efi or tpm or graphics):
        return
    probe = Domain(etree.fromstring(xml.to_xml().encode()))
    if secure_boot:
        to_q35(probe)
    host = host_support(conn, probe, virt_type)
    where = f"on {conn.getURI()} ({machine_of(probe)}, {virt_type})"
    if efi and not host.efi:
        raise SpecError(
            "firmware",
            f"efi: the host has no UEFI firmware for this guest {where}",
            f"install {EFI_PACKAGE} on the host, or firmware: bios",
        )
    if secure_boot and not host.secure_boot:
        raise SpecError(
            "secure_boot",
            f"the host has no secure-boot UEFI firmware {where}",
            f"install {EFI_PACKAGE} (with its secure-boot build) on the host, "
            "or secure_boot: false",
        )
    if tpm and host.tpm_known and not host.tpm_emulator:
        raise SpecError(
            "tpm",
            f"the host cannot emulate a TPM {where}: swtpm is missing",
            f"install {TPM_PACKAGE} on the host, or tpm: false",
        )
    if graphics and graphics != "none" and host.graphics_known and graphics not in host.graphics:
        offered = sorted(host.graphics & {"vnc", "spice"}) + ["none"]
        raise SpecError(
            "graphics",
            f"{graphics}: this host's QEMU has no {graphics} console {where}",
            ", ".join(offered),
        )


# ---- the domain XML -----------------------------------------------------------


def nvram_path(xml: Domain) -> str | None:
    nvram = xml.node.find("os/nvram")
    if nvram is None:
        return None
    source = nvram.find("source")
    if source is not None and source.get("file"):
        return source.get("file")
    return (nvram.text or "").strip() or None


def set_nvram_path(xml: Domain, path: str) -> None:
    """Point the domain's UEFI variables at ``path`` (a file ``<nvram>``)."""
    nvram = xml.node.find("os/nvram")
    if nvram is None:
        return
    source = nvram.find("source")
    if source is not None and source.get("file"):
        source.set("file", path)
    else:
        nvram.text = path


def has_tpm(xml: Domain) -> bool:
    return xml.node.find("devices/tpm") is not None


def set_bios(xml: Domain) -> None:
    """Drop whatever UEFI the base had: SeaBIOS boots the disk's MBR."""
    os_node = xml.node.find("os")
    if os_node is None:
        return
    os_node.attrib.pop("firmware", None)
    for tag in ("firmware", "loader", "nvram"):
        for node in os_node.findall(tag):
            os_node.remove(node)


def set_efi(xml: Domain, secure_boot: bool, nvram: str) -> None:
    """UEFI by libvirt's auto-selection, with the variables in file ``nvram``."""
    os_node = xml.node.find("os")
    for tag in ("firmware", "loader", "nvram"):
        for node in os_node.findall(tag):
            os_node.remove(node)
    os_node.set("firmware", "efi")
    position = 1 if os_node.find("type") is not None else 0
    features = etree.Element("firmware")
    state = "yes" if secure_boot else "no"
    etree.SubElement(features, "feature", enabled=state, name="enrolled-keys")
    etree.SubElement(features, "feature", enabled=state, name="secure-boot")
    os_node.insert(position, features)
    node = etree.Element("nvram")
    node.text = nvram
    features.addnext(node)
    # UEFI needs ACPI on x86; secure boot needs SMM (libvirt adds it, said here).
    top = xml.node.find("features")
    if top is None:
        top = etree.Element("features")
        os_node.addnext(top)
    if top.find("acpi") is None:
        etree.SubElement(top, "acpi")
    if secure_boot and top.find("smm") is None:
        etree.SubElement(top, "smm", state="on")


def to_q35(xml: Domain) -> bool:
    """Make an i440fx (``pc``) definition a q35 one, as secure boot needs: its
    PCI and drive addresses and controllers go (libvirt lays out the PCIe ones),
    IDE disks move to SATA. False if it already was q35."""
    os_type = xml.node.find("os/type")
    if os_type is None or is_q35(machine_of(xml)):
        return False
    os_type.set("machine", Q35)
    devices = xml.node.find("devices")
    if devices is None:
        return True
    for controller in devices.findall("controller"):
        if controller.get("type") in ("pci", "usb", "ide", "sata"):
            devices.remove(controller)
    for address in devices.findall("*/address"):
        if address.get("type") in ("pci", "drive"):
            address.getparent().remove(address)
    used = {d.target_dev for d in xml.disks}
    for disk in xml.disks:
        if disk.target_bus == "ide":
            disk.target_bus = "sata"
            disk.target_dev = _free_sd(used)
    return True


def _free_sd(used: set[str | None]) -> str:
    for letter in "abcdefghijklmnopqrstuvwxyz":
        if f"sd{letter}" not in used:
            used.add(f"sd{letter}")
            return f"sd{letter}"
    raise SpecError("disks", "no free SATA target for an IDE disk", "fewer disks")


def add_tpm(xml: Domain) -> None:
    """An emulated TPM 2.0 (swtpm; its state is per domain, libvirt's)."""
    devices = xml._devices()
    for old in devices.findall("tpm"):
        devices.remove(old)
    tpm = etree.SubElement(devices, "tpm", model="tpm-crb")
    etree.SubElement(tpm, "backend", type="emulator", version="2.0")


def ensure_vga(xml: Domain) -> None:
    """A video device UEFI can draw on: OVMF has no Cirrus driver (libvirt's
    default when a console is added), its screen would stay black."""
    devices = xml._devices()
    videos = devices.findall("video")
    if not videos:
        video = etree.SubElement(devices, "video")
        etree.SubElement(video, "model", type="vga")
        return
    for video in videos:
        model = video.find("model")
        if model is not None and model.get("type") == "cirrus":
            for attr in list(model.attrib):
                del model.attrib[attr]
            model.set("type", "vga")


# ---- the NVRAM file -------------------------------------------------------------


def nvram_volume_name(vm: str) -> str:
    return f"{vm}_VARS.fd"


def copy_nvram(
    conn: libvirt.virConnect,
    source: str,
    pool_name: str,
    volume: str,
    discard: Callable[[libvirt.virStorageVol], object],
) -> libvirt.virStorageVol | None:
    """Copy the base's UEFI variables into ``volume`` of the pool; None when the
    base's file cannot be read here (not a volume, on another host): the guest
    then starts from the firmware's template. A failed upload's half-written
    volume goes through ``discard`` (the caller's delete gate)."""
    pool = conn.storagePoolLookupByName(pool_name)
    try:
        base = conn.storageVolLookupByPath(source)
    except libvirt.libvirtError:
        base = None
    if base is not None:
        return pool.createXMLFrom(_volume_xml(volume, base.info()[1]), base, 0)
    if connection.remote_host(conn) is not None:
        log.info("the base's NVRAM %s is no volume: %s starts from the template", source, volume)
        return None
    try:
        with open(source, "rb") as handle:
            data = handle.read(64 * 1024 * 1024)
    except OSError as exc:
        log.info("the base's NVRAM %s is unreadable (%s): the template is used", source, exc)
        return None
    return pools.upload(conn, pool_name, volume, data, discard)


def _volume_xml(name: str, capacity: int = 0) -> str:
    return Volume.new(name, capacity, Volume.FORMAT_RAW).to_xml()
