"""No delete of salt-kvm removes a file something else needs (libvirt's test
driver: its volumes have no files, their chains come from libvirt; local
overlays outside the pools are real qcow2 files whose headers are read)."""

import os

import libvirt
import pytest

from salt_kvm.cloud import clone
from salt_kvm.disks import ops as diskops
from salt_kvm.disks import spec as disks
from salt_kvm.errors import ConflictError
from salt_kvm.images import cache as images
from salt_kvm.virt import chains, lifecycle
from salt_kvm.virt.domain import DISKS_NS, DISKS_PREFIX, Domain, disks_metadata_element, new_domain
from salt_kvm.virt.rollback import Rollback
from salt_kvm.virt.xmlmodel import tostring
from tests.images import qcow2

GIB = 1024**3
A_VOL = "/default-pool/vm-a.qcow2"


def volumes(pool):
    pool.refresh(0)
    return sorted(pool.listVolumes())


def overlay_volume(pool, name, backing):
    return pool.createXML(
        f"<volume><name>{name}</name><capacity>{GIB}</capacity>"
        "<target><format type='qcow2'/></target>"
        f"<backingStore><path>{backing}</path><format type='qcow2'/></backingStore></volume>",
        0,
    )


def define_on(conn, name, path):
    xml = Domain(conn.lookupByName("vm-a").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    xml.node.find("name").text = name
    xml.node.remove(xml.node.find("uuid"))
    for iface in xml.interfaces:
        iface.node.getparent().remove(iface.node)
    xml.disks[0].path = path
    return conn.defineXML(xml.to_xml())


@pytest.fixture
def guest_a(conn, pool, base):
    """A salt-kvm guest (a quick clone of the base): what `salt-cloud -p` makes."""
    plan = clone.plan_clone(conn, "base", "vm-a", "quick", "test")
    return clone.clone_domain(conn, plan, Rollback())


def state(conn, pool):
    return volumes(pool), sorted(
        conn.listDefinedDomains()
        + [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
    )


def test_destroy_of_a_guest_a_quick_clone_stands_on_is_refused_naming_it(conn, pool, guest_a):
    """`salt-cloud -d A` while B is a quick clone with A as its base domain."""
    clone.clone_domain(conn, clone.plan_clone(conn, "vm-a", "vm-b", "quick", "test"), Rollback())
    before = state(conn, pool)
    with pytest.raises(ConflictError, match=r"vm-a\.qcow2 is needed by .*vm-b") as exc:
        lifecycle.remove(conn, "vm-a")
    assert "/default-pool/vm-b.qcow2" in str(exc.value)
    assert state(conn, pool) == before  # A still defined, nothing deleted
    lifecycle.remove(conn, "vm-b")
    assert lifecycle.remove(conn, "vm-a")["volumes"] == [A_VOL]  # free once B is gone


def test_a_volume_deep_in_a_chain_counts(conn, pool, guest_a):
    """A → mid → top: `top` needs A's volume although it does not name it."""
    overlay_volume(pool, "mid.qcow2", A_VOL)
    overlay_volume(pool, "top.qcow2", "/default-pool/mid.qcow2")
    found = chains.dependents(conn)
    assert {str(d) for d in found.of(A_VOL) if d.domain is None} == {
        "volume /default-pool/mid.qcow2",
        "volume /default-pool/top.qcow2",
    }
    before = state(conn, pool)
    with pytest.raises(ConflictError, match="top.qcow2"):
        lifecycle.remove(conn, "vm-a")
    assert state(conn, pool) == before


def test_a_definition_on_an_overlay_outside_the_pools_counts(conn, pool, guest_a, tmp_path):
    """An inactive domain on a local qcow2 file whose header names A's volume
    relative to itself, through a symlinked directory: still A's dependent."""
    (tmp_path / "alias").symlink_to("/default-pool")
    sub = tmp_path / "sub"
    sub.mkdir()
    relative = os.path.relpath(str(tmp_path / "alias" / "vm-a.qcow2"), str(sub))
    assert not relative.startswith("/")
    define_on(conn, "vm-c", qcow2(sub / "c.qcow2", relative, size="1G"))
    before = state(conn, pool)
    with pytest.raises(ConflictError, match=r"domain 'vm-c' \(backing chain of its disk vda"):
        lifecycle.remove(conn, "vm-a")
    assert state(conn, pool) == before


def test_a_raw_disk_has_no_chain_whatever_its_bytes_say(conn, pool, guest_a, tmp_path):
    """A guest can write a qcow2 header into its raw disk: it is data, not a chain."""
    path = qcow2(tmp_path / "raw.img", A_VOL, size="1G")
    dom = define_on(conn, "vm-raw", path)
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    xml.disks[0].driver_type = "raw"
    conn.defineXML(xml.to_xml())
    assert not [d for d in chains.dependents(conn).of(A_VOL) if d.domain == "vm-raw"]


def test_destroy_extra_disks_needed_elsewhere_refuse_the_whole_destroy(conn, pool, guest_a):
    data = pool.createXML(
        f"<volume><name>vm-a-data.qcow2</name><capacity>{GIB}</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    ).path()
    overlay_volume(pool, "someone-else.qcow2", data)
    before = state(conn, pool)
    with pytest.raises(ConflictError, match="vm-a-data.qcow2 is needed by volume .*someone-else"):
        lifecycle.remove(conn, "vm-a", also=[data])
    assert state(conn, pool) == before


def test_delete_volumes_keeps_what_is_needed_and_what_it_stands_on(conn, pool, base):
    free = overlay_volume(pool, "free.qcow2", "/default-pool/base.qcow2").path()
    lower = pool.createXML(
        f"<volume><name>lower.qcow2</name><capacity>{GIB}</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    ).path()
    upper = overlay_volume(pool, "upper.qcow2", lower).path()
    user = overlay_volume(pool, "user.qcow2", upper).path()
    # upper is needed by user (not deleted): upper stays, and so does lower below it
    assert diskops.delete_volumes(conn, [free, lower, upper]) == [free]
    assert conn.storageVolLookupByPath(upper) and conn.storageVolLookupByPath(lower)
    # together with everything above them they go
    assert sorted(diskops.delete_volumes(conn, [user, lower, upper])) == sorted(
        [user, lower, upper]
    )


def test_rollback_never_deletes_a_volume_another_stands_on(conn, pool, guest_a):
    overlay_volume(pool, "late.qcow2", A_VOL)
    with pytest.raises(ConflictError, match="late.qcow2"):
        chains.delete_volume(conn, A_VOL, "rollback")
    assert conn.storageVolLookupByPath(A_VOL)


def test_disk_delete_is_refused_before_the_detach(conn, pool, base):
    """`kvm_disk.detached delete=True` of a disk salt-kvm made, which a volume stands on."""
    path = pool.createXML(
        f"<volume><name>base-data.qcow2</name><capacity>{GIB}</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    ).path()
    xml = Domain(base.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    spec = disks.DiskSpec(name="data", path=path)
    xml._devices().append(disks.disk_element(spec, "vdb", disks.Source(path, "qcow2")).node)
    base = conn.defineXML(xml.to_xml())
    element = tostring(disks_metadata_element({path: {"name": "data"}}, namespaced=False))
    config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    base.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, DISKS_PREFIX, DISKS_NS, config)
    overlay_volume(pool, "on-data.qcow2", path)
    before = base.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    with pytest.raises(ConflictError, match="base-data.qcow2 is needed by volume .*on-data"):
        diskops.detach(conn, base, "data", delete=True)
    assert base.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
    assert conn.storageVolLookupByPath(path)


def test_image_delete_is_refused_while_a_volume_stands_on_it(conn, pool):
    name = "image-sha256-" + "1" * 32 + ".qcow2"
    image = pool.createXML(
        f"<volume><name>{name}</name><capacity>{GIB}</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    )
    overlay_volume(pool, "hand-made.qcow2", image.path())
    with pytest.raises(ConflictError, match="hand-made.qcow2"):
        images.delete_image(conn, name)
    assert name in volumes(pool)


def test_a_second_name_of_the_file_does_not_hide_the_dependent(conn, pool, base, tmp_path):
    """An overlay outside the pools names a local file through a hard link (as
    a bind mount would): deleting the file by its other name is refused."""
    real = tmp_path / "image.qcow2"
    qcow2(real)
    os.link(real, tmp_path / "alias.qcow2")
    top = qcow2(tmp_path / "top.qcow2", tmp_path / "alias.qcow2", size="1G")
    conn.defineXML(new_domain("vm-h", "test", 512, 1, top).to_xml())
    with pytest.raises(ConflictError, match=r"image.qcow2 is needed by domain 'vm-h'"):
        chains.delete_file(conn, str(real), "test delete")
    assert real.exists()


def test_an_extra_disk_another_domain_has_attached_is_kept_not_refused(conn, pool, guest_a):
    """delete_disks on a disk shared with another guest: the destroy goes on and
    keeps that volume (as documented); only chains refuse it."""
    data = pool.createXML(
        f"<volume><name>vm-a-shared.qcow2</name><capacity>{GIB}</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    ).path()
    other = define_on(conn, "vm-other", "/default-pool/base.qcow2")
    xml = Domain(other.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    spec = disks.DiskSpec(name="shared", path=data, shareable=True)
    xml._devices().append(disks.disk_element(spec, "vdb", disks.Source(data, "qcow2")).node)
    conn.defineXML(xml.to_xml())
    assert lifecycle.remove(conn, "vm-a", also=[data])["volumes"] == [A_VOL]
    assert diskops.delete_volumes(conn, [data]) == []
    assert conn.storageVolLookupByPath(data)
