"""The real libvirtd accepts the NIC kinds and host devices salt-kvm writes, and
this host's node devices answer the checks. Define only, never started: this
machine has no IOMMU and no USB bus (docs/testbed.rst), and a macvtap guest on
the host's uplink would talk to the outside network (test_ovs.py boots a guest
on Open vSwitch)."""

from pathlib import Path

import libvirt
import pytest
from lxml import etree

from salt_kvm.cloud import hostcheck, sizing
from salt_kvm.cloud.hostdevs import HostdevSpec
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import SpecError
from salt_kvm.virt import nodedev
from salt_kvm.virt.domain import Domain, has_hostdevs, new_domain

from .conftest import unique

CANNED = Path(__file__).parents[1] / "functional" / "cloud" / "hostdevices.xml"


def canned(name: str) -> etree._Element:
    return etree.parse(str(CANNED)).getroot().xpath(f"device[name='{name}']")[0]


@pytest.fixture(scope="module")
def uplink(hv):
    """A host interface libvirt lists (the macvtap source; never started on)."""
    found = [n for n in nodedev.interfaces(hv) if n not in hostcheck.NOT_DIRECT_SOURCES]
    assert found, "libvirt lists no host interface (virsh nodedev-list --cap net)"
    return found[0]


def test_libvirt_accepts_macvtap_ovs_vlan_mtu_and_hostdev_definitions(hv, uplink):
    name = unique("nic-kinds")
    nics = [
        {"type": "direct", "source": uplink, "mode": "bridge"},
        {"type": "direct", "source": uplink, "mode": "passthrough", "model": "e1000"},
        {"bridge": "sknk-ovs0", "virtualport": "openvswitch", "vlan": 42, "mtu": 1400},
        {"bridge": "sknk-ovs0", "virtualport": "openvswitch", "vlan": [10, 20]},
        {"bridge": "sknk-br0", "mtu": 9000},
    ]
    spec = build_spec(
        {"name": name, "base_domain": "none", "deploy": False, "nics": nics, "ip_source": "agent"}
    )
    xml = new_domain(name, "qemu", 256, 1, f"/var/tmp/{name}.qcow2")
    sizing.apply(xml, spec)
    devices = xml.node.find("devices")
    pci = nodedev.PciDevice(canned("pci_0000_03_00_0"))
    usb = nodedev.UsbDevice(canned("usb_1_4"))
    for resolved in (
        hostcheck.Resolved(HostdevSpec("pci", address=pci.address), pci),
        hostcheck.Resolved(HostdevSpec("usb", vendor=0x046D, product=0xC52B), usb),
        hostcheck.Resolved(HostdevSpec("usb", address=(1, 4), managed=False), usb),
    ):
        devices.append(resolved.element())
    dom = hv.defineXMLFlags(xml.to_xml(), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        kept = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    finally:
        dom.undefine()
    shown = [
        (i.type, i.source, i.source_mode, i.virtualport, i.vlans, i.vlan_trunk, i.mtu)
        for i in kept.interfaces
    ]
    assert shown == [
        ("direct", uplink, "bridge", None, [], None, None),
        ("direct", uplink, "passthrough", None, [], None, None),
        ("bridge", "sknk-ovs0", None, "openvswitch", [42], None, 1400),
        ("bridge", "sknk-ovs0", None, "openvswitch", [10, 20], True, None),
        ("bridge", "sknk-br0", None, None, [], None, 9000),
    ]
    assert [
        (h.type, h.managed, h.address_bus, h.vendor, h.address_device) for h in kept.hostdevs
    ] == [
        ("pci", True, "0x03", None, None),
        ("usb", True, None, "0x046d", None),
        ("usb", False, "1", None, "4"),
    ]
    assert has_hostdevs(kept)


def test_libvirt_itself_refuses_an_mtu_on_macvtap_as_the_spec_does(hv, uplink):
    name = unique("nic-mtu")
    xml = new_domain(name, "qemu", 256, 1, f"/var/tmp/{name}.qcow2", networks=())
    iface = etree.SubElement(xml.node.find("devices"), "interface", type="direct")
    etree.SubElement(iface, "source", dev=uplink, mode="bridge")
    etree.SubElement(iface, "mtu", size="9000")
    with pytest.raises(libvirt.libvirtError, match="MTU on interface type direct"):
        hv.defineXMLFlags(xml.to_xml(), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    with pytest.raises(SpecError, match=r"^nics\[0\]\.mtu"):
        build_spec(
            {
                "name": name,
                "base_domain": "none",
                "nics": [{"type": "direct", "source": uplink, "mtu": 9000}],
                "ip_source": "agent",
            }
        )
    assert name not in [d.name() for d in hv.listAllDomains(0)]


def test_this_hosts_node_devices_answer_the_checks(hv, uplink):
    def profile(*nics):
        values = {"name": "x", "base_domain": "none", "deploy": False, "ip_source": "agent"}
        return build_spec({**values, "nics": list(nics)})

    hostcheck.check_direct(hv, profile({"type": "direct", "source": uplink}))
    with pytest.raises(SpecError, match=r"^nics\[1\]\.source: 'lo' is not a network interface"):
        hostcheck.check_direct(
            hv, profile({"type": "direct", "source": uplink}, {"type": "direct", "source": "lo"})
        )
    # What libvirt says of PCI assignment here: vfio when the host has VFIO.
    backends = nodedev.pci_backends(hv)
    assert backends is not None and ("vfio" in backends) == Path("/dev/vfio").exists(), backends
    endpoints = [d for d in nodedev.pci_devices(hv) if not d.is_bridge]
    if not endpoints:
        pytest.fail("libvirt lists no PCI device (virsh nodedev-list --cap pci)")
    device = endpoints[0]
    wanted = [HostdevSpec("pci", address=device.address)]
    if device.iommu_group is None:
        # This machine (a microVM without an IOMMU): no PCI device can be assigned.
        with pytest.raises(SpecError, match="libvirt reports no IOMMU group"):
            hostcheck.resolve_hostdevs(hv, wanted, allowed=wanted)
    else:
        (resolved,) = hostcheck.resolve_hostdevs(hv, wanted, allowed=wanted)
        assert resolved.device.address == device.address
