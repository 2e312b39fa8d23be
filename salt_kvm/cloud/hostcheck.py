"""What a profile takes of the host itself, checked against it before anything is made.

A macvtap NIC's ``source`` must be one of the host's interfaces, and every
``hostdevs`` item must name exactly one device that exists, that no other
domain holds and that the host can give a guest (a PCI function needs an
IOMMU group: VFIO assigns whole groups). Resolved devices become ``<hostdev>``
elements, PCI ones by address.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass

import libvirt
from lxml import etree

from salt_kvm.cloud import nickinds
from salt_kvm.cloud.hostdevs import PCI, HostdevSpec
from salt_kvm.cloud.nics import unreachable
from salt_kvm.cloud.spec import VMSpec
from salt_kvm.errors import ConflictError, SpecError
from salt_kvm.virt import nodedev
from salt_kvm.virt.domain import Domain, Hostdev

log = logging.getLogger(__name__)
# Interfaces no macvtap can sit on.
NOT_DIRECT_SOURCES = ("lo",)
SHOWN_MAX = 12


def _listing(items: list[str]) -> str:
    if not items:
        return "none on this host"
    more = f", ... ({len(items) - SHOWN_MAX} more)" if len(items) > SHOWN_MAX else ""
    return ", ".join(items[:SHOWN_MAX]) + more


def _local(uri: str) -> bool:
    host = urllib.parse.urlparse(uri).hostname
    return host in (None, "", "localhost", "127.0.0.1", "::1")


def check_direct(conn: libvirt.virConnect, spec: VMSpec) -> None:
    """macvtap sources are host interfaces; an SSH deploy from this host can
    reach the guest (not when its every NIC is macvtap on this very host)."""
    nics = spec.nics
    wanted = [(i, n) for i, n in enumerate(nics or []) if n.kind == nickinds.KIND_DIRECT]
    if not wanted:
        return
    uri = conn.getURI()
    host = [n for n in nodedev.interfaces(conn) if n not in NOT_DIRECT_SOURCES]
    for index, nic in wanted:
        if nic.source not in host:
            raise SpecError(
                f"nics[{index}].source",
                f"{nic.source!r} is not a network interface of {uri} that macvtap "
                "can use (libvirt's node devices; without udev, libvirtd lists the interfaces "
                "it saw when it started)",
                _listing(host),
            )
    ssh = spec.deploy.enabled and spec.deploy.method == "ssh"
    if ssh and unreachable(nics) and _local(uri):
        raise SpecError(
            "nics",
            f"an SSH deploy from this host cannot reach the guest on {uri}: every NIC is "
            f"type direct, and {nickinds.UNREACHABLE}",
            "a NIC on a libvirt network or bridge beside the macvtap ones, mode: vepa "
            "behind a reflecting switch, deploy_method: cloud-init with a master the guest "
            "reaches, or deploy: false",
        )


@dataclass
class Resolved:
    """A profile's device and the host device it names."""

    spec: HostdevSpec
    device: nodedev.PciDevice | nodedev.UsbDevice

    def element(self) -> etree._Element:
        dev = Hostdev(etree.Element("hostdev", mode="subsystem", type=self.spec.bus))
        dev.managed = self.spec.managed
        if isinstance(self.device, nodedev.PciDevice):
            domain, bus, slot, function = self.device.address
            dev.address_domain = f"0x{domain:04x}"
            dev.address_bus = f"0x{bus:02x}"
            dev.address_slot = f"0x{slot:02x}"
            dev.address_function = f"0x{function:x}"
        elif self.spec.vendor is not None:
            # By ids: the guest finds the device again after it is replugged.
            dev.vendor = f"0x{self.spec.vendor:04x}"
            dev.product = f"0x{self.spec.product or 0:04x}"
        else:
            dev.address_bus = str(self.device.bus)
            dev.address_device = str(self.device.device)
        return dev.node


def _matches(spec: HostdevSpec, device: nodedev.PciDevice | nodedev.UsbDevice) -> bool:
    if spec.vendor is not None:
        return (device.vendor, device.product) == (spec.vendor, spec.product)
    if isinstance(device, nodedev.PciDevice):
        return device.address == spec.address
    return (device.bus, device.device) == spec.address


