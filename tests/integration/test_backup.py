"""kvm_backup on one booted guest with a small data disk: full and incremental
backups, restores (new domain booted, full point, in place), compressed
points, a run killed with
SIGKILL, broken checkpoints, second copies (folder and SSH), the snapshot
method (its points, a copy that fails half-way, a killed run), external and
internal snapshots, events on a master's bus, a shut-off guest, the
execution/state modules through salt-call, and last a takeover from a copy
sent over SSH after the guest is lost: the same guest and minion come back,
first on this host, then on the second hypervisor (hv2) from a copy sent to
it by its host name, with one ``kvm_backup.takeover`` there."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import libvirt
import pytest

from salt_kvm import ssh
from salt_kvm.backup import core as backup_core
from salt_kvm.backup import method_snapshot, restore, snapshots
from salt_kvm.backup import ops as backup_ops
from salt_kvm.backup import run as backup
from salt_kvm.backup import store as bs
from salt_kvm.errors import ConflictError, SaltKvmError, SpecError
from salt_kvm.virt import lifecycle, pools, qemuimg
from salt_kvm.virt.domain import Domain

from . import guests, saltenv
from .conftest import GUEST_PASSWORD, PREFIX, URI, backup_dest, unique
from .saltenv import REPO, minion_config, salt_config
from .sshserver import SshServer

MIB = 1024**2
SSH_PORT = saltenv.port("backup_ssh")


@pytest.fixture(scope="module")
def guest(hv, base_domain):
    name = unique("bk")
    g = guests.boot_guest(hv, base_domain, name, data_size=256 * MIB)
    g.run("mkfs.ext4 -q -L data /dev/vdb && mkdir -p /data && mount /dev/vdb /data")
    yield g
    guests.remove_guest(hv, name)


@pytest.fixture(scope="module")
def dest():
    path = backup_dest("backup")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def snapdest():
    path = backup_dest("snapmethod")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write(g, path, mib):
    out = g.run(
        f"dd if=/dev/urandom of={path} bs=1M count={mib} status=none && sync && md5sum {path}"
    )
    return out.split()[0]


def md5_on_attached(g, hv, image, path="a"):
    """Attach ``image`` to the running test guest as vdc, read a file's md5 from it."""
    disk = (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{image}'/><target dev='vdc' bus='virtio'/><readonly/></disk>"
    )
    g.dom.attachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    try:
        return g.run(
            "for i in $(seq 60); do [ -b /dev/vdc ] && break; sleep 1; done; mkdir -p /mnt/r && "
            f"mount -o ro,noload /dev/vdc /mnt/r && md5sum /mnt/r/{path}; umount /mnt/r"
        ).split()[0]
    finally:
        g.dom.detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        for _ in range(120):
            if "vdc" not in g.dom.XMLDesc(0):
                break
            time.sleep(0.5)


def assert_restores(hv, guest, dest, full, inc, path, latest_md5, full_md5, stem, full_stem):
    """The latest point as a new domain, booted (it leases an address for its
    own MAC), then stopped: /data/<path> on its restored data disk as it was at
    the backup; the full point: the earlier content. The data is read through
    the test guest, not over SSH: the restored guest is the original inside
    (machine-id, host keys, so its DHCP client id), and dnsmasq may hand it the
    running original's address, where SSH reaches the original instead."""
    target = unique(stem)
    try:
        made = restore.restore(hv, guest.name, dest, target=target, start=True)
        assert made["chain"] == [full["point"], inc["point"]]
        dom = hv.lookupByName(target)
        assert guests.wait_booted(dom)
        dom.destroy()
        assert md5_on_attached(guest, hv, made["volumes"][1], path) == latest_md5
    finally:
        guests.remove_guest(hv, target)
    target = unique(full_stem)
    try:
        made = restore.restore(hv, guest.name, dest, point=full["point"], target=target)
        assert md5_on_attached(guest, hv, made["volumes"][1], path) == full_md5
    finally:
        guests.remove_guest(hv, target)


# What later tests build on is a module fixture made on first use, so any test
# runs alone (-k) and in any selection; the test that checks a fixture's
# results is its first user, so in a whole run each is made where it was before.
@pytest.fixture(scope="module")
def api_chain(hv, guest, dest):
    """The first full and incremental point in ``dest`` (/data/a: a1, then a2)."""
    chain = SimpleNamespace(events=[])
    chain.a1 = write(guest, "/data/a", 16)
    chain.full = backup.create(hv, guest.name, dest, emit=lambda s, d: chain.events.append(s))
    chain.a2 = write(guest, "/data/a", 64)
    chain.inc = backup.create(hv, guest.name, dest)
    return chain


def test_full_incremental_and_restores(hv, guest, dest, api_chain):
    full, inc, events = api_chain.full, api_chain.inc, api_chain.events
    assert full["kind"] == "full" and full["frozen"] is True and full["consistency"] == "frozen"
    assert events[0] == "start" and events[-1] == "done"
    assert full["progress"]["processed"] == full["progress"]["total"] > 0
    steps = ["job start", "map", "stream", "sync", "job end", "check", "manifest"]
    assert list(full["phases"]) == [*steps, "old checkpoints"], full["phases"]
    assert inc["kind"] == "incremental" and inc["parent"] == full["point"]
    # close to the 64 MiB changed, nowhere near the disks' size
    assert 64 * MIB <= inc["disk_bytes"]["vdb"] < 80 * MIB, inc
    assert inc["bytes"] < 128 * MIB < full["bytes"]
    points = backup_ops.list_points(dest, guest.name)
    assert [p["id"] for p in points] == [full["point"], inc["point"]]
    assert backup_ops.verify(dest, guest.name)["ok"]

    a1, a2 = api_chain.a1, api_chain.a2
    assert_restores(hv, guest, dest, full, inc, "a", a2, a1, "bkr", "bkf")


