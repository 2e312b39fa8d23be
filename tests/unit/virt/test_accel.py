"""Whether QEMU can use /dev/kvm, and what ``virt_type: auto`` picks (no libvirtd)."""

import logging
import os
import pwd

import libvirt
import pytest

from salt_kvm.virt import accel

ME = pwd.getpwuid(os.getuid())
NOBODY = pwd.getpwnam("nobody")
DISK = ("/var/lib/libvirt/images/base.qcow2", "qcow2")
DEFAULT_PROBE_CPU = accel.PROBE_CPU_SECONDS  # before the fixture makes the bar low


class FakeDomain:
    def __init__(self, states):
        self.states = list(states)
        self.destroyed = False
        self.cpu = 0

    def state(self):
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def info(self):
        self.cpu += 10**9  # a second of CPU per look
        return [1, 0, 0, 1, self.cpu]

    def destroy(self):
        self.destroyed = True


class FakeConn:
    """What choose_virt_type asks of a connection; counts probe guests."""

    def __init__(self, kvm=True, states=((libvirt.VIR_DOMAIN_RUNNING, 1),), error=None):
        self.kvm, self.states, self.error = kvm, states, error
        self.created = []
        self.version = 7002000

    def getURI(self):
        return "qemu+ssh://hv1.example/system"  # remote: no local /dev/kvm check

    def getType(self):
        return "QEMU"

    def getHostname(self):
        return "hv1"

    def getVersion(self):
        return self.version

    def getLibVersion(self):
        return 9000000

    def getCapabilities(self):
        kvm = "<domain type='kvm'/>" if self.kvm else ""
        arch = f"<arch name='x86_64'><domain type='qemu'/>{kvm}</arch>"
        return f"<capabilities><guest>{arch}</guest></capabilities>"

    def createXML(self, xml, flags):
        self.created.append(xml)
        if self.error:
            raise libvirt.libvirtError(self.error)
        self.dom = FakeDomain(self.states)
        return self.dom


@pytest.fixture(autouse=True)
def fast_probe(monkeypatch):
    monkeypatch.setattr(accel, "PROBE_SECONDS", 30)
    monkeypatch.setattr(accel, "PROBE_CPU_SECONDS", 3.0)  # a second of CPU per look
    accel._warned.clear()


def test_a_kvm_guest_that_stops_later_in_its_boot_is_not_taken_for_working(monkeypatch):
    # Seen on a machine with nested KVM: the probe guest ran 3.1 s of CPU, then
    # paused; a 3 s bar said "works" and every virt_type auto create failed.
    monkeypatch.setattr(accel, "PROBE_CPU_SECONDS", DEFAULT_PROBE_CPU)
    running, paused = (libvirt.VIR_DOMAIN_RUNNING, 1), (libvirt.VIR_DOMAIN_PAUSED, 0)
    conn = FakeConn(states=[running] * 8 + [paused])
    works, seen = accel.probe_kvm(conn, DISK)
    assert works is False and "stopped running after" in seen and "paused" in seen


