"""The host's devices as libvirt's node device API reports them.

What libvirt knows of the host: PCI functions (with their IOMMU group when the
kernel has one), USB devices and network interfaces. On a host without udev,
libvirtd enumerates them when it starts: an interface made later (a bridge,
a VLAN) is missing until libvirtd restarts.
"""

from __future__ import annotations

import libvirt
from lxml import etree

from salt_kvm.virt.xmlmodel import XMLObject, XMLProperty

CAP_PCI = "pci"
CAP_USB = "usb_device"
CAP_NET = "net"
_FLAGS = {
    CAP_PCI: libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV,
    CAP_USB: libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV,
    CAP_NET: libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_NET,
}
# PCI class 0x06: host, ISA and PCI bridges: the platform's own, never a guest's.
PCI_CLASS_BRIDGE = 0x06


def number(text: str | None) -> int | None:
    """A number as libvirt writes it: ``0x1f`` (hex) or ``31``, ``001`` (decimal)."""
    if text in (None, ""):
        return None
    assert text is not None
    text = text.strip().lower()
    return int(text, 16) if text.startswith("0x") else int(text, 10)


def pci_address(hostdev) -> tuple[int, int, int, int]:
    """(domain, bus, slot, function) of a domain's ``Hostdev`` PCI source address,
    absent parts 0: comparable with ``PciDevice.address``."""
    return (
        number(hostdev.address_domain) or 0,
        number(hostdev.address_bus) or 0,
        number(hostdev.address_slot) or 0,
        number(hostdev.address_function) or 0,
    )


class NodeDevice(XMLObject):
    """One ``virsh nodedev-dumpxml`` document."""

    TAG = "device"

    name = XMLProperty("./name")
    driver = XMLProperty("./driver/name")

    def _cap(self, path: str) -> str | None:
        found = self.node.xpath(f"./capability/{path}")
        if not found:
            return None
        value = found[0]
        return str(value) if isinstance(value, str) else value.text

    @property
    def vendor(self) -> int | None:
        return number(self._cap("vendor/@id"))

    @property
    def product(self) -> int | None:
        return number(self._cap("product/@id"))

    @property
    def vendor_product(self) -> str:
        return f"{self.vendor or 0:04x}:{self.product or 0:04x}"


class PciDevice(NodeDevice):
    @property
    def address(self) -> tuple[int, int, int, int]:
        parts = [number(self._cap(t)) or 0 for t in ("domain", "bus", "slot", "function")]
        return parts[0], parts[1], parts[2], parts[3]

    @property
    def address_text(self) -> str:
        domain, bus, slot, function = self.address
        return f"{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"

    @property
    def iommu_group(self) -> int | None:
        return number(self._cap("iommuGroup/@number"))

    @property
    def pci_class(self) -> int | None:
        return number(self._cap("class"))

    @property
    def is_bridge(self) -> bool:
        return self.pci_class is not None and self.pci_class >> 16 == PCI_CLASS_BRIDGE

    def shown(self) -> str:
        return f"{self.address_text} ({self.vendor_product})"


class UsbDevice(NodeDevice):
    @property
    def bus(self) -> int | None:
        return number(self._cap("bus"))

    @property
    def device(self) -> int | None:
        return number(self._cap("device"))

    def shown(self) -> str:
        return f"bus {self.bus} device {self.device} ({self.vendor_product})"


class NetDevice(NodeDevice):
    @property
    def interface(self) -> str | None:
        return self._cap("interface")


def _parse(xml: str) -> etree._Element:
    parser = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
    return etree.fromstring(xml.encode(), parser)


def _list(conn: libvirt.virConnect, cap: str) -> list[etree._Element]:
    found = []
    for dev in conn.listAllDevices(_FLAGS[cap]):
        try:
            found.append(_parse(dev.XMLDesc(0)))
        except libvirt.libvirtError:
            continue  # gone since the listing
    return found


def pci_devices(conn: libvirt.virConnect) -> list[PciDevice]:
    """The host's PCI functions, by address."""
    return sorted((PciDevice(n) for n in _list(conn, CAP_PCI)), key=lambda d: d.address)


def usb_devices(conn: libvirt.virConnect) -> list[UsbDevice]:
    return sorted(
        (UsbDevice(n) for n in _list(conn, CAP_USB)), key=lambda d: (d.bus or 0, d.device or 0)
    )


def interfaces(conn: libvirt.virConnect) -> list[str]:
    """The host's network interface names libvirt knows of, sorted."""
    names = {NetDevice(n).interface for n in _list(conn, CAP_NET)}
    return sorted(n for n in names if n)


def pci_backends_of(domcaps: str) -> list[str] | None:
    """The PCI assignment backends a ``domainCapabilities`` document names
    (``vfio``), or ``None`` when it says nothing of host devices."""
    hostdev = _parse(domcaps).find("devices/hostdev")
    if hostdev is None:
        return None
    enum = hostdev.find("enum[@name='pciBackend']")
    return [v.text or "" for v in enum.findall("value")] if enum is not None else None


def pci_backends(conn: libvirt.virConnect) -> list[str] | None:
    """What libvirt can assign PCI devices with on this host (empty: nothing,
    e.g. no VFIO), or ``None`` when the driver does not say."""
    try:
        return pci_backends_of(conn.getDomainCapabilities(None, None, None, None, 0))
    except libvirt.libvirtError:
        return None