def test_concurrent_run_and_bad_input_are_refused(hv, guest, dest):
    with bs.Store(dest, guest.name).locked("test"), pytest.raises(ConflictError, match="lock"):
        backup.create(hv, guest.name, dest)
    empty = backup_dest("bad")
    try:
        with pytest.raises(SpecError, match="^disks: vdz not a disk.*accepted: vda, vdb"):
            backup.create(hv, guest.name, empty, disks=["vdz"])
        with pytest.raises(SpecError, match="^quiesce:.*auto"):
            backup.create(hv, guest.name, empty, quiesce="maybe")
        with pytest.raises(SpecError, match="^method: 'rsync'.*accepted: auto, api, snapshot"):
            backup.create(hv, guest.name, empty, method="rsync")
        with pytest.raises(SpecError, match="^target:"):
            restore.restore(hv, guest.name, dest, target="bad name!")
        assert os.listdir(empty) == []
        assert backup_core.our_checkpoints(guest.dom) and not bs.Store(dest, guest.name).partials()
    finally:
        shutil.rmtree(empty, ignore_errors=True)


def test_a_destination_only_the_caller_can_enter(hv, guest):
    """Pull mode: the run writes the images itself, so a 0700 folder of root's
    (as /root/backups) is enough; QEMU's scratch folder is gone afterwards."""
    private = tempfile.mkdtemp(prefix=f"{PREFIX}private-", dir="/var/tmp")  # 0700
    try:
        write(guest, "/data/p", 24)
        full = backup.create(hv, guest.name, private, disks=["vdb"])
        write(guest, "/data/p", 8)
        inc = backup.create(hv, guest.name, private, disks=["vdb"])
        assert (full["kind"], inc["kind"]) == ("full", "incremental")
        assert inc["disk_bytes"]["vdb"] < 16 * MIB < full["disk_bytes"]["vdb"], inc
        assert backup_ops.verify(private, guest.name)["ok"]
        uuid = guest.dom.UUIDString()
        assert not [n for n in os.listdir("/var/tmp") if n.startswith(f"salt-kvm-backup-{uuid}")]
        tag = backup_core.store_tag(bs.Store(private, guest.name))
        assert len(backup_core.our_checkpoints(guest.dom, tag)) == 1
    finally:
        shutil.rmtree(private, ignore_errors=True)
        for name in backup_core.our_checkpoints(
            guest.dom, backup_core.store_tag(bs.Store(private, guest.name))
        ):
            backup_core.delete_checkpoint(guest.dom, name)


def test_compressed_full_and_incremental_are_smaller_and_restore(hv, guest):
    """compress=True: a full and an incremental on it, both of compressed
    clusters, the full well under an uncompressed one of the same data,
    verified, and each restores its own content; no scratch image stays."""
    plain, packed = backup_dest("plain"), backup_dest("compressed")
    restored = []
    text = "yes 'salt-kvm backups compress what repeats' | head -c {} {} /data/z"
    try:
        z1 = guest.run(f"{text.format('48M', '>')} && sync && md5sum /data/z").split()[0]
        ref = backup.create(hv, guest.name, plain, disks=["vdb"])
        full = backup.create(hv, guest.name, packed, disks=["vdb"], compress=True)
        z2 = guest.run(f"{text.format('16M', '>>')} && sync && md5sum /data/z").split()[0]
        inc = backup.create(hv, guest.name, packed, disks=["vdb"], compress=True)
        assert (full["kind"], inc["kind"], inc["parent"]) == ("full", "incremental", full["point"])
        assert (ref["compression"], full["compression"], inc["compression"]) == (
            None,
            "zstd",
            "zstd",
        )
        # 48 MiB of repeated text: the uncompressed point holds it all, the
        # compressed one little of it (what earlier tests wrote is random: as large)
        sizes = (ref["bytes"], full["bytes"], inc["bytes"])
        assert ref["bytes"] - full["bytes"] > 40 * MIB, sizes
        assert inc["bytes"] < 4 * MIB, sizes  # the 16 MiB appended
        assert backup_ops.verify(packed, guest.name)["ok"]
        for made in (full, inc):
            assert sorted(os.listdir(made["path"])) == ["domain.xml", "manifest.json", "vdb.qcow2"]
        for point, md5 in ((inc["point"], z2), (full["point"], z1)):
            target = unique("bkz")
            restored.append(target)
            made = restore.restore(hv, guest.name, packed, point=point, target=target)
            assert md5_on_attached(guest, hv, made["volumes"][0], "z") == md5
    finally:
        for target in restored:
            guests.remove_guest(hv, target)
        for store in (plain, packed):
            tag = backup_core.store_tag(bs.Store(store, guest.name))
            for name in backup_core.our_checkpoints(guest.dom, tag):
                backup_core.delete_checkpoint(guest.dom, name)
            shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="module")
def killed_run(hv, guest, dest, api_chain):
    """A full run into ``dest`` killed with SIGKILL mid-copy, then the next run
    (/data/a: a3)."""
    store = bs.Store(dest, guest.name)
    run = SimpleNamespace(before=[p.id for p in store.points()])
    _kill_9_mid_copy(store, f"{guest.name!r}, {dest!r}, full=True")
    run.after_kill = [p["id"] for p in backup_ops.list_points(dest, guest.name)]
    run.verified = backup_ops.verify(dest, guest.name)["ok"]
    run.a3 = write(guest, "/data/a", 8)
    run.nxt = backup.create(hv, guest.name, dest)
    return run