def node(tmp_path, mode, uid=None, gid=None):
    path = tmp_path / "kvm"
    path.write_text("")
    os.chmod(path, mode)
    if uid is not None or gid is not None:
        os.chown(path, uid if uid is not None else -1, gid if gid is not None else -1)
    return str(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize(
    ("mode", "groups", "state"),
    [
        (0o600, set(), "denied"),  # root:root 0600, no udev: the case of issue 17
        (0o660, {0}, "ok"),  # QEMU's user in the node's group
        (0o660, set(), "denied"),  # group-accessible, but not its group
        (0o640, {0}, "denied"),  # group may read, not write
        (0o666, set(), "ok"),
    ],
)
def test_node_access_from_owner_group_and_mode(tmp_path, mode, groups, state):
    path = node(tmp_path, mode, 0, 0)
    got = accel.node_access(path, ("qemu-test", NOBODY.pw_uid, groups or {NOBODY.pw_gid}))
    assert got["state"] == state
    assert got["owner"] == "root" and got["mode"] == f"{mode:04o}"


def test_node_access_owner_and_missing_node(tmp_path):
    path = node(tmp_path, 0o600)
    assert accel.node_access(path, ("me", ME.pw_uid, set()))["state"] == "ok"
    assert accel.node_access(str(tmp_path / "none"), ("me", 1, set()))["state"] == "absent"
    assert accel.node_access(path, None)["state"] == "unknown"


def test_qemu_identity_reads_qemu_conf(tmp_path):
    conf = tmp_path / "qemu.conf"
    conf.write_text(f'#user = "root"\nuser = "{NOBODY.pw_name}"\ngroup = "+4242"\n')
    name, uid, gids = accel.qemu_identity(str(conf))
    assert (name, uid) == (NOBODY.pw_name, NOBODY.pw_uid)
    assert {NOBODY.pw_gid, 4242} <= gids
    conf.write_text(f'user = "+{NOBODY.pw_uid}"\n')
    assert accel.qemu_identity(str(conf))[0] == NOBODY.pw_name
    conf.write_text('user = "no-such-user-salt-kvm"\n')
    assert accel.qemu_identity(str(conf)) is None


def test_remote_host_access_is_unknown():
    got = accel.kvm_access(FakeConn())
    assert got["state"] == "unknown" and "remote" in got["reason"]


def test_denied_node_warns_once_with_the_fix(monkeypatch, caplog):
    class Local(FakeConn):
        def getURI(self):
            return "qemu:///system"

    monkeypatch.setattr(
        accel,
        "node_access",
        lambda *_a: {
            "state": "denied",
            "node": "/dev/kvm",
            "owner": "root",
            "group": "root",
            "mode": "0600",
            "qemu_user": "libvirt-qemu",
        },
    )
    conn = Local()
    with caplog.at_level(logging.WARNING, logger="salt_kvm.virt.accel"):
        first = accel.kvm_access(conn)
        accel.kvm_access(conn)
        choice = accel.choose_virt_type(conn, "auto", None, DISK, cache_dir="/nonexistent/never")
    assert "chgrp kvm /dev/kvm; chmod 0660 /dev/kvm" in first["warning"]
    assert sum(r.message.startswith("qemu:///system: QEMU") for r in caplog.records) == 1
    # Denied: qemu at once, no probe guest (libvirt would spend a minute re-probing).
    assert choice.virt_type == "qemu" and "cannot open /dev/kvm" in choice.note
    assert conn.created == []


def test_auto_probes_once_and_keeps_the_answer(tmp_path):
    conn = FakeConn(states=[(libvirt.VIR_DOMAIN_RUNNING, 1), (libvirt.VIR_DOMAIN_PAUSED, 1)])
    cache = str(tmp_path / "cache")
    first = accel.choose_virt_type(conn, "auto", None, DISK, cache_dir=cache)
    assert first.virt_type == "qemu" and "paused" in first.note
    assert len(conn.created) == 1 and conn.dom.destroyed
    assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
    second = accel.choose_virt_type(conn, "auto", None, DISK, cache_dir=cache)
    assert second.virt_type == "qemu" and "cached" in second.note
    assert len(conn.created) == 1  # no second probe guest
    conn.version = 8000000  # QEMU upgraded: probed again
    accel.choose_virt_type(conn, "auto", None, DISK, cache_dir=cache)
    assert len(conn.created) == 2


def test_auto_is_kvm_when_a_kvm_guest_keeps_running(tmp_path):
    conn = FakeConn()
    assert (
        accel.choose_virt_type(conn, "auto", None, DISK, cache_dir=str(tmp_path)).virt_type == "kvm"
    )
    assert accel.choose_virt_type(conn, "auto", "kvm", cache_dir=str(tmp_path)).note is None
    assert len(conn.created) == 1


def test_probe_that_cannot_start_means_qemu(tmp_path):
    conn = FakeConn(error="Could not access KVM kernel module: Permission denied")
    choice = accel.choose_virt_type(conn, "auto", None, DISK, cache_dir=str(tmp_path))
    assert choice.virt_type == "qemu" and "Permission denied" in choice.note


def test_explicit_and_base_types_are_not_probed(tmp_path):
    conn = FakeConn()
    assert accel.choose_virt_type(conn, "qemu", None, DISK, str(tmp_path)).virt_type == "qemu"
    assert accel.choose_virt_type(conn, "kvm", None, DISK, str(tmp_path)).virt_type == "kvm"
    assert accel.choose_virt_type(conn, "auto", "qemu", DISK, str(tmp_path)).virt_type == "qemu"
    assert conn.created == []
    assert accel.choose_virt_type(FakeConn(kvm=False), "auto", None, DISK, str(tmp_path)).note
    with pytest.raises(Exception, match="virt_type"):
        accel.choose_virt_type(FakeConn(kvm=False), "kvm", None, DISK, str(tmp_path))


@pytest.mark.parametrize("bad", ["symlink", "open", "file"])
def test_cache_dir_not_private_is_not_trusted(tmp_path, bad):
    cache = tmp_path / "cache"
    if bad == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        cache.symlink_to(tmp_path / "elsewhere")
    elif bad == "open":
        cache.mkdir()
        os.chmod(cache, 0o777)
    else:
        cache.write_text("")
    conn = FakeConn()
    for _ in range(2):
        assert accel.choose_virt_type(conn, "auto", None, DISK, str(cache)).virt_type == "kvm"
    assert len(conn.created) == 2  # probed each time, nothing written there
    if bad == "symlink":
        assert os.listdir(tmp_path / "elsewhere") == []


def test_forged_cache_entry_is_ignored(tmp_path):
    conn = FakeConn()
    accel.choose_virt_type(conn, "auto", None, DISK, str(tmp_path))
    (entry,) = [p for p in tmp_path.iterdir() if p.name.startswith("probe-")]
    entry.write_text('{"kvm_works": "yes"}')
    accel.choose_virt_type(conn, "auto", None, DISK, str(tmp_path))
    assert len(conn.created) == 2


def test_probe_boots_the_disk_read_only_without_a_nic(tmp_path):
    conn = FakeConn()
    accel.choose_virt_type(conn, "auto", None, DISK, str(tmp_path))
    xml = conn.created[0]
    assert "<readonly/>" in xml and DISK[0] in xml and "<interface" not in xml


def test_probe_that_cannot_say_is_not_kept(tmp_path):
    # The path names "kvm" (salt-kvm's own names do): still not about KVM.
    conn = FakeConn(error="Failed to get shared 'write' lock on /pool/salt-kvm-base.qcow2")
    for _ in range(2):
        assert accel.choose_virt_type(conn, "auto", None, DISK, str(tmp_path)).virt_type == "kvm"
    assert len(conn.created) == 2 and not list(tmp_path.glob("probe-*"))


def test_no_disk_to_boot_takes_libvirts_word(tmp_path):
    conn = FakeConn()
    assert accel.choose_virt_type(conn, "auto", None, None, str(tmp_path)).virt_type == "kvm"
    assert conn.created == []


def test_answers_of_the_weaker_probe_are_not_reused(monkeypatch):
    conn = FakeConn()
    now = accel.cache_key(conn)
    monkeypatch.setattr(accel, "CACHE_VERSION", 1)  # what a 3 s probe wrote down
    assert accel.cache_key(conn) != now
