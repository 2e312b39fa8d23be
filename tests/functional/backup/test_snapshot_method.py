"""method=snapshot on a shut-off domain of the test driver whose disks are
real files: full and content-based incremental points written by qemu-img,
a restore, and the leftovers of a killed run (an overlay the domain still
points at) merged back by the next run."""

import os
import subprocess

import libvirt
import pytest
from lxml import etree

from salt_kvm.backup import core as backup_core
from salt_kvm.backup import method_api, method_snapshot, restore
from salt_kvm.backup import ops as backup_ops
from salt_kvm.backup import run as backup
from salt_kvm.backup import store as bs
from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt import qemuimg
from salt_kvm.virt.domain import Disk, Domain, new_domain

MIB = 1024**2


def qemu_io(path, command, fmt="qcow2"):
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, path], check=True, capture_output=True)


def pattern_at(path, offset, length, byte, fmt="qcow2"):
    proc = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"read -P {byte} {offset} {length}", path],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0 and "Pattern verification failed" not in proc.stdout


@pytest.fixture
def vm(conn, tmp_path):
    """A shut-off domain like a linked clone (a qcow2 on a base) plus a raw data disk."""
    images = tmp_path / "images"
    images.mkdir()
    base, disk, data = images / "base.qcow2", images / "vm.qcow2", images / "vm-data.raw"
    qemuimg.run("create", "-q", "-f", "qcow2", str(base), "64M")
    qemu_io(str(base), "write -P 1 0 32M")
    qemuimg.create_overlay(str(disk), str(base), "qcow2")
    qemu_io(str(disk), "write -P 2 8M 8M")
    qemuimg.run("create", "-q", "-f", "raw", str(data), "32M")
    qemu_io(str(data), "write -P 3 0 16M", "raw")
    xml = new_domain("vm", "test", 512, 1, str(disk), networks=("default",))
    extra = Disk(etree.SubElement(xml.node.find("devices"), "disk", type="file", device="disk"))
    extra.driver_name, extra.driver_type = "qemu", "raw"
    extra.path, extra.target_dev, extra.target_bus = str(data), "vdb", "virtio"
    dom = conn.defineXML(xml.to_xml())
    assert not dom.isActive()
    return dom, str(disk), str(data), str(base)


@pytest.fixture
def dest(tmp_path):
    path = tmp_path / "backup"
    path.mkdir()
    return str(path)


def dir_pool(conn, name, path):
    """A started dir pool on ``path`` to restore into."""
    path.mkdir()
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
    )
    pool.create(0)
    return pool