def _kill_9_mid_copy(store, args):
    """Start ``backup.create(conn, <args>)`` in a process of its own and SIGKILL it
    once its copy of vda is under way (50 MiB); returns the partial folder it left."""
    code = (
        "import libvirt; from salt_kvm.virt import connection; "
        "from salt_kvm.backup import run as backup; "
        f"backup.create(libvirt.open({URI!r}), {args})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        for _ in range(1200):  # until the copy is under way
            partial = store.partials()
            image = partial[0] / "vda.qcow2" if partial else None
            if image and image.exists() and image.stat().st_size > 50 * MIB:
                break
            assert proc.poll() is None, "the backup ended before it could be killed"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return partial[0]


def test_kill_9_mid_backup_keeps_the_chain_and_next_run_continues(hv, guest, dest, killed_run):
    store = bs.Store(dest, guest.name)
    before, nxt = killed_run.before, killed_run.nxt
    assert killed_run.after_kill == before
    assert killed_run.verified
    assert nxt["kind"] == "incremental" and nxt["parent"] == before[-1], nxt
    assert any("removed .partial-" in c for c in nxt["cleaned"]), nxt["cleaned"]
    assert not store.partials()
    assert len(backup_core.our_checkpoints(guest.dom)) == 1


def test_missing_or_broken_checkpoint_starts_a_new_full_chain(
    hv, guest, dest, api_chain, killed_run
):
    (name,) = backup_core.our_checkpoints(guest.dom)
    # metadata that libvirt believes but whose bitmaps are gone: SlapOS's "inconsistent"
    xml = guest.dom.checkpointLookupByName(name, 0).getXMLDesc(0)
    backup_core.delete_checkpoint(guest.dom, name)
    guest.dom.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
    again = backup.create(hv, guest.name, dest)
    assert again["kind"] == "full" and "failed" in again["new_chain_reason"], again
    # no checkpoint at all
    backup_core.delete_checkpoint(guest.dom, backup_core.our_checkpoints(guest.dom)[0])
    again = backup.create(hv, guest.name, dest)
    assert again["kind"] == "full" and "missing" in again["new_chain_reason"], again
    chains = bs.chains(bs.Store(dest, guest.name).points())
    assert len(chains) == 3
    pruned = backup_ops.prune(dest, guest.name, keep=2)
    first_chain = [api_chain.full["point"], api_chain.inc["point"], killed_run.nxt["point"]]
    assert sorted(pruned["deleted"]) == sorted(first_chain)
    assert backup_ops.verify(dest, guest.name)["ok"]


def guest_host_keys(g):
    """The guest's host key fingerprints, read from its own files (as an
    operator would pin them), not learned from what answers on the network."""
    out = g.run("for k in /etc/ssh/ssh_host_*_key.pub; do ssh-keygen -lf $k; done")
    return [line.split()[1] for line in out.splitlines() if line.strip()]


def test_ssh_copy_to_an_unknown_or_mispinned_host_is_refused(hv, guest, tmp_path):
    """Nothing reaches a host whose key is not known or pinned: no login, no folder."""
    small = backup_dest("refused")
    try:
        backup.create(hv, guest.name, small, disks=["vdb"])
        url = f"ssh://root@{guest.address}/root/refused"
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        with pytest.raises(ssh.HostKeyError, match="unknown host key"):
            backup_ops.replicate(
                small, guest.name, url, password=GUEST_PASSWORD, known_hosts=str(empty)
            )
        wrong = "SHA256:" + "A" * 43
        with pytest.raises(ssh.HostKeyError, match="host_key"):
            backup_ops.replicate(small, guest.name, url, password=GUEST_PASSWORD, host_key=wrong)
        assert guest.run("test -e /root/refused && echo there || echo absent").strip() == "absent"
    finally:
        # this destination goes: so does its checkpoint (later tests count the guest's)
        tag = backup_core.store_tag(bs.Store(small, guest.name))
        for name in backup_core.our_checkpoints(guest.dom, tag):
            backup_core.delete_checkpoint(guest.dom, name)
        shutil.rmtree(small, ignore_errors=True)


def test_second_copies_folder_and_ssh(hv, guest, dest, killed_run):
    copy = backup_dest("copy")
    try:
        first = backup_ops.replicate(dest, guest.name, copy)
        assert first["copied"] == [p["id"] for p in backup_ops.list_points(dest, guest.name)]
        assert backup_ops.replicate(dest, guest.name, copy)["copied"] == []
        assert backup_ops.verify(copy, guest.name)["ok"]
        target = unique("bkc")
        try:
            made = restore.restore(hv, guest.name, copy, target=target)
            assert md5_on_attached(guest, hv, made["volumes"][1]) == killed_run.a3
        finally:
            guests.remove_guest(hv, target)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    # over SSH: a data-disk-only set (small), into the guest itself
    small = backup_dest("small")
    try:
        made = backup.create(hv, guest.name, small, disks=["vdb"])
        assert made["disks"] == ["vdb"]
        url = f"ssh://root@{guest.address}/root/replica"
        pins = guest_host_keys(guest)
        sent = backup_ops.replicate(small, guest.name, url, password=GUEST_PASSWORD, host_key=pins)
        assert sent["copied"] == [made["point"]]
        remote = f"/root/replica/{guest.name}/{made['point']}"
        point = bs.Store(small, guest.name).point("latest")
        summer = backup_ops.SUM_COMMANDS[point.disks["vdb"].algorithm]  # the host's choice
        sums = guest.run(f"cd {remote} && {summer} vdb.qcow2")
        assert sums.split()[0] == point.disks["vdb"].checksum
        again = backup_ops.replicate(small, guest.name, url, password=GUEST_PASSWORD, host_key=pins)
        assert again["copied"] == [] and again["already_there"] == [made["point"]]
        # two destinations keep their own checkpoints
        assert len(backup_core.our_checkpoints(guest.dom)) == 2
    finally:
        shutil.rmtree(small, ignore_errors=True)


# ---- method=snapshot ---------------------------------------------------------------
def _sources(dom, flags=0):
    return {d.target_dev: d.path for d in Domain(dom.XMLDesc(flags)).disks if d.device == "disk"}


def _on_the_original_images(g, before):
    """Live and persistent definitions name the original images; no overlay file is left."""
    assert _sources(g.dom) == before
    assert _sources(g.dom, libvirt.VIR_DOMAIN_XML_INACTIVE) == before
    folders = {os.path.dirname(p) for p in before.values()}
    left = [f for d in folders for f in os.listdir(d) if method_snapshot.OVERLAY_PREFIX in f]
    assert left == []
    if g.dom.isActive():
        assert all(not g.dom.blockJobInfo(t, 0) for t in before)


@pytest.fixture(scope="module")
def snap_chain(hv, guest, snapdest):
    """The first full and incremental method=snapshot point in ``snapdest``
    (/data/s: s1, then s2)."""
    chain = SimpleNamespace(events=[], before=_sources(guest.dom))
    chain.inactive = _sources(guest.dom, libvirt.VIR_DOMAIN_XML_INACTIVE)
    chain.s1 = write(guest, "/data/s", 16)
    chain.full = backup.create(
        hv, guest.name, snapdest, method="snapshot", emit=lambda s, d: chain.events.append((s, d))
    )
    _on_the_original_images(guest, chain.before)  # between the runs
    chain.s2 = write(guest, "/data/s", 64)
    chain.inc = backup.create(hv, guest.name, snapdest, method="snapshot")
    return chain


def test_snapshot_method_full_incremental_and_restores(
    hv, guest, dest, snapdest, api_chain, snap_chain
):
    before, events = snap_chain.before, snap_chain.events
    full, inc = snap_chain.full, snap_chain.inc
    assert before == snap_chain.inactive
    assert full["kind"] == "full" and full["method"] == "snapshot", full
    assert full["frozen"] is True and full["consistency"] == "frozen"
    assert events[0][0] == "start" and events[-1][0] == "done"
    assert {"copy", "copied", "merge"} <= {d.get("phase") for s, d in events if s == "progress"}

    assert inc["kind"] == "incremental" and inc["parent"] == full["point"], inc
    # close to the 64 MiB changed, nowhere near the disks' size, without any bitmap
    assert 64 * MIB <= inc["disk_bytes"]["vdb"] < 80 * MIB, inc
    assert inc["bytes"] < 128 * MIB < full["bytes"]
    _on_the_original_images(guest, before)
    assert backup_ops.verify(snapdest, guest.name)["ok"]
    s1, s2 = snap_chain.s1, snap_chain.s2
    assert guest.run("md5sum /data/s").split()[0] == s2  # the guest goes on

    assert_restores(hv, guest, snapdest, full, inc, "s", s2, s1, "bks", "bksf")
    # the API's chain in the other destination goes on over the snapshot and commit
    api = backup.create(hv, guest.name, dest)
    assert api["kind"] == "incremental" and api["method"] == "api", api
    assert backup_ops.verify(dest, guest.name)["ok"]


def test_snapshot_method_copy_failing_half_way_merges_back(hv, guest):
    before = _sources(guest.dom)
    where = backup_dest("full")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300M,mode=0711", "tmpfs", where], check=True
    )
    try:
        events = []
        with pytest.raises(SaltKvmError, match="No space left on device"):
            backup.create(
                hv, guest.name, where, method="snapshot", emit=lambda s, d: events.append(s)
            )
        assert events[0] == "start" and events[-1] == "failed"
        _on_the_original_images(guest, before)
        assert backup_ops.list_points(where, guest.name) == []
        assert not bs.Store(where, guest.name).partials()
        assert backup_ops.verify(where, guest.name)["ok"]
        assert write(guest, "/data/after-failure", 1)  # the guest writes on
        subprocess.run(["mount", "-o", "remount,size=3G", where], check=True)
        # the copy killed from outside: the same
        killer = threading.Thread(target=_kill_copy_into, args=(where,), daemon=True)
        killer.start()
        with pytest.raises(SaltKvmError, match="qemu-img convert .* failed: exit status -9"):
            backup.create(hv, guest.name, where, method="snapshot")
        killer.join()
        _on_the_original_images(guest, before)
        assert backup_ops.list_points(where, guest.name) == []
        made = backup.create(hv, guest.name, where, method="snapshot")
        assert made["kind"] == "full" and made["cleaned"] == [], made
        _on_the_original_images(guest, before)
        assert backup_ops.verify(where, guest.name)["ok"]
    finally:
        subprocess.run(["umount", where], check=False)
        shutil.rmtree(where, ignore_errors=True)


