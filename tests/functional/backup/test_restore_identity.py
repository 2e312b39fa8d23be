"""Which identity a restored domain has, on the test driver with disks in real
files: under its own name (its domain and disks gone, as after a lost host or
on another host from a copy) it keeps its UUID and MACs; under a new name it
gets new ones; a kept identity another domain here has is refused by name
before anything is written; ``new_identity`` overrides either way."""
# ruff: noqa: F401, F811 - the fixtures of test_snapshot_method, shared

import os

import libvirt
import pytest

from salt_kvm.backup import restore
from salt_kvm.backup import run as backup
from salt_kvm.errors import ConflictError, SpecError
from salt_kvm.virt.domain import Domain, new_domain
from tests.functional.backup.test_snapshot_method import dest, dir_pool, pattern_at, vm

MIB = 1024**2


def identity(dom):
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return dom.UUIDString(), [i.mac for i in xml.interfaces]


@pytest.fixture
def lost(conn, vm, dest, tmp_path):
    """A point of ``vm``, then its domain and disks gone; its old identity."""
    dom, disk, data, base = vm
    before = identity(dom)
    backup.create(conn, "vm", dest, method="snapshot")
    dom.undefine()
    os.unlink(disk)
    os.unlink(data)
    dir_pool(conn, "other", tmp_path / "other")
    return before


def test_restore_under_its_own_name_keeps_uuid_and_macs(conn, dest, lost):
    made = restore.restore(conn, "vm", dest, target="vm", pool="other")
    assert identity(conn.lookupByName("vm")) == lost
    assert made["identity"] == "kept"
    assert (made["uuid"], made["macs"]) == lost
    assert pattern_at(made["volumes"][0], 8 * MIB, 8 * MIB, 2)  # the disk as backed up


def test_restore_under_a_new_name_gets_a_new_uuid_and_macs(conn, vm, dest, tmp_path):
    dom = vm[0]
    before = identity(dom)
    backup.create(conn, "vm", dest, method="snapshot")
    dir_pool(conn, "other", tmp_path / "other")
    made = restore.restore(conn, "vm", dest, target="vm-copy", pool="other")
    uuid, macs = identity(conn.lookupByName("vm-copy"))
    assert made["identity"] == "new"
    assert uuid != before[0] and not set(macs) & set(before[1]) and len(macs) == len(before[1])
    assert identity(dom) == before  # the original is untouched


def test_new_identity_true_gives_the_same_name_new_macs(conn, dest, lost):
    made = restore.restore(conn, "vm", dest, target="vm", pool="other", new_identity=True)
    uuid, macs = identity(conn.lookupByName("vm"))
    assert made["identity"] == "new"
    assert uuid != lost[0] and not set(macs) & set(lost[1])


def test_a_kept_mac_another_domain_has_is_refused_and_nothing_written(conn, dest, lost, tmp_path):
    squatter = new_domain("squatter", "test", 512, 1, str(tmp_path / "x"), networks=("default",))
    squatter.interfaces[0].mac = lost[1][0]
    conn.defineXML(squatter.to_xml())
    with pytest.raises(ConflictError, match=rf"MAC {lost[1][0]} is squatter's.*new_identity=True"):
        restore.restore(conn, "vm", dest, target="vm", pool="other")
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("vm")
    assert os.listdir(tmp_path / "other") == []
    made = restore.restore(conn, "vm", dest, target="vm", pool="other", new_identity=True)
    assert made["identity"] == "new" and lost[1][0] not in made["macs"]


def test_keeping_the_identity_under_a_new_name_beside_the_original_is_refused(
    conn, vm, dest, tmp_path
):
    backup.create(conn, "vm", dest, method="snapshot")
    dir_pool(conn, "other", tmp_path / "other")
    with pytest.raises(ConflictError, match=r"UUID .* is vm's; MAC .* is vm's"):
        restore.restore(conn, "vm", dest, target="vm2", pool="other", new_identity=False)
    assert os.listdir(tmp_path / "other") == []


def test_new_identity_is_refused_for_an_in_place_restore_or_a_non_bool(conn, vm, dest):
    backup.create(conn, "vm", dest, method="snapshot")
    with pytest.raises(SpecError, match="^new_identity: an in-place restore keeps"):
        restore.restore(conn, "vm", dest, force=True, new_identity=True)
    with pytest.raises(SpecError, match="^new_identity: 'yes' is not a yes or no"):
        restore.restore(conn, "vm", dest, target="vm2", new_identity="yes")