def test_full_then_incremental_by_content_and_restore(conn, vm, dest, tmp_path):
    dom, disk, data, base = vm
    events = []
    full = backup.create(
        conn, "vm", dest, method="snapshot", emit=lambda s, d: events.append((s, d))
    )
    assert full["kind"] == "full" and full["method"] == "snapshot"
    assert full["consistency"] == "shut-off" and full["frozen"] is False
    assert full["new_chain_reason"] == "first backup"
    steps = [s for s, _ in events]
    assert steps[0] == "start" and steps[-1] == "done" and "progress" in steps
    phases = {d.get("phase") for s, d in events if s == "progress"}
    assert {"copy", "copied"} <= phases
    assert events[0][1]["method"] == "snapshot"
    assert full["progress"]["processed"] == full["progress"]["total"] == 96 * MIB
    # the steps every method's run reports, in the order they ran (seconds)
    assert list(full["phases"]) == ["check", "manifest", "old checkpoints"]
    # the full point is flat: no backing file, the base's data inside
    folder = bs.Store(dest, "vm").path(full["point"])
    assert "backing-filename" not in qemuimg.info(str(folder / "vda.qcow2"))
    qemuimg.run("compare", "-q", disk, str(folder / "vda.qcow2"))

    qemu_io(disk, "write -P 4 40M 8M")
    qemu_io(data, "write -P 5 4M 4M", "raw")
    inc = backup.create(conn, "vm", dest, method="snapshot")
    assert inc["kind"] == "incremental" and inc["parent"] == full["point"]
    # only what changed is written: 8 MiB and 4 MiB, not 64 and 32
    assert 8 * MIB <= inc["disk_bytes"]["vda"] < 10 * MIB, inc
    assert 4 * MIB <= inc["disk_bytes"]["vdb"] < 6 * MIB, inc
    folder = bs.Store(dest, "vm").path(inc["point"])
    info = qemuimg.info(str(folder / "vda.qcow2"))
    assert info["backing-filename"] == f"../{full['point']}/vda.qcow2"
    qemuimg.run("compare", "-q", disk, str(folder / "vda.qcow2"))
    qemuimg.run("compare", "-q", "-f", "raw", data, str(folder / "vdb.qcow2"))
    assert backup_ops.verify(dest, "vm")["ok"]
    # the disks and the definition are untouched, no overlay anywhere
    assert sorted(os.listdir(os.path.dirname(disk))) == ["base.qcow2", "vm-data.raw", "vm.qcow2"]
    assert [d.path for d in Domain(dom.XMLDesc(0)).disks] == [disk, data]

    # restored as a new domain: the incremental's content
    dir_pool(conn, "restore", tmp_path / "pool")
    made = restore.restore(conn, "vm", dest, target="vm2", pool="restore")
    assert made["chain"] == [full["point"], inc["point"]]
    root, extra = made["volumes"]
    qemuimg.run("compare", "-q", disk, root)
    qemuimg.run("compare", "-q", "-f", "raw", "-F", "qcow2", data, extra)
    # the full point: the earlier content
    made = restore.restore(conn, "vm", dest, point=full["point"], target="vm3", pool="restore")
    assert pattern_at(made["volumes"][0], 40 * MIB, 8 * MIB, 0)
    assert pattern_at(made["volumes"][1], 4 * MIB, 4 * MIB, 3)


def test_a_host_without_sha_instructions_writes_and_checks_blake2b_points(
    conn, vm, dest, tmp_path, monkeypatch
):
    """The algorithm a run uses is the host's (BLAKE2b here); a restore checks
    each point in the algorithm its manifest names, and refuses a changed byte."""
    dom, disk, data, base = vm
    monkeypatch.setattr(bs, "preferred_algorithm", lambda: bs.BLAKE2B)
    full = backup.create(conn, "vm", dest, method="snapshot")
    qemu_io(disk, "write -P 4 40M 8M")
    inc = backup.create(conn, "vm", dest, method="snapshot")
    store = bs.Store(dest, "vm")
    for pid in (full["point"], inc["point"]):
        for image in store.point(pid).disks.values():
            assert image.algorithm == bs.BLAKE2B and image.sha256 is None
            assert image.checksum == bs.checksum_file(store.path(pid, image.file), bs.BLAKE2B)
    assert backup_ops.verify(dest, "vm")["ok"]
    dir_pool(conn, "restore", tmp_path / "pool")
    made = restore.restore(conn, "vm", dest, target="vm2", pool="restore")
    qemuimg.run("compare", "-q", disk, made["volumes"][0])
    with open(store.path(full["point"], "vdb.qcow2"), "r+b") as handle:
        handle.seek(60000)  # past the header, in its cluster: the image stays sound
        handle.write(b"\xff")
    with pytest.raises(SaltKvmError, match=rf"{full['point']}/vdb.qcow2: checksum mismatch"):
        restore.restore(conn, "vm", dest, target="vm3", pool="restore")
    assert "vm3" not in conn.listDefinedDomains()


def test_a_snapshot_point_makes_the_next_api_run_full(conn, vm, dest):
    backup.create(conn, "vm", dest, method="snapshot", disks=["vda"])
    latest = bs.Store(dest, "vm").point("latest")
    assert latest.method == "snapshot" and latest.checkpoint is None
    disks = backup_core.source_disks(conn.lookupByName("vm"), ["vda"])
    assert disks[0].bitmaps  # a checkpoint could be made: only the method is missing
    parent, reason = method_api.ApiMethod().plan(None, disks, latest, False, None, 1)
    assert parent is None and f"{latest.id} was taken with method=snapshot" in reason


