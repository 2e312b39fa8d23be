import libvirt
import pytest

from salt_kvm.cloud import clone
from salt_kvm.errors import ConflictError, NotFoundError, SaltKvmError, SpecError
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback

GIB = 1024**3


def volumes(pool):
    pool.refresh(0)
    return sorted(pool.listVolumes())


def test_quick_clone_is_an_overlay_on_the_base_volume(conn, pool, base):
    plan = clone.plan_clone(conn, "base", "vm1", "quick", "test", root_size=2 * GIB)
    dom = clone.clone_domain(conn, plan, Rollback())
    xml = Domain(dom.XMLDesc(0))
    assert xml.name == "vm1" and xml.uuid != Domain(base.XMLDesc(0)).uuid
    assert xml.disks[0].path == "/default-pool/vm1.qcow2"
    assert xml.interfaces[0].mac != "52:54:00:00:00:01"
    vol = conn.storageVolLookupByPath("/default-pool/vm1.qcow2")
    vol_xml = Domain(vol.XMLDesc(0)).node
    assert vol_xml.findtext("backingStore/path") == "/default-pool/base.qcow2"
    assert vol.info()[1] == 2 * GIB
    assert Domain(base.XMLDesc(0)).disks[0].path == "/default-pool/base.qcow2"


def test_full_clone_copies_the_volume(conn, pool, base):
    plan = clone.plan_clone(conn, "base", "vm2", "full", "test")
    clone.clone_domain(conn, plan, Rollback())
    vol = conn.storageVolLookupByPath("/default-pool/vm2.qcow2")
    assert Domain(vol.XMLDesc(0)).node.find("backingStore/path") is None


def test_quick_clone_of_a_running_base_is_refused_and_nothing_is_made(conn, pool, base):
    base.create()
    before = volumes(pool)
    with pytest.raises(ConflictError, match="shut off"):
        clone.plan_clone(conn, "base", "vm1", "quick", "test")
    assert volumes(pool) == before
    assert base.isActive()


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"base_name": "nope"}, NotFoundError),
        ({"name": "bad/name"}, SpecError),
        ({"strategy": "linked"}, SpecError),
        ({"name": "base"}, ConflictError),
        ({"root_size": GIB // 2}, SpecError),
    ],
)
def test_bad_requests_change_nothing(conn, pool, base, kwargs, error):
    args = {"base_name": "base", "name": "vm1", "strategy": "quick", "virt_type": "test"}
    args.update(kwargs)
    before_vols, before_doms = volumes(pool), sorted(d.name() for d in conn.listAllDomains())
    with pytest.raises(error):
        clone.plan_clone(conn, **args)
    assert volumes(pool) == before_vols
    assert sorted(d.name() for d in conn.listAllDomains()) == before_doms


def test_existing_volume_is_never_overwritten(conn, pool, base):
    pool.createXML("<volume><name>vm1.qcow2</name><capacity>1</capacity></volume>", 0)
    with pytest.raises(ConflictError, match="already exists"):
        clone.plan_clone(conn, "base", "vm1", "quick", "test")


def test_define_failure_rolls_back_the_volumes(conn, pool, base):
    plan = clone.plan_clone(conn, "base", "vm1", "quick", "test")
    plan.virt_type = "no-such-hypervisor"
    before = volumes(pool)
    rollback = Rollback()
    with pytest.raises(SaltKvmError, match="refused the definition"):
        with rollback:
            clone.clone_domain(conn, plan, rollback)
    assert volumes(pool) == before
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("vm1")


def test_clones_get_distinct_macs(conn, pool, base):
    macs = set()
    for name in ("a1", "a2", "a3"):
        dom = clone.clone_domain(
            conn, clone.plan_clone(conn, "base", name, "quick", "test"), Rollback()
        )
        macs.add(Domain(dom.XMLDesc(0)).interfaces[0].mac)
    assert len(macs) == 3


def test_remove_takes_the_clone_and_its_volumes_but_never_the_base(conn, pool, base):
    from salt_kvm.virt import lifecycle

    clone.clone_domain(conn, clone.plan_clone(conn, "base", "vm1", "quick", "test"), Rollback())
    removed = lifecycle.remove(conn, "vm1")
    assert removed == {"domain": "vm1", "volumes": ["/default-pool/vm1.qcow2"]}
    assert "base.qcow2" in volumes(pool) and "vm1.qcow2" not in volumes(pool)
    with pytest.raises(SaltKvmError, match="not created by salt-kvm"):
        lifecycle.remove(conn, "base")
    assert conn.lookupByName("base")


class _Broken:
    """A connection that stops answering once the clone is made (libvirtd restarted)."""

    def __init__(self, conn):
        self._conn, self.alive = conn, True

    def isAlive(self):  # noqa: N802 - libvirt's name
        return self.alive

    def __getattr__(self, attr):
        if not self.alive:
            raise libvirt.libvirtError("client socket is closed")
        return getattr(self._conn, attr)


class _Fresh(_Broken):
    """The new connection (same private hypervisor); the rollback closes it."""

    def close(self):
        self.closed = True


def test_rollback_reconnects_when_the_connection_broke(conn, pool, base):
    broken, fresh = _Broken(conn), _Fresh(conn)
    reconnects = []
    rollback = Rollback(reconnect=lambda: reconnects.append(1) or fresh)
    before = volumes(pool)
    clone.clone_domain(broken, clone.plan_clone(conn, "base", "vm1", "quick", "test"), rollback)
    assert volumes(pool) != before
    broken.alive = False
    assert rollback.run() == []
    assert reconnects == [1] and fresh.closed
    assert volumes(pool) == before
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("vm1")
