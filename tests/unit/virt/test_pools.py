"""The pool document."""

from salt_kvm.virt.pools import Pool
from tests.xmlcompare import assert_same_xml

# virStoragePool.XMLDesc of a dir pool.
LIBVIRT_POOL = """
<pool type='dir'>
  <name>default</name>
  <uuid>dfe224cb-28fb-8dd0-c4b2-64eb3f0f4566</uuid>
  <capacity unit='bytes'>107374182400</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>107374182400</available>
  <source>
  </source>
  <target>
    <path>/var/lib/libvirt/images</path>
    <permissions>
      <mode>0711</mode>
    </permissions>
  </target>
</pool>
"""


def test_new_dir_pool():
    assert_same_xml(
        Pool.new_dir("p", "/srv/p").to_xml(),
        '<pool type="dir"><name>p</name><target><path>/srv/p</path></target></pool>',
    )


def test_reads_libvirts_pool():
    pool = Pool(LIBVIRT_POOL)
    assert (pool.type, pool.name, pool.target_path) == ("dir", "default", "/var/lib/libvirt/images")
    assert pool.uuid == "dfe224cb-28fb-8dd0-c4b2-64eb3f0f4566"
    assert_same_xml(Pool(pool.to_xml()).to_xml(), LIBVIRT_POOL)