def test_bad_method_writes_nothing(conn, vm, dest):
    with pytest.raises(SpecError, match=r"^method: 'copy' .*\(accepted: auto, api, snapshot\)"):
        backup.create(conn, "vm", dest, method="copy")
    assert os.listdir(dest) == []


def test_a_killed_runs_overlay_is_merged_back_by_the_next_run(conn, vm, dest):
    dom, disk, data, base = vm
    first = backup.create(conn, "vm", dest, method="snapshot")
    # what a run killed after its snapshot leaves: the definition on an overlay
    # that took writes, a partial folder, and a stray overlay of an older run
    overlay = method_snapshot.overlay_for(disk, "20261121T010000Z")
    qemuimg.create_overlay(overlay, disk, "qcow2")
    qemu_io(overlay, "write -P 7 0 4M")
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    xml.disks[0].path = overlay
    conn.defineXML(xml.to_xml())
    stray = method_snapshot.overlay_for(data, "20261120T010000Z")
    qemuimg.create_overlay(stray, data, "raw")
    (bs.Store(dest, "vm").root / ".partial-20261121T010000Z").mkdir()

    nxt = backup.create(conn, "vm", dest, method="snapshot")
    assert any(f"merged {overlay} back" in c for c in nxt["cleaned"]), nxt["cleaned"]
    assert any("removed the stray backup overlay" in c for c in nxt["cleaned"]), nxt["cleaned"]
    assert any("removed .partial-" in c for c in nxt["cleaned"]), nxt["cleaned"]
    assert nxt["kind"] == "incremental" and nxt["parent"] == first["point"]
    assert not os.path.exists(overlay) and not os.path.exists(stray)
    inactive = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert [(d.path, d.driver_type) for d in inactive.disks] == [(disk, "qcow2"), (data, "raw")]
    assert pattern_at(disk, 0, 4 * MIB, 7)  # the overlay's writes are in the image now
    assert pattern_at(base, 0, 4 * MIB, 1)  # and the base below it is untouched
    assert 4 * MIB <= nxt["disk_bytes"]["vda"] < 6 * MIB


def test_a_failing_copy_leaves_no_point_and_no_partial(conn, vm, dest, monkeypatch):
    def broken(*args, **kwargs):
        raise backup.SaltKvmError("qemu-img convert failed: No space left on device")

    monkeypatch.setattr(qemuimg, "copy_flat", broken)
    events = []
    with pytest.raises(backup.SaltKvmError, match="No space left"):
        backup.create(conn, "vm", dest, method="snapshot", emit=lambda s, d: events.append(s))
    assert events[-1] == "failed"
    store = bs.Store(dest, "vm")
    assert store.points() == [] and store.partials() == []


def test_progress_of_qemu_img_is_read(tmp_path):
    source, copy = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemuimg.run("create", "-q", "-f", "qcow2", str(source), "64M")
    qemu_io(str(source), "write -P 1 0 64M")
    seen = []
    qemuimg.copy_flat(str(source), "qcow2", str(copy), False, seen.append)
    assert seen and seen[-1] == 100.0 and seen == sorted(seen)
    with pytest.raises(backup.SaltKvmError, match="qemu-img convert .* failed: .*"):
        qemuimg.copy_flat(str(tmp_path / "none.qcow2"), "qcow2", str(copy), False)


def test_takeover_restores_under_the_lost_domains_name(conn, vm, dest, tmp_path):
    dom, disk, data, base = vm
    backup.create(conn, "vm", dest, method="snapshot")
    dom.undefine()  # the host is lost: the domain and its disks are gone
    os.unlink(disk)
    os.unlink(data)
    dir_pool(conn, "other", tmp_path / "other")
    made = restore.restore(conn, "vm", dest, target="vm", pool="other")
    assert made["domain"] == "vm" and not made.get("in_place")
    back = conn.lookupByName("vm")
    assert [d.path for d in Domain(back.XMLDesc(0)).disks] == made["volumes"]
    assert pattern_at(made["volumes"][0], 8 * MIB, 8 * MIB, 2)
    # while the domain exists, target=<its name> is the in-place restore
    with pytest.raises(backup.SaltKvmError, match="force=True"):
        restore.restore(conn, "vm", dest, target="vm", pool="other")


