from pathlib import Path

import libvirt
import pytest

from salt_kvm.virt.domain import new_domain

GIB = 1024**3


NODE = Path(__file__).with_name("testnode.xml")


@pytest.fixture
def conn():
    """A private test-driver hypervisor: every test starts from the same state."""
    conn = libvirt.open(f"test://{NODE}")
    yield conn
    conn.close()


@pytest.fixture
def pool(conn):
    return conn.storagePoolLookupByName("default-pool")


@pytest.fixture
def base(conn, pool):
    """A shut-off base domain with a 1 GiB qcow2 disk in the pool."""
    vol = pool.createXML(
        f"<volume><name>base.qcow2</name><capacity>{GIB}</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    )
    xml = new_domain("base", "test", 512, 1, vol.path(), networks=("default",))
    xml.interfaces[0].mac = "52:54:00:00:00:01"
    dom = conn.defineXML(xml.to_xml())
    return dom
