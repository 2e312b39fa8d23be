"""The clone's identity: what prepare_identity changes in a copy of the base XML."""

import random

from salt_kvm.virt.domain import Domain
from salt_kvm.virt.identity import new_mac, prepare_identity

BASE = """
<domain type='kvm' id='3'>
  <name>base</name>
  <uuid>8a2f4b7e-1111-2222-3333-444455556666</uuid>
  <metadata><x:keep xmlns:x="urn:other">1</x:keep></metadata>
  <memory unit='KiB'>1048576</memory>
  <vcpu>1</vcpu>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/base.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/seed.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><source path='/dev/pts/4'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind'
              path='/var/lib/libvirt/qemu/channel/target/domain-3-base/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'/>
  </devices>
</domain>
"""


def test_identity_is_new_and_nothing_host_specific_is_copied():
    taken = {"52:54:00:aa:bb:cc"}
    xml = prepare_identity(Domain(BASE), "vm1", "qemu", taken)
    assert xml.name == "vm1"
    assert xml.type == "qemu"
    assert xml.uuid is None
    assert "id" not in xml.node.attrib
    assert xml.node.find("metadata") is None
    iface = xml.interfaces[0]
    assert iface.mac.startswith("52:54:00:") and iface.mac != "52:54:00:aa:bb:cc"
    assert iface.mac in taken
    assert iface.target_dev is None
    assert xml.node.find("devices/serial/source") is None
    channel_source = xml.node.find("devices/channel/source")
    assert channel_source is not None and "path" not in channel_source.attrib
    graphics = xml.node.find("devices/graphics")
    assert graphics.get("autoport") == "yes" and graphics.get("port") is None
    cdrom = [d for d in xml.disks if d.device == "cdrom"][0]
    assert cdrom.path is None


def test_new_mac_avoids_taken_addresses():
    rng = random.Random(1)
    first = new_mac(set(), random.Random(1))
    taken = {first}
    assert new_mac(taken, rng) != first


def test_a_copy_never_shares_its_origins_nvram():
    """A quick clone (or a restore) of a UEFI domain that kept the origin's
    NVRAM path would write the origin's variables, and undefining the copy
    (which deletes its NVRAM) would delete them: the path goes, the template stays."""
    xml = Domain(BASE)
    os_ = xml.node.find("os")
    if os_ is None:
        from lxml import etree

        os_ = etree.SubElement(xml.node, "os")
    from lxml import etree

    loader = etree.SubElement(os_, "loader", readonly="yes", type="pflash")
    loader.text = "/usr/share/OVMF/OVMF_CODE.fd"
    nvram = etree.SubElement(os_, "nvram", template="/usr/share/OVMF/OVMF_VARS.fd")
    nvram.text = "/var/lib/libvirt/qemu/nvram/base_VARS.fd"
    prepare_identity(xml, "clone", "kvm", set())
    kept = xml.node.find("os/nvram")
    assert kept is not None and dict(kept.attrib) == {"template": "/usr/share/OVMF/OVMF_VARS.fd"}
    assert not (kept.text or "").strip() and len(kept) == 0
    assert "base_VARS" not in xml.to_xml()
    assert xml.node.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE.fd"
    # a <source> form without a template: the element goes, libvirt makes one
    xml = Domain(BASE)
    os_ = (
        xml.node.find("os") if xml.node.find("os") is not None else etree.SubElement(xml.node, "os")
    )
    nvram = etree.SubElement(os_, "nvram", type="file")
    etree.SubElement(nvram, "source", file="/var/lib/libvirt/qemu/nvram/base_VARS.fd")
    prepare_identity(xml, "clone", "kvm", set())
    assert xml.node.find("os/nvram") is None


def test_keep_leaves_uuid_and_macs_and_still_drops_what_is_host_specific():
    original = Domain(BASE)
    uuid, mac = original.uuid, original.interfaces[0].mac
    xml = prepare_identity(Domain(BASE), "base", "qemu", {mac}, keep=True)
    assert xml.uuid == uuid and uuid
    assert [i.mac for i in xml.interfaces] == [mac]
    assert "id" not in xml.node.attrib and xml.node.find("metadata") is None
    assert xml.interfaces[0].target_dev is None
    assert xml.node.find("devices/serial/source") is None
    assert xml.node.find("devices/graphics").get("port") is None