def _kill_copy_into(where, timeout=300):
    """SIGKILL the qemu-img writing into ``where`` once it has copied 20 MiB."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _processes_using(where):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                images = list(Path(where).glob("*/.partial-*/vda.qcow2"))
                if b"qemu-img" in cmdline[0] and images and images[0].stat().st_size > 20 * MIB:
                    os.kill(int(pid), signal.SIGKILL)
                    return
        time.sleep(0.05)


def _processes_using(path):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if path.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def test_snapshot_method_killed_run_is_merged_back_by_the_next(hv, guest, snapdest, snap_chain):
    before = _sources(guest.dom)
    store = bs.Store(snapdest, guest.name)
    points = [p.id for p in store.points()]
    partial = _kill_9_mid_copy(store, f"{guest.name!r}, {snapdest!r}, full=True, method='snapshot'")
    # the guest runs on the run's overlays; its copy died with it
    assert all(method_snapshot.is_overlay(p) for p in _sources(guest.dom).values())
    for _ in range(50):
        if not _processes_using(str(partial)):
            break
        time.sleep(0.1)
    assert not _processes_using(str(partial))
    s3 = write(guest, "/data/s", 8)  # lands in the overlay
    nxt = backup.create(hv, guest.name, snapdest, method="snapshot")
    merged = [c for c in nxt["cleaned"] if c.startswith("merged ")]
    assert len(merged) == 2 and any("removed .partial-" in c for c in nxt["cleaned"]), nxt
    assert nxt["kind"] == "incremental" and nxt["parent"] == points[-1], nxt
    _on_the_original_images(guest, before)
    assert [p["id"] for p in backup_ops.list_points(snapdest, guest.name)] == points + [
        nxt["point"]
    ]
    target = unique("bkk")
    try:  # what the guest wrote on the overlay went into its image, and so into the backup
        made = restore.restore(hv, guest.name, snapdest, target=target)
        assert md5_on_attached(guest, hv, made["volumes"][1], "s") == s3
    finally:
        guests.remove_guest(hv, target)


@pytest.fixture(scope="module")
def snapshot_round(hv, guest):
    """External snapshot s1 reverted to; s2 on top of it deleted after /data/keep
    was written (kept) onto its overlay; then s1 deleted."""
    done = SimpleNamespace(before=write(guest, "/data/snap", 4))
    done.made = snapshots.create(hv, guest.name, "s1")
    write(guest, "/data/snap", 4)
    with pytest.raises(ConflictError, match="force=True"):  # the guest's writes since
        snapshots.revert(hv, guest.name, "s1")
    done.reverted = snapshots.revert(hv, guest.name, "s1", force=True)
    guests.wait_booted(guest.dom)
    done.after_revert = guest.run("mount /dev/vdb /data && md5sum /data/snap").split()[0]

    snapshots.create(hv, guest.name, "s2")
    done.kept = write(guest, "/data/keep", 4)
    done.overlays = snapshots.list_snapshots(hv, guest.name)[-1]["overlays"]
    done.deleted = snapshots.delete(hv, guest.name, "s2")
    done.kept_after_s2 = guest.run("sync; md5sum /data/keep").split()[0]
    done.s2_overlays_left = [p for p in done.overlays.values() if os.path.exists(p)]
    # s1 goes too: a snapshot left would hold the guest's images (and refuse its removal)
    snapshots.delete(hv, guest.name, "s1")
    return done


def test_snapshot_revert_and_delete(hv, guest, snapshot_round):
    done = snapshot_round
    assert done.made["kind"] == "external" and done.made["quiesced"] is True
    assert done.reverted["restarted"] is True
    assert done.after_revert == done.before

    assert done.deleted["deleted"] is True
    assert done.kept_after_s2 == done.kept
    assert done.s2_overlays_left == []
    assert snapshots.list_snapshots(hv, guest.name) == []
    assert guest.data_path in guest.dom.XMLDesc(0)


def test_internal_snapshot_revert_and_delete(hv, guest):
    where = backup_dest("internal")
    try:
        before = write(guest, "/data/internal", 4)
        made = snapshots.create(hv, guest.name, "i1", disk_only=False)
        assert made["kind"] == "internal" and made["state"] == "running", made
        write(guest, "/data/internal", 4)
        # a backup in between leaves a checkpoint: its dirty bitmap would keep QEMU
        # from loading the snapshot
        taken = backup.create(hv, guest.name, where, disks=["vdb"])
        assert backup_core.our_checkpoints(guest.dom) == [_checkpoint_of(taken)]
        # the running guest's memory and writes since would be thrown away: intent needed
        with pytest.raises(SpecError, match="^force: "):
            snapshots.revert(hv, guest.name, "i1")
        assert backup_core.our_checkpoints(guest.dom) == [_checkpoint_of(taken)]
        reverted = snapshots.revert(hv, guest.name, "i1", force=True)
        assert reverted["kind"] == "internal" and reverted["reverted"] is True
        assert reverted["checkpoints_dropped"] == [_checkpoint_of(taken)]
        assert guest.dom.isActive()  # with its memory: the guest runs on from that instant
        out = guest.run("echo 3 > /proc/sys/vm/drop_caches && md5sum /data/internal")
        assert out.split()[0] == before
        assert snapshots.delete(hv, guest.name, "i1")["deleted"] is True
        assert snapshots.list_snapshots(hv, guest.name) == []
        info = qemuimg.info(guest.data_path)
        assert not info.get("snapshots"), info  # gone from the image too
        again = backup.create(hv, guest.name, where, disks=["vdb"])
        assert again["kind"] == "full" and "missing" in again["new_chain_reason"], again
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _checkpoint_of(result):
    return json.loads((Path(result["path"]) / bs.MANIFEST).read_text())["checkpoint"]


def test_create_fires_events_on_the_master_bus(hv, guest, tmp_path):
    env = saltenv.start_master(tmp_path / "master")
    where = backup_dest("events")
    try:
        minion_id = f"{PREFIX}hv-events"
        (tmp_path / "minion").mkdir()
        conf = salt_config(
            tmp_path / "minion",
            "minion",
            {
                "id": minion_id,
                "master": saltenv.MASTER_ADDRESS,
                "master_port": env.ret_port,
                "file_client": "remote",
                "acceptance_wait_time": 1,
            },
        )
        call = [str(env.bin / "salt-call"), "-c", str(conf), "--out=json", "--log-level=quiet"]
        # the first contact leaves the minion's key pending; accept it as an admin would
        first = subprocess.run([*call, "test.ping"], capture_output=True, text=True, timeout=120)
        assert first.returncode == 2, first.stdout + first.stderr
        env.run("salt-key", "-y", "-a", minion_id)
        watcher = env.watch_events(f"salt/kvm_backup/{guest.name}/*")
        args = [guest.name, f"dest={where}", "disks=[vdb]", "method=snapshot"]
        proc = subprocess.run(
            [*call, "kvm_backup.create", *args], capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        made = json.loads(proc.stdout)["local"]
        time.sleep(3)
        events = env.collected_events(watcher)
    finally:
        saltenv.stop_master(env)
        shutil.rmtree(where, ignore_errors=True)
    tags = [t.rsplit("/", 1)[-1] for t, _ in events]
    assert tags[0] == "start" and tags[-1] == "done" and "progress" in tags, events
    done = events[-1][1].get("data", events[-1][1])
    assert done["point"] == made["point"] and done["kind"] == "full"


@pytest.fixture(scope="module")
def minion(guest, tmp_path_factory):
    """The guest as a minion of a master of this module, as an admin preseeds
    one: keys made on the host, the public one accepted on the master, config
    and keys written into the guest, salt-minion enabled; it answers test.ping."""
    env = saltenv.start_master(tmp_path_factory.mktemp("master"), port_offset=MASTER_OFFSET)
    try:
        keys = tmp_path_factory.mktemp("minion-keys")
        env.run("salt-key", "--gen-keys=minion", f"--gen-keys-dir={keys}")
        pub, pem = (keys / "minion.pub").read_bytes(), (keys / "minion.pem").read_bytes()
        (env.pki / "minions" / guest.name).write_bytes(pub)
        config = {
            "id": guest.name,
            "master": saltenv.MASTER_ADDRESS,
            "master_port": env.ret_port,
            "acceptance_wait_time": 2,
        }
        with guest.session() as session:
            session.check("install -d -m 700 /etc/salt/pki/minion && rm -f /etc/salt/minion_id")
            session.put(pem, "/etc/salt/pki/minion/minion.pem", 0o600)
            session.put(pub, "/etc/salt/pki/minion/minion.pub", 0o644)
            session.put(json.dumps(config).encode(), "/etc/salt/minion", 0o644)
            session.check("systemctl enable salt-minion && systemctl restart salt-minion")
        assert _pinged(env, guest.name), f"{guest.name} never answered test.ping"
        yield SimpleNamespace(env=env, id=guest.name, pub=pub)
    finally:
        saltenv.stop_master(env)


MASTER_OFFSET = saltenv.offset("takeover_master")


def _pinged(env, minion_id, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if env.salt(minion_id, "test.ping", timeout=10).get(minion_id) is True:
            return True
        time.sleep(2)
    return False


def _keys_held(env, minion_id):
    """Where the master holds ``minion_id``'s key: accepted, pending, rejected, denied."""
    return {
        state: (env.pki / state / minion_id).read_bytes()
        for state in ("minions", "minions_pre", "minions_rejected", "minions_denied")
        if (env.pki / state / minion_id).exists()
    }


