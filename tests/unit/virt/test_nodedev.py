"""Node device and domain-capability documents read without libvirt."""

from lxml import etree

from salt_kvm.virt import nodedev

# This development machine's answer (virsh domcapabilities): no VFIO.
NO_VFIO = """<domainCapabilities><devices><hostdev supported='yes'>
  <enum name='mode'><value>subsystem</value></enum>
  <enum name='subsysType'><value>usb</value><value>pci</value><value>scsi</value></enum>
  <enum name='capsType'/>
  <enum name='pciBackend'/>
</hostdev></devices></domainCapabilities>"""
VFIO = NO_VFIO.replace(
    "<enum name='pciBackend'/>", "<enum name='pciBackend'><value>vfio</value></enum>"
)


def test_the_pci_assignment_backends_libvirt_names():
    assert nodedev.pci_backends_of(NO_VFIO) == []
    assert nodedev.pci_backends_of(VFIO) == ["vfio"]
    # the test driver says nothing of host devices: unknown, not "none"
    assert nodedev.pci_backends_of("<domainCapabilities><devices/></domainCapabilities>") is None


def test_numbers_as_libvirt_writes_them():
    assert [nodedev.number(t) for t in ("0x1f", "31", "001", "0x0000", None, "")] == [
        31,
        31,
        1,
        0,
        None,
        None,
    ]


def test_a_pci_device_document():
    dev = nodedev.PciDevice(
        etree.fromstring(
            "<device><name>pci_0000_3b_10_1</name><capability type='pci'>"
            "<class>0x020000</class><domain>0</domain><bus>59</bus><slot>16</slot>"
            "<function>1</function><product id='0x154c'/><vendor id='0x8086'/>"
            "<iommuGroup number='70'><address domain='0x0000' bus='0x3b' slot='0x10' "
            "function='0x1'/></iommuGroup></capability></device>"
        )
    )
    assert dev.address == (0, 0x3B, 0x10, 1) and dev.address_text == "0000:3b:10.1"
    assert (dev.vendor_product, dev.iommu_group, dev.is_bridge) == ("8086:154c", 70, False)
    assert dev.shown() == "0000:3b:10.1 (8086:154c)"
