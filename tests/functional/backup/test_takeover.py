"""A takeover on the test driver with disks in real files: the newest point
that verifies comes back under the guest's own name and identity, started;
broken newer points are skipped by name; a host where the guest still runs
refuses it (unless force=True), one that does not answer does not; nothing is
left when a step fails."""
# ruff: noqa: F401, F811 - the fixtures of test_snapshot_method, shared

import os
import time

import libvirt
import pytest

from salt_kvm.backup import run as backup
from salt_kvm.backup import store as bs
from salt_kvm.backup import takeover
from salt_kvm.errors import ConflictError, SaltKvmError, SpecError
from salt_kvm.virt.domain import Domain, new_domain
from tests.functional.backup.test_snapshot_method import dest, dir_pool, pattern_at, qemu_io, vm

MIB = 1024**2
SILENT = "qemu+unix:///system?socket=/nonexistent/salt-kvm-test-sock"


def identity(dom):
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return dom.UUIDString(), [i.mac for i in xml.interfaces]


@pytest.fixture
def lost(conn, vm, dest, tmp_path):
    """A full point (vda: 2s at 8M) and an incremental (vda: 5s at 0), then the
    domain and its disks gone, as on a lost host; its old identity."""
    dom, disk, data, base = vm
    before = identity(dom)
    full = backup.create(conn, "vm", dest, method="snapshot")
    time.sleep(1.1)  # point ids are seconds
    qemu_io(disk, "write -P 5 0 1M")
    inc = backup.create(conn, "vm", dest, method="snapshot")
    assert inc["kind"] == "incremental"
    dom.undefine()
    os.unlink(disk)
    os.unlink(data)
    dir_pool(conn, "other", tmp_path / "other")
    return before, full["point"], inc["point"]


def test_the_latest_point_comes_back_with_its_identity_and_runs(conn, dest, lost):
    before, _full, inc = lost
    made = takeover.takeover(conn, "vm", dest, peers={"hv1": SILENT}, pool="other", timeout=5)
    dom = conn.lookupByName("vm")
    assert dom.isActive() and made["started"] is True
    assert identity(dom) == before and made["identity"] == "kept"
    assert made["point"] == inc and made["skipped"] == {}
    assert made["unreachable"] == ["hv1"] and made["hosts"]["hv1"].startswith("no answer")
    assert pattern_at(made["volumes"][0], 0, MIB, 5)  # the incremental's write


def test_a_broken_newest_point_is_skipped_by_name(conn, dest, lost, tmp_path):
    _before, full, inc = lost
    image = bs.Store(dest, "vm").path(inc) / "vda.qcow2"
    with open(image, "r+b") as handle:  # its checksum no longer matches
        handle.seek(os.path.getsize(image) - 1)
        handle.write(b"\x01")
    made = takeover.takeover(conn, "vm", dest, pool="other")
    assert made["point"] == full and list(made["skipped"]) == [inc]
    assert "sha256" in made["skipped"][inc] or "checksum" in made["skipped"][inc]
    assert pattern_at(made["volumes"][0], 8 * MIB, 8 * MIB, 2)
    assert not pattern_at(made["volumes"][0], 0, MIB, 5)  # the broken point's write


def test_no_point_that_verifies_is_refused_and_nothing_is_made(conn, dest, lost, tmp_path):
    _before, full, inc = lost
    for pid in (full, inc):
        (bs.Store(dest, "vm").path(pid) / "vda.qcow2").write_bytes(b"not an image")
    with pytest.raises(SaltKvmError, match=rf"no backup point of vm .* verifies \({full}: .*{inc}"):
        takeover.takeover(conn, "vm", dest, pool="other")
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("vm")
    assert os.listdir(tmp_path / "other") == []


def test_a_guest_still_running_elsewhere_is_refused_unless_forced(conn, dest, lost, tmp_path):
    other = libvirt.open("test:///default")  # another host, shared by every open here
    running = other.defineXML(
        new_domain("vm", "test", 512, 1, str(tmp_path / "elsewhere")).to_xml()
    )
    running.create()
    try:
        peers = {"hv1": "test:///default", "rack7": SILENT}
        with pytest.raises(ConflictError, match=r"vm still runs on hv1: .*force=True"):
            takeover.takeover(conn, "vm", dest, peers=peers, pool="other")
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName("vm")
        assert os.listdir(tmp_path / "other") == []
        made = takeover.takeover(conn, "vm", dest, peers=peers, pool="other", force=True)
        assert made["forced"] is True and made["hosts"]["hv1"] == "running"
        assert made["unreachable"] == ["rack7"]
        running.destroy()
        assert takeover.where_it_runs("vm", peers, 5)["hv1"] == "defined, not running"
    finally:
        if running.isActive():
            running.destroy()
        running.undefine()
        other.close()


def test_a_domain_of_that_name_here_is_refused(conn, vm, dest):
    backup.create(conn, "vm", dest, method="snapshot")
    with pytest.raises(ConflictError, match="vm is already defined on this host"):
        takeover.takeover(conn, "vm", dest)


def test_a_host_that_hangs_is_given_up_after_the_timeout(monkeypatch):
    def hanging(uri):
        time.sleep(3)
        raise libvirt.libvirtError("too late")

    monkeypatch.setattr(takeover.libvirt, "open", hanging)
    started = time.monotonic()
    found = takeover.where_it_runs("vm", {"hv1": "qemu+ssh://root@hv1/system"}, 0.3)
    assert time.monotonic() - started < 2
    assert found == {"hv1": "no answer: no answer within 0.3 s"}


def test_a_failed_start_removes_what_was_made(conn, dest, lost, tmp_path, monkeypatch):
    def fail(self, flags=0):
        raise libvirt.libvirtError("injected: cannot start")

    monkeypatch.setattr(libvirt.virDomain, "create", fail)
    with pytest.raises(libvirt.libvirtError, match="injected"):
        takeover.takeover(conn, "vm", dest, pool="other")
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("vm")
    assert os.listdir(tmp_path / "other") == []


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"timeout": 0}, r"^timeout: 0 is not a number of seconds"),
        ({"timeout": "10"}, r"^timeout: '10' is not"),
        ({"force": "yes"}, r"^force: 'yes' is not a yes or no"),
    ],
)
def test_bad_arguments_are_refused_by_name(conn, dest, args, error):
    with pytest.raises(SpecError, match=error):
        takeover.takeover(conn, "vm", dest, **args)


def test_a_point_whose_parent_is_missing_is_skipped(conn, dest, lost, tmp_path):
    _before, full, inc = lost
    store = bs.Store(dest, "vm")
    store.delete(store.point(full))
    with pytest.raises(SaltKvmError, match=rf"no backup point of vm .* verifies \({inc}: "):
        takeover.takeover(conn, "vm", dest, pool="other")
    assert os.listdir(tmp_path / "other") == []