def test_stale_bitmaps_are_removed_from_a_shut_off_domains_images(conn, vm):
    from salt_kvm.backup import core as backup_core

    dom, disk, data, base = vm
    qemuimg.run("bitmap", "--add", disk, "saltkvm-x-1")
    qemuimg.run("bitmap", "--add", disk, "someone-else")
    assert backup_core.remove_bitmaps(dom, "saltkvm-x-1") == [disk]
    left = qemuimg.info(disk)["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in left] == ["someone-else"]
    assert backup_core.remove_bitmaps(dom, "saltkvm-x-1") == []


def test_a_snapshot_during_a_backup_copy_is_refused_naming_the_run(
    conn, vm, dest, tmp_path, monkeypatch
):
    """kvm_backup.snapshot while a method=snapshot run copies: refused (the
    per-domain lock of backups), so the run's overlay never gets a snapshot on
    top that its merge-back would pull away; the backup itself completes."""
    from salt_kvm.backup import snapshots
    from salt_kvm.errors import ConflictError, SaltKvmError

    monkeypatch.setenv("SALT_KVM_LOCK_DIR", str(tmp_path / "locks"))
    dom, disk, data, base = vm
    copy, tried = qemuimg.copy_flat, []

    def copy_and_snapshot(*args, **kwargs):
        for attempt in (
            lambda: snapshots.create(conn, "vm", "s1"),
            lambda: snapshots.delete(conn, "vm", "s1"),
            lambda: snapshots.revert(conn, "vm", "s1"),
        ):
            try:
                attempt()
                tried.append(None)
            except SaltKvmError as exc:
                tried.append(exc)
        return copy(*args, **kwargs)

    monkeypatch.setattr(qemuimg, "copy_flat", copy_and_snapshot)
    result = backup.create(conn, "vm", dest, method="snapshot", disks=["vda"])
    assert result["kind"] == "full"
    assert tried and all(isinstance(e, ConflictError) for e in tried), tried
    assert f"held by backup into {dest} pid {os.getpid()}" in str(tried[0])
    assert dom.snapshotNum(0) == 0
    assert not os.path.exists(snapshots.overlay_path(disk, "s1"))
    with snapshots.locked(dom, "snapshot s2"):  # the run is over: the lock is free
        pass


def test_merge_back_never_deletes_an_overlay_a_snapshot_stands_on(conn, vm):
    """A snapshot (taken outside salt-kvm, say with virsh) put on top of a
    backup run's overlay: the merge-back leaves that overlay (and says so),
    and the domain's chain stays whole."""
    from salt_kvm.errors import SaltKvmError

    dom, disk, data, base = vm
    overlay = method_snapshot.overlay_for(disk, "20261121T010000Z")
    qemuimg.create_overlay(overlay, disk, "qcow2")
    qemu_io(overlay, "write -P 7 0 4M")
    top = os.path.join(os.path.dirname(disk), "vm.s1.qcow2")
    # named relative to the snapshot's folder, as qemu may write it
    qemuimg.run("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", os.path.basename(overlay), top)
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    xml.disks[0].path = top
    conn.defineXML(xml.to_xml())
    frozen = method_snapshot.Frozen("vda", overlay, disk, "qcow2")
    with pytest.raises(SaltKvmError, match=rf"{overlay} kept, it is needed by domain 'vm'"):
        method_snapshot.merge_back(dom, [frozen])
    assert os.path.exists(overlay)
    chain = qemuimg.info(top, chain=True)
    assert [c["filename"] for c in chain] == [top, overlay, disk, base]
    assert pattern_at(top, 0, 4 * MIB, 7)
    assert method_snapshot.reconcile(dom) == [] and os.path.exists(overlay)


def peek_domain(conn, name, path):
    """A shut-off domain on ``path`` (an overlay someone made on another file)."""
    return conn.defineXML(new_domain(name, "test", 512, 1, path).to_xml())


def test_prune_is_refused_while_a_disk_stands_on_a_doomed_image(conn, vm, dest, tmp_path):
    from salt_kvm.errors import ConflictError

    first = backup.create(conn, "vm", dest, method="snapshot", full=True)
    backup.create(conn, "vm", dest, method="snapshot", full=True)
    store = bs.Store(dest, "vm")
    image = str(store.path(first["point"], "vda.qcow2"))
    peek = str(tmp_path / "peek.qcow2")
    qemuimg.create_overlay(peek, image, "qcow2")
    peek_domain(conn, "peek", peek)
    before = [p.id for p in store.points()]
    with pytest.raises(ConflictError, match=r"vda.qcow2 is needed by domain 'peek'"):
        backup_ops.prune(dest, "vm", keep=1, conn=conn)
    assert [p.id for p in store.points()] == before and os.path.exists(image)
    conn.lookupByName("peek").undefine()
    assert backup_ops.prune(dest, "vm", keep=1, conn=conn)["deleted"] == [first["point"]]


def test_in_place_restore_is_refused_while_a_clone_stands_on_the_disk(conn, vm, dest, tmp_path):
    """Replacing vm's image under a quick clone would corrupt the clone."""
    from salt_kvm.errors import ConflictError

    dom, disk, data, base = vm
    backup.create(conn, "vm", dest, method="snapshot")
    clone_disk = str(tmp_path / "clone.qcow2")
    qemuimg.create_overlay(clone_disk, disk, "qcow2")
    peek_domain(conn, "clone", clone_disk)
    before = qemuimg.info(disk)
    with pytest.raises(ConflictError, match=rf"in-place restore of vm: .*{disk} is needed by"):
        restore.restore(conn, "vm", dest, force=True)
    assert qemuimg.info(disk) == before
    assert [c["filename"] for c in qemuimg.info(clone_disk, chain=True)] == [
        clone_disk,
        disk,
        base,
    ]


def test_unfinished_points_are_kept_while_a_disk_stands_on_them(conn, vm, dest, tmp_path):
    from salt_kvm.errors import ConflictError

    partial = bs.Store(dest, "vm").root / ".partial-20261121T010000Z"
    partial.mkdir(parents=True)
    image = str(partial / "vda.qcow2")
    qemuimg.run("create", "-q", "-f", "qcow2", image, "64M")
    peek = str(tmp_path / "peek.qcow2")
    qemuimg.create_overlay(peek, image, "qcow2")
    peek_domain(conn, "peek", peek)
    with pytest.raises(ConflictError, match=r"unfinished backups .*vda.qcow2 is needed by domain"):
        backup.create(conn, "vm", dest, method="snapshot")
    assert os.path.exists(image)
    conn.lookupByName("peek").undefine()
    made = backup.create(conn, "vm", dest, method="snapshot")
    assert any("removed .partial-20261121T010000Z" in c for c in made["cleaned"])


def test_reconcile_passes_over_a_disk_folder_that_cannot_be_listed(conn, vm, tmp_path):
    """A CD-ROM whose ISO's folder is gone (listed first) and the disks' own
    folder: the stray overlay next to the disk is still found and removed, and
    nothing is reported for the folder that could not be listed."""
    dom, disk, data, base = vm
    gone = tmp_path / "gone"
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    devices = xml.node.find("devices")
    cdrom = Disk(etree.Element("disk", type="file", device=Disk.DEVICE_CDROM))
    cdrom.driver_name, cdrom.driver_type = "qemu", "raw"
    cdrom.path, cdrom.target_dev, cdrom.target_bus = str(gone / "seed.iso"), "sda", "sata"
    devices.insert(0, cdrom.node)
    conn.defineXML(xml.to_xml())
    stray = method_snapshot.overlay_for(disk, "20261121T010000Z")
    qemuimg.create_overlay(stray, disk, "qcow2")
    assert method_snapshot.reconcile(dom) == [f"removed the stray backup overlay {stray}"]
    assert not os.path.exists(stray)
