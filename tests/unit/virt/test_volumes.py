"""The volume document: what salt-kvm creates, and what it reads from libvirt's."""

from salt_kvm.virt.volumes import Volume
from tests.xmlcompare import assert_same_xml

# virStorageVol.XMLDesc of a linked clone (libvirt 11, dir pool).
LIBVIRT_VOLUME = """
<volume type='file'>
  <name>a.qcow2</name>
  <key>/pool/a.qcow2</key>
  <capacity unit='bytes'>1073741824</capacity>
  <allocation unit='bytes'>196608</allocation>
  <target>
    <path>/pool/a.qcow2</path>
    <format type='qcow2'/>
    <permissions>
      <mode>0600</mode>
    </permissions>
    <compat>1.1</compat>
  </target>
  <backingStore>
    <path>/pool/base.qcow2</path>
    <format type='qcow2'/>
  </backingStore>
</volume>
"""


def test_linked_clone_volume():
    vol = Volume.new("a.qcow2", 1 << 30, Volume.FORMAT_QCOW2, v3=True)
    vol.set_backing("/pool/base.qcow2", "raw")
    assert_same_xml(
        vol.to_xml(),
        """<volume type="file"><name>a.qcow2</name>
        <capacity unit="bytes">1073741824</capacity>
        <target><format type="qcow2"/><compat>1.1</compat>
        <permissions><mode>0600</mode></permissions></target>
        <backingStore><path>/pool/base.qcow2</path><format type="raw"/></backingStore>
        </volume>""",
    )


def test_cached_image_volume_has_its_mode_and_no_compat():
    vol = Volume.new("image-x.raw", 5, Volume.FORMAT_RAW, mode="0644")
    assert_same_xml(
        vol.to_xml(),
        """<volume type="file"><name>image-x.raw</name><capacity unit="bytes">5</capacity>
        <target><format type="raw"/><permissions><mode>0644</mode></permissions></target>
        </volume>""",
    )


def test_v3_is_for_qcow2_only():
    assert Volume.new("r.raw", 1, Volume.FORMAT_RAW, v3=True).compat is None
    assert Volume.new("q.qcow2", 1, Volume.FORMAT_QCOW2).compat is None


def test_allocation_is_written_in_bytes_without_a_unit():
    vol = Volume.new("d.raw", 10, Volume.FORMAT_RAW)
    vol.allocation = 0
    assert vol.node.find("allocation").text == "0"
    assert vol.node.find("allocation").get("unit") is None
    assert vol.allocation == 0


def test_reads_libvirts_volume():
    vol = Volume(LIBVIRT_VOLUME)
    assert (vol.name, vol.key, vol.path) == ("a.qcow2", "/pool/a.qcow2", "/pool/a.qcow2")
    assert (vol.capacity, vol.allocation) == (1 << 30, 196608)
    assert (vol.format, vol.compat, vol.mode) == ("qcow2", "1.1", "0600")
    assert (vol.backing_path, vol.backing_format) == ("/pool/base.qcow2", "qcow2")


def test_sizes_in_other_units_are_read_as_bytes():
    vol = Volume(
        "<volume><capacity unit='G'>2</capacity><allocation unit='KB'>3</allocation></volume>"
    )
    assert (vol.capacity, vol.allocation) == (2 << 30, 3000)
    assert Volume("<volume><capacity>7</capacity></volume>").capacity == 7


def test_round_trip_keeps_libvirts_document():
    vol = Volume(LIBVIRT_VOLUME)
    assert_same_xml(Volume(vol.to_xml()).to_xml(), LIBVIRT_VOLUME)