@pytest.fixture(scope="module")
def shut_off(hv, guest, dest, minion, snap_chain):
    """The guest (a minion: its point holds its id and keys) shut off for the
    rest of the module, and a point of it in ``dest``. Every module fixture that
    needs the guest running (``minion``, ``snap_chain``) is made before it
    stops, so any selection of the tests after it works (``-k shut_off`` ran
    snap_chain's SSH against the stopped guest)."""
    off = SimpleNamespace(shutdown=lifecycle.shutdown(guest.dom, timeout=300))
    off.made = backup.create(hv, guest.name, dest)
    return off


def test_shut_off_guest_backup_and_in_place_restore(hv, guest, dest, shut_off):
    assert shut_off.shutdown
    made = shut_off.made
    assert made["consistency"] == "shut-off" and made["frozen"] is False
    assert not guest.dom.isActive()
    # libvirt 9.0 allows no block operation offline with checkpoints: ours are dropped
    snap = snapshots.create(hv, guest.name, "off1")
    assert snap["quiesced"] is False and snap["checkpoints_dropped"], snap
    assert snapshots.delete(hv, guest.name, "off1")["deleted"] is True
    assert guest.data_path in guest.dom.XMLDesc(0) and not guest.dom.isActive()
    with pytest.raises(ConflictError, match="force=True"):
        restore.restore(hv, guest.name, dest)
    point = bs.Store(dest, guest.name).point("latest")
    qemuimg.run("create", "-q", "-f", "qcow2", guest.data_path + ".junk", "1M")
    os.replace(guest.data_path + ".junk", guest.data_path)  # the disk is lost
    done = restore.restore(hv, guest.name, dest, force=True)
    assert done["in_place"] is True
    folder = bs.Store(dest, guest.name).path(point)
    qemuimg.run("compare", "-q", "-U", guest.data_path, str(folder / "vdb.qcow2"))