def _resolve_one(
    spec: HostdevSpec,
    where: str,
    devices: list,
    allowed: list[HostdevSpec],
    uri: str,
    backends: list[str] | None = None,
) -> nodedev.PciDevice | nodedev.UsbDevice:
    """The one device ``spec`` names, among those the provider allows; the
    refusals list only allowed devices (the rest of the host is not the
    profile's to see)."""
    permitted = [d for d in devices if any(_matches(a, d) for a in allowed if a.bus == spec.bus)]
    found = [d for d in devices if _matches(spec, d)]
    if not found:
        raise SpecError(
            where,
            f"no {spec.shown} on {uri} (libvirt's node devices)",
            _listing([d.shown() for d in permitted]),
        )
    if any(d not in permitted for d in found):
        raise SpecError(
            where,
            f"{spec.shown} is not among the devices the provider allows (hostdev_allowed)",
            _listing([d.shown() for d in permitted]),
        )
    if len(found) > 1:
        raise SpecError(
            where,
            f"{spec.shown} matches {len(found)} devices on {uri}: "
            + _listing([d.shown() for d in found]),
            "one of them by its address (pci: 0000:03:00.0, usb: {bus: 1, device: 4})",
        )
    device = found[0]
    if isinstance(device, nodedev.PciDevice):
        if device.is_bridge:
            raise SpecError(
                where,
                f"{device.shown()} is a host/PCI bridge of the platform, not a device to give away",
                "an endpoint device (a NIC, GPU, controller)",
            )
        if device.iommu_group is None:
            raise SpecError(
                where,
                f"{device.shown()} cannot be assigned on {uri}: libvirt reports no IOMMU group "
                "for it (the IOMMU is off or absent, so VFIO cannot take it); enable VT-d/AMD-Vi "
                "in the firmware and intel_iommu=on (or amd_iommu=on) on the host's kernel "
                "command line",
                "a PCI device with an IOMMU group (virsh nodedev-dumpxml shows <iommuGroup>)",
            )
        if backends == []:
            raise SpecError(
                where,
                f"{device.shown()} cannot be assigned on {uri}: libvirt's domain capabilities "
                "name no PCI assignment backend (no VFIO: the vfio-pci driver is not there)",
                "a host where virsh domcapabilities lists <enum name='pciBackend'> with vfio",
            )
    return device


def _taken(held: Hostdev, device: nodedev.PciDevice | nodedev.UsbDevice) -> bool:
    if isinstance(device, nodedev.PciDevice):
        if held.type not in ("pci", "hostdev") or held.address_bus is None:
            return False
        return nodedev.pci_address(held) == device.address
    if held.type != "usb":
        return False
    if held.vendor is not None:
        return (nodedev.number(held.vendor), nodedev.number(held.product)) == (
            device.vendor,
            device.product,
        )
    return (nodedev.number(held.address_bus), nodedev.number(held.address_device)) == (
        device.bus,
        device.device,
    )


def _holders(conn: libvirt.virConnect) -> list[tuple[str, Hostdev]]:
    """Every host device any domain holds (a hostdev, or a NIC of type hostdev),
    in its definition or, while it runs, plugged in live."""
    held = []
    for dom in conn.listAllDomains(0):
        try:
            xmls = [Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))]
            if dom.isActive():
                xmls.append(Domain(dom.XMLDesc(0)))
        except libvirt.libvirtError:
            continue  # undefined since the listing
        for xml in xmls:
            held += [(xml.name, dev) for dev in xml.hostdevs]
            held += [(xml.name, Hostdev(i.node)) for i in xml.interfaces if i.type == "hostdev"]
    return held


def resolve_hostdevs(
    conn: libvirt.virConnect,
    specs: list[HostdevSpec] | None,
    allowed: list[HostdevSpec],
    key: str = "hostdevs",
) -> list[Resolved]:
    """The host devices ``specs`` name, each checked (and among the ``allowed``,
    the provider's ``hostdev_allowed``); refused by name otherwise."""
    if not specs:
        return []
    uri = conn.getURI()
    pci = nodedev.pci_devices(conn) if any(s.bus == PCI for s in specs) else []
    backends = nodedev.pci_backends(conn) if pci else None
    usb = nodedev.usb_devices(conn) if any(s.bus != PCI for s in specs) else []
    holders = _holders(conn)
    resolved: list[Resolved] = []
    for index, spec in enumerate(specs):
        where = f"{key}[{index}]"
        devices = pci if spec.bus == PCI else usb
        device = _resolve_one(spec, where, devices, allowed, uri, backends)
        for earlier, other in enumerate(resolved):
            if other.device.name == device.name:
                raise SpecError(
                    where, f"{device.shown()} is {key}[{earlier}] too", "distinct devices"
                )
        owners = sorted({name for name, held in holders if _taken(held, device)})
        if owners:
            raise ConflictError(
                f"{where}: {device.shown()} is already given to domain(s) {', '.join(owners)} "
                "(a device goes to one guest at a time)"
            )
        resolved.append(Resolved(spec, device))
    return resolved