def test_snapshot_method_on_the_shut_off_guest(hv, guest, snapdest, snap_chain, shut_off):
    before = _sources(guest.dom)
    made = backup.create(hv, guest.name, snapdest, method="snapshot")
    assert made["kind"] == "incremental" and made["consistency"] == "shut-off", made
    assert not guest.dom.isActive()
    _on_the_original_images(guest, before)
    assert backup_ops.verify(snapdest, guest.name, made["point"])["ok"]


def _salt_call(tmp_path, *args, venv=saltenv.VENV_3008, fails=False, extra=None):
    conf = minion_config(tmp_path, **(extra or {}))
    proc = saltenv.salt_call_proc(conf, *args, venv=venv, timeout=900)
    if fails:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr
    assert proc.returncode in (0, 2), proc.stdout + proc.stderr
    return json.loads(proc.stdout)["local"]


def test_state_backed_up_and_snapshot_states(hv, guest, tmp_path):
    where = backup_dest("state")
    try:
        args = ["state.single", "kvm_backup.backed_up", f"name={guest.name}", f"dest={where}"]
        (ret,) = _salt_call(tmp_path, *args, "max_age=1h", "test=True").values()
        assert ret["result"] is None and ret["changes"]
        assert backup_ops.list_points(where, guest.name) == []
        (ret,) = _salt_call(tmp_path, *args, "max_age=1h", "keep=2").values()
        assert ret["result"] is True and ret["changes"]["backup"]["kind"] == "full", ret
        (ret,) = _salt_call(tmp_path, *args, "max_age=1h").values()
        assert ret["result"] is True and ret["changes"] == {}, ret
        listed = _salt_call(tmp_path, "kvm_backup.list", guest.name, where)
        assert len(listed) == 1
        checked = _salt_call(
            tmp_path, "kvm_backup.verify", guest.name, where, venv=saltenv.VENV_3007
        )
        assert checked["ok"] is True and checked["checked"] == [listed[0]["id"]]
        snap = ["state.single", "kvm_backup.snapshot_present", guest.name, "snapshot=st1"]
        (ret,) = _salt_call(tmp_path, *snap, "test=True").values()
        assert ret["result"] is None
        (ret,) = _salt_call(tmp_path, *snap).values()
        assert ret["result"] is True and ret["changes"]["snapshot"]["new"] == "st1"
        (ret,) = _salt_call(tmp_path, *snap).values()
        assert ret["changes"] == {}
        gone = ["state.single", "kvm_backup.snapshot_absent", guest.name, "snapshot=st1"]
        (ret,) = _salt_call(tmp_path, *gone).values()
        assert ret["result"] is True and ret["changes"]["snapshot"]["old"] == "st1"
        args = ("kvm_backup.restore", guest.name, where, "point=yesterday", "target=x")
        bad = _salt_call(tmp_path, *args, fails=True)
        assert "point: 'yesterday' is not a backup point (accepted: latest" in bad
        args = ["state.single", "kvm_backup.backed_up", f"name={guest.name}", f"dest={where}"]
        bad = _salt_call(tmp_path, *args, "max_age=1s", "method=rsync", fails=True)
        assert '"result": false' in bad, bad
        assert "method: 'rsync' is not a backup method (accepted: auto, api, snapshot)" in bad
        assert backup_ops.list_points(where, guest.name) == listed
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _lose(hv, g):
    """The host dies: the domain and its disks vanish (libvirt only; salt-kvm's
    own removal, as salt-cloud -d, is not what happens to a lost host)."""
    disks = [d.path for d in Domain(g.dom.XMLDesc(0)).disks if d.device == "disk" and d.path]
    if g.dom.isActive():
        g.dom.destroy()
    g.dom.undefineFlags(
        libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    for path in disks:  # each disk's own file; the base a quick clone stands on stays
        hv.storageVolLookupByPath(path).delete(0)


def _identity(dom):
    return dom.UUIDString(), [i.mac for i in Domain(dom.XMLDesc(0)).interfaces]


def test_takeover_from_the_ssh_copy_after_the_guest_is_lost(
    hv, guest, dest, snapshot_round, shut_off, minion, tmp_path
):
    """Last: a backup with a retention of one chain sent to a copy over SSH
    (the second host's folder), the guest lost, then brought back from the copy
    under its own name: same MACs and UUID, /data/keep as written, and the same
    minion answering test.ping with the key its master already holds."""
    other = backup_dest("takeover")  # the second host's folder, reached over SSH
    before, held = _identity(guest.dom), _keys_held(minion.env, minion.id)
    assert held == {"minions": minion.pub}
    try:
        with SshServer(SSH_PORT, "root", GUEST_PASSWORD) as server:
            url = f"ssh://root@127.0.0.1:{SSH_PORT}{other}"
            copies = json.dumps(
                [
                    {
                        "target": url,
                        "host_key": server.fingerprint,
                        "password_pillar": "kvm:backup:ssh_password",
                    }
                ]
            )
            conf = tmp_path / "hv"
            conf.mkdir()
            made = _salt_call(
                conf,
                "kvm_backup.create",
                guest.name,
                f"dest={dest}",
                "keep=1",
                f"copies={copies}",
                venv=saltenv.VENV_3008,
                extra={"kvm": {"backup": {"ssh_password": GUEST_PASSWORD}}},
            )
        kept = backup_ops.list_points(dest, guest.name)
        # the second place holds only the kept chain, as the first place does
        assert len({p["chain"] for p in kept}) == 1 and kept[-1]["id"] == made["point"], kept
        assert [p["id"] for p in backup_ops.list_points(other, guest.name)] == [
            p["id"] for p in kept
        ]
        assert made["copies"][0]["copied"] == [p["id"] for p in kept]
        _lose(hv, guest)
        with pytest.raises(libvirt.libvirtError):
            hv.lookupByName(guest.name)
        assert backup_ops.verify(other, guest.name)["ok"]
        made = restore.restore(hv, guest.name, other, target=guest.name, start=True)
        assert made["domain"] == guest.name and made["started"] is True, made
        assert made["identity"] == "kept"
        back = guests.TestGuest(guest.name, hv.lookupByName(guest.name), "", None)
        assert _identity(back.dom) == before  # the same MACs (and UUID) as before the loss
        back.address = guests.wait_booted(back.dom)
        out = back.run("mount /dev/vdb /data && md5sum /data/keep")
        assert out.split()[0] == snapshot_round.kept
        # the same minion: its id, and the key the master accepted before the loss
        inside = back.run("cat /etc/salt/pki/minion/minion.pub && cat /etc/salt/minion")
        assert minion.pub.decode().strip() in inside and f'"id": "{minion.id}"' in inside
        assert _pinged(minion.env, minion.id), "the restored minion never answered test.ping"
        assert _keys_held(minion.env, minion.id) == held  # nothing new to accept
    finally:
        shutil.rmtree(other, ignore_errors=True)


def _hosts_config(replica, fingerprint, uri2):
    """The hypervisors' ``kvm:hosts``: hv1 (this bed's libvirtd) and hv2, whose
    replica folder is reached over SSH (the loopback server stands for its sshd)."""
    return {
        "hosts": {
            "hv1": {"uri": URI},
            "hv2": {
                "uri": uri2,
                "backup": f"ssh://root@127.0.0.1:{SSH_PORT}{replica}",
                "host_key": fingerprint,
                "password_pillar": "kvm:backup:ssh_password",
            },
        },
        "backup": {"ssh_password": GUEST_PASSWORD},
    }


def test_takeover_on_the_second_host_by_name(hv, hv2, guest, minion, tmp_path):
    """The guest (a minion) backed up on hv1 and replicated to hv2 by its host
    name; a takeover on hv2 is refused while the guest runs on hv1; then hv1
    loses it and one ``kvm_backup.takeover`` on hv2 brings it up there: the
    data written before the backup, the same MACs and UUID, the same minion
    answering with the key its master holds."""
    uri2, conn2 = hv2
    dom = hv.lookupByName(guest.name)  # the takeover above brought it back as a new object
    if not dom.isActive():
        dom.create()
    g = guests.TestGuest(guest.name, dom, guests.wait_booted(dom), None)
    assert _pinged(minion.env, minion.id)
    mark = write(g, "/root/takeover-mark", 4)
    before, held = _identity(dom), _keys_held(minion.env, minion.id)
    source, replica = backup_dest("tko-src"), backup_dest("tko-hv2")
    hv1_conf, hv2_conf = tmp_path / "hv1", tmp_path / "hv2"
    hv1_conf.mkdir()
    hv2_conf.mkdir()
    try:
        made = backup.create(hv, guest.name, source)
        with SshServer(SSH_PORT, "root", GUEST_PASSWORD) as server:
            kvm = _hosts_config(replica, server.fingerprint, uri2)
            sent = _salt_call(
                hv1_conf,
                "kvm_backup.replicate",
                guest.name,
                source,
                "host=hv2",
                extra={"id": "hv1", "kvm": kvm},
            )
        assert sent["copied"] == [made["point"]] and sent["target"].endswith(replica), sent
        takeover = ("kvm_backup.takeover", guest.name, f"uri={uri2}", "timeout=5")
        refused = _salt_call(hv2_conf, *takeover, fails=True, extra={"id": "hv2", "kvm": kvm})
        assert f"{guest.name} still runs on hv1" in refused and "force=True" in refused
        with pytest.raises(libvirt.libvirtError):
            conn2.lookupByName(guest.name)
        _lose(hv, g)  # hv1 is "gone": its guest with it
        started = time.monotonic()
        done = _salt_call(hv2_conf, *takeover, extra={"id": "hv2", "kvm": kvm})
        print(f"\ntakeover on hv2: {time.monotonic() - started:.1f} s")
        assert done["domain"] == guest.name and done["started"] is True, done
        assert done["point"] == made["point"] and done["skipped"] == {}
        assert done["identity"] == "kept" and done["hosts"] == {"hv1": "absent"}
        back = conn2.lookupByName(guest.name)
        assert _identity(back) == before and back.isActive()
        assert _pinged(minion.env, minion.id), "the minion never answered from hv2"
        out = minion.env.salt(minion.id, "cmd.run", "md5sum /root/takeover-mark", timeout=60)
        assert out[minion.id].split()[0] == mark
        assert _keys_held(minion.env, minion.id) == held  # nothing new to accept
    finally:
        guests.remove_guest(conn2, guest.name)
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(replica, ignore_errors=True)


# ---- a snapshot during a method=snapshot run ------------------------------------------
def _during_copy(monkeypatch, action):
    """Run ``action`` once, while the run copies (deterministic: in its copy step)."""
    copy, seen = qemuimg.copy_flat, []

    def hooked(*args, **kwargs):
        if not seen:
            try:
                seen.append(action())
            except SaltKvmError as exc:
                seen.append(exc)
        return copy(*args, **kwargs)

    monkeypatch.setattr(qemuimg, "copy_flat", hooked)
    return seen


def test_snapshot_during_a_snapshot_method_run_never_breaks_the_chain(hv, base_domain, monkeypatch):
    """kvm_backup.snapshot while a method=snapshot run copies is refused naming
    the run; a snapshot taken around salt-kvm (libvirt directly) on the run's
    overlay is kept by the merge-back, and the guest still boots from its chain."""
    name, where = unique("bkrace"), backup_dest("race")
    g = guests.boot_guest(hv, base_domain, name)
    top = None
    try:
        before = _sources(g.dom)
        disk = before["vda"]
        refused = _during_copy(monkeypatch, lambda: snapshots.create(hv, name, "s1"))
        made = backup.create(hv, name, where, method="snapshot", disks=["vda"])
        assert made["kind"] == "full"
        assert isinstance(refused[0], ConflictError), refused
        assert f"held by backup into {where} pid {os.getpid()}" in str(refused[0])
        assert snapshots.list_snapshots(hv, name) == []
        _on_the_original_images(g, before)

        # around salt-kvm: a disk-only snapshot on top of the run's overlay
        top = snapshots.overlay_path(disk, "outside")
        xml = snapshots.external_xml("outside", None, {"vda": top}, [])
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        _during_copy(monkeypatch, lambda: g.dom.snapshotCreateXML(xml, flags))
        with pytest.raises(SaltKvmError, match=r"kept, it is needed by volume .*outside"):
            # full: its copy is the step hooked (an incremental rebases instead)
            backup.create(hv, name, where, method="snapshot", disks=["vda"], full=True)
        assert _sources(g.dom)["vda"] == top
        assert _sources(g.dom, libvirt.VIR_DOMAIN_XML_INACTIVE)["vda"] == top
        chain = [c["filename"] for c in qemuimg.info(top, chain=True)]
        assert chain[0] == top and method_snapshot.is_overlay(chain[1]) and chain[2] == disk, chain
        assert all(os.path.exists(p) for p in chain)
        g.dom.destroy()  # a fresh start opens the whole chain again
        g.dom.create()
        guests.wait_booted(g.dom)
        assert g.run("echo booted").strip() == "booted"
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            g.dom.destroy()
        if top is not None:  # this test's own chain on the guest's volume
            for path in [top, *[f for f in _overlays_of(disk)]]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        guests.remove_guest(hv, name)
        shutil.rmtree(where, ignore_errors=True)


def _overlays_of(disk):
    folder = os.path.dirname(disk)
    stem = os.path.basename(disk).rsplit(".", 1)[0]
    return [
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.startswith(f"{stem}.") and method_snapshot.is_overlay(f)
    ]


def test_snapshot_revert_and_delete_refuse_an_overlay_others_stand_on(hv, base_domain):
    """A volume made by hand on a snapshot's overlay: reverting (which empties
    the overlay) and deleting (which merges it away) are refused naming it."""
    name = unique("snapdep")
    dom, _ = guests.define_guest(hv, base_domain, name)  # shut off: no boot needed
    folder = os.path.dirname(_sources(dom)["vda"])
    hand = None
    try:
        snapshots.create(hv, name, "s1", quiesce=False)
        overlay = snapshots.list_snapshots(hv, name)[0]["overlays"]["vda"]
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 1M", overlay], check=True)
        hand = guests.data_volume(hv, "default", f"{name}-hand.qcow2", 1 << 30)
        # a hand-made overlay: the same as an image someone made with qemu-img -b
        qemuimg.rebase_unsafe(hand, overlay, "qcow2")
        pools.refresh(hv.storagePoolLookupByName("default"))
        for attempt in (
            lambda: snapshots.revert(hv, name, "s1"),
            lambda: snapshots.delete(hv, name, "s1"),
        ):
            with pytest.raises(ConflictError, match=rf"{overlay} is needed by volume {hand}"):
                attempt()
            check = subprocess.run(
                ["qemu-io", "-f", "qcow2", "-c", "read -P 9 0 1M", hand],
                capture_output=True,
                text=True,
            )
            assert check.returncode == 0 and "verification failed" not in check.stdout
        assert [s["name"] for s in snapshots.list_snapshots(hv, name)] == ["s1"]
        hv.storageVolLookupByPath(hand).delete(0)
        hand = None
        assert snapshots.delete(hv, name, "s1")["deleted"] is True  # nothing stands on it now
    finally:
        if hand is not None:
            with contextlib.suppress(libvirt.libvirtError):
                hv.storageVolLookupByPath(hand).delete(0)
        with contextlib.suppress(libvirt.libvirtError):
            for snap in dom.listAllSnapshots(0):
                snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        for path in _overlays_named(folder, name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        guests.remove_guest(hv, name)


def _overlays_named(folder, name):
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(f"{name}.s1")]
