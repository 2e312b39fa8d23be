"""Restores on the test driver with disks in real files: an in-place restore
keeps each disk's format, and a store is untrusted input (its manifests, the
files they name, the images' headers): a hostile one is refused by name
before anything is written, by restore, verify, list, prune and replicate."""
# ruff: noqa: F401, F811 - the fixtures of test_backup_snapshot, shared

import json
import os
import shutil

import libvirt
import pytest

from salt_kvm.backup import ops as backup_ops
from salt_kvm.backup import restore, verify
from salt_kvm.backup import run as backup
from salt_kvm.backup import store as bs
from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt import qemuimg
from salt_kvm.virt.domain import Domain
from tests.functional.backup.test_snapshot_method import dest, dir_pool, pattern_at, qemu_io, vm

MIB = 1024**2


def probed_format(path):
    """What the file is (qemu-img's own probe), whatever a definition says."""
    return qemuimg.info(path)["format"]


def definition(dom):
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return {d.target_dev: (d.type, d.driver_type, d.path) for d in xml.disks}


def test_in_place_restore_keeps_each_disks_format(conn, vm, dest):
    dom, disk, data, base = vm
    before = definition(dom)
    made = backup.create(conn, "vm", dest, method="snapshot")
    qemu_io(data, "write -P 7 0 16M", "raw")  # what the restore must undo
    qemu_io(disk, "write -P 8 40M 4M")

    done = restore.restore(conn, "vm", dest, force=True)

    assert done["in_place"] and done["point"] == made["point"]
    assert definition(dom) == before
    assert probed_format(data) == "raw" and probed_format(disk) == "qcow2"
    assert done["formats"] == {"vda": "qcow2", "vdb": "raw"}
    assert pattern_at(data, 0, 16 * MIB, 3, "raw")  # the backed-up data, read as raw
    assert pattern_at(data, 16 * MIB, 16 * MIB, 0, "raw")
    assert pattern_at(disk, 40 * MIB, 4 * MIB, 0) and pattern_at(disk, 8 * MIB, 8 * MIB, 2)
    folder = bs.Store(dest, "vm").path(made["point"])
    qemuimg.run("compare", "-q", "-f", "raw", "-F", "qcow2", data, str(folder / "vdb.qcow2"))
    assert sorted(os.listdir(os.path.dirname(disk))) == ["base.qcow2", "vm-data.raw", "vm.qcow2"]


def test_in_place_restore_writes_the_file_a_symlinked_disk_names(conn, vm, dest, tmp_path):
    dom, disk, data, base = vm
    link = tmp_path / "data-link"
    link.symlink_to(data)
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    xml.disks[1].path = str(link)
    xml.disks[1].driver_type = "raw"
    conn.defineXML(xml.to_xml())
    backup.create(conn, "vm", dest, method="snapshot")
    qemu_io(data, "write -P 7 0 16M", "raw")
    restore.restore(conn, "vm", dest, force=True)
    assert link.is_symlink() and os.readlink(link) == data
    assert probed_format(data) == "raw" and pattern_at(data, 0, 16 * MIB, 3, "raw")


@pytest.mark.parametrize(
    "kind,fmt,match",
    [
        ("network", "raw", r"vdb: a disk of type 'network' is not restored in place"),
        ("file", "vmdk", r"vdb: its format 'vmdk' is not restored in place \(accepted: raw, qcow2"),
        ("block", "raw", r"vdb: .* is not a block device, though the definition says"),
    ],
)
def test_in_place_restore_refuses_disks_it_cannot_keep(conn, vm, dest, kind, fmt, match):
    dom, disk, data, base = vm
    backup.create(conn, "vm", dest, method="snapshot")
    qemu_io(data, "write -P 7 0 16M", "raw")
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    node = xml.disks[1]
    node.driver_type = fmt
    if kind == "block":
        node.set_block(data)  # a regular file where the definition says block
    elif kind == "network":
        for child in list(node.node):
            if child.tag == "source":
                node.node.remove(child)
        node.type = "network"
        node.node.insert(1, Domain(f"<source protocol='nbd' name='{data}'/>").node)
    conn.defineXML(xml.to_xml())
    sums = {p: bs.sha256_file(p) for p in (disk, data)}
    with pytest.raises(SaltKvmError, match=match):
        restore.restore(conn, "vm", dest, force=True)
    assert {p: bs.sha256_file(p) for p in (disk, data)} == sums  # nothing written
    assert sorted(os.listdir(os.path.dirname(disk))) == ["base.qcow2", "vm-data.raw", "vm.qcow2"]


def test_restore_as_new_domain_formats_match_the_definition(conn, vm, dest, tmp_path):
    backup.create(conn, "vm", dest, method="snapshot")
    dir_pool(conn, "restore", tmp_path / "pool")
    made = restore.restore(conn, "vm", dest, target="vm2", pool="restore")
    disks = definition(conn.lookupByName("vm2"))
    assert [p for _, _, p in disks.values()] == made["volumes"]
    for kind, fmt, path in disks.values():
        assert (kind, fmt, probed_format(path)) == ("file", "qcow2", "qcow2")


# ---- a hostile store --------------------------------------------------------------
@pytest.fixture
def stored(conn, vm, dest, tmp_path):
    """Two chains of points of ``vm`` (full + incremental, then full) and a
    qcow2 outside the store; returns (store, [points], outside image)."""
    dom, disk, data, base = vm
    ids = [backup.create(conn, "vm", dest, method="snapshot")["point"]]
    qemu_io(data, "write -P 5 4M 4M", "raw")
    ids.append(backup.create(conn, "vm", dest, method="snapshot")["point"])
    ids.append(backup.create(conn, "vm", dest, method="snapshot", full=True)["point"])
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.qcow2"
    qemuimg.run("create", "-q", "-f", "qcow2", str(secret), "64M")
    qemu_io(str(secret), "write -P 9 0 1M")
    dir_pool(conn, "restore", tmp_path / "pool")
    store = bs.Store(dest, "vm")
    return store, [store.point(i) for i in ids], secret


def _manifest(store, pid):
    return store.path(pid, bs.MANIFEST)


def _edit(store, pid, change):
    path = _manifest(store, pid)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _describe(data, path):
    """Make a manifest entry describe the file at ``path`` (size, checksum in
    the entry's algorithm)."""
    data["size"] = os.path.getsize(path)
    algorithm = data.get("algorithm") or bs.SHA256
    data[algorithm] = bs.checksum_file(os.path.realpath(path), algorithm)


def _absolute_file(store, points, secret):
    def change(data):
        data["disks"]["vda"]["file"] = str(secret)
        _describe(data["disks"]["vda"], secret)

    _edit(store, points[-1].id, change)
    return r"disks\.vda\.file: .*secret.qcow2' is not the disk's image \(accepted: vda.qcow2\)"


def _dotdot_file(store, points, secret):
    rel = os.path.relpath(secret, store.path(points[-1]))

    def change(data):
        data["disks"]["vda"]["file"] = rel
        _describe(data["disks"]["vda"], secret)

    _edit(store, points[-1].id, change)
    return r"disks\.vda\.file: '\.\./.*' is not the disk's image"


def _other_domain(store, points, secret):
    _edit(store, points[-1].id, lambda data: data.update(domain="other"))
    return r"domain: 'other' is not the domain asked for \(accepted: vm\)"


def _id_not_the_folder(store, points, secret):
    _edit(store, points[-1].id, lambda data: data.update(id="../../../tmp"))
    return r"id: '\.\./\.\./\.\./tmp' is not valid"


def _id_with_newline(store, points, secret):
    _edit(store, points[-1].id, lambda data: data.update(id=points[-1].id + "\n"))
    return r"id: .* is not valid"


def _foreign_checkpoint(store, points, secret):
    _edit(store, points[-1].id, lambda data: data.update(checkpoint="someone-elses"))
    return r"checkpoint: 'someone-elses' is not valid"


def _target_escapes(store, points, secret):
    def change(data):
        data["disks"]["../vda"] = data["disks"].pop("vda")

    _edit(store, points[-1].id, change)
    return r"disks: '\.\./vda' is not a disk target"


def _symlinked_image(store, points, secret):
    image = store.path(points[-1], "vda.qcow2")
    image.unlink()
    image.symlink_to(secret)
    _edit(store, points[-1].id, lambda data: _describe(data["disks"]["vda"], secret))
    return r"vda.qcow2: a symbolic link \(refused"


def _symlinked_point(store, points, secret):
    folder = store.path(points[-1])
    moved = secret.parent / "moved"
    shutil.move(str(folder), moved)
    folder.symlink_to(moved)
    return r"folder: is not a folder \(a symbolic link\?\)"


def _header_backing_shadow(store, points, secret):
    image = store.path(points[-1], "vda.qcow2")
    qemuimg.rebase_unsafe(str(image), "/etc/shadow", "raw")
    _edit(store, points[-1].id, lambda data: _describe(data["disks"]["vda"], image))
    return r"its backing file is '/etc/shadow', not None \(refused: it leaves the chain\)"


def _manifest_backing_shadow(store, points, secret):
    _edit(store, points[1].id, lambda data: data["disks"]["vda"].update(backing="/etc/shadow"))
    return r"disks\.vda\.backing: '/etc/shadow' is not the parent point's image"


def _backing_another_chain(store, points, secret):
    # the newest full point's image claims the first chain's full as its backing file
    image = store.path(points[-1], "vda.qcow2")
    qemuimg.rebase_unsafe(str(image), f"../{points[0].id}/vda.qcow2")
    _edit(store, points[-1].id, lambda data: _describe(data["disks"]["vda"], image))
    return r"its backing file is '\.\./.*/vda.qcow2', not None"


def _incremental_skips_its_parent(store, points, secret):
    # an incremental of the first chain whose image names another point than its parent
    image = store.path(points[1], "vda.qcow2")
    qemuimg.rebase_unsafe(str(image), f"../{points[2].id}/vda.qcow2")
    _edit(store, points[1].id, lambda data: _describe(data["disks"]["vda"], image))
    return rf"its backing file is '\.\./{points[2].id}/vda.qcow2', not '\.\./{points[0].id}/"


def _external_data_file(store, points, secret):
    image = store.path(points[-1], "vda.qcow2")
    image.unlink()
    qemuimg.run("create", "-q", "-f", "qcow2", "-o", f"data_file={secret}.raw", str(image), "64M")
    _edit(store, points[-1].id, lambda data: _describe(data["disks"]["vda"], image))
    return r"names an external data file"


HOSTILE = [
    _absolute_file,
    _dotdot_file,
    _other_domain,
    _id_not_the_folder,
    _id_with_newline,
    _foreign_checkpoint,
    _target_escapes,
    _symlinked_image,
    _symlinked_point,
    _header_backing_shadow,
    _manifest_backing_shadow,
    _backing_another_chain,
    _incremental_skips_its_parent,
    _external_data_file,
]


def _restored_point(points, hostile):
    """The point whose restore meets the hostile file."""
    return (
        points[1]
        if hostile in (_manifest_backing_shadow, _incremental_skips_its_parent)
        else points[-1]
    )


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__.strip("_"))
def test_a_hostile_store_is_refused_by_name_and_nothing_is_written(
    conn,
    vm,
    tmp_path,
    stored,
    hostile,
):
    dom, disk, data, base = vm
    store, points, secret = stored
    match = hostile(store, points, secret)
    point = _restored_point(points, hostile)
    sums = {p: bs.sha256_file(p) for p in (disk, data)}
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    with pytest.raises(SaltKvmError, match=match):
        restore.restore(conn, "vm", store.dest, point=point.id, target="vm2", pool="restore")
    with pytest.raises(SaltKvmError, match=match):
        restore.restore(conn, "vm", store.dest, point=point.id, force=True)
    assert os.listdir(tmp_path / "pool") == []
    assert "vm2" not in [d.name() for d in conn.listAllDomains(0)]
    assert {p: bs.sha256_file(p) for p in (disk, data)} == sums
    assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == xml

    report = backup_ops.verify(str(store.dest), "vm")
    assert report["ok"] is False
    assert any(
        point.id in key and any(_matches(match, p) for p in problems)
        for key, problems in report["problems"].items()
    ), report
    one = backup_ops.verify(str(store.dest), "vm", point.id)
    assert one["ok"] is False, one
    # list shows only sound manifests; prune and replicate never act on a hostile one
    listed = [p["id"] for p in backup_ops.list_points(str(store.dest), "vm")]
    assert set(listed) <= {p.id for p in points}
    copy = tmp_path / "copy"
    backup_ops.replicate(str(store.dest), "vm", str(copy))
    for each in bs.Store(copy, "vm").points():
        assert not verify.verify_point(bs.Store(copy, "vm"), each), each.id
    assert bs.sha256_file(secret) not in {bs.sha256_file(p) for p in _files(copy)}


def _matches(pattern, text):
    import re

    return re.search(pattern, text) is not None


def _files(root):
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_a_hostile_latest_point_is_refused_not_skipped(conn, vm, tmp_path, stored):
    store, points, secret = stored
    _other_domain(store, points, secret)
    with pytest.raises(SaltKvmError, match=rf"backup point {points[-1].id}: domain: 'other'"):
        restore.restore(conn, "vm", store.dest, target="vm2", pool="restore")
    assert os.listdir(tmp_path / "pool") == []
    # prune keeps the newest chain it can read and never deletes the hostile folder
    assert backup_ops.prune(str(store.dest), "vm", keep=1)["deleted"] == []
    assert store.path(points[-1]).is_dir()


@pytest.mark.parametrize("domain", ["../vm", "vm/../../etc", ".", "..", "", "vm\n", "-x"])
def test_a_domain_name_cannot_leave_the_destination(dest, domain):
    with pytest.raises(SpecError, match=r"^domain: .* is not a domain name a backup folder"):
        bs.Store(dest, domain)
    with pytest.raises(SpecError, match=r"^domain: "):
        backup_ops.verify(dest, domain)
    assert os.listdir(dest) == []


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@pytest.mark.parametrize(
    "extra,match",
    [
        (
            "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0' "
            "slot='2' function='0'/></source></hostdev>",
            "hostdev device",
        ),
        (
            "<filesystem type='mount'><source dir='/'/><target dir='host'/></filesystem>",
            "filesystem device",
        ),
        (
            "<serial type='file'><source path='/etc/shadow'/><target port='1'/></serial>",
            "serial of type 'file'",
        ),
        ("<os-kernel>/etc/shadow</os-kernel>", "os/kernel"),
        (f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg value='-x'/>", "qemu:commandline"),
    ],
    ids=["hostdev", "filesystem", "serial-file", "kernel", "qemu-commandline"],
)
def test_a_hostile_domain_xml_gives_the_new_domain_nothing_of_the_host(
    conn, tmp_path, stored, extra, match
):
    from lxml import etree

    store, points, secret = stored
    point = points[-1]
    path = store.path(point, bs.DOMAIN_XML)
    root = etree.fromstring(path.read_bytes())
    if extra.startswith("<os-kernel>"):
        etree.SubElement(root.find("os"), "kernel").text = "/etc/shadow"
    elif extra.startswith("<qemu:"):
        node = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
        etree.SubElement(node, f"{{{QEMU_NS}}}arg", value="-x")
    else:
        root.find("devices").append(etree.fromstring(extra))
    path.write_bytes(etree.tostring(root))
    _edit(store, point.id, lambda data: data.update(domain_xml_sha256=bs.sha256_file(path)))
    with pytest.raises(SaltKvmError, match=rf"domain.xml asks for {match}.*refused"):
        restore.restore(conn, "vm", store.dest, target="vm2", pool="restore")
    assert os.listdir(tmp_path / "pool") == []
    assert "vm2" not in [d.name() for d in conn.listAllDomains(0)]


def test_a_passthrough_disk_of_the_backup_definition_is_not_restored(conn, tmp_path, stored):
    from lxml import etree

    store, points, secret = stored
    point = points[-1]
    path = store.path(point, bs.DOMAIN_XML)
    root = etree.fromstring(path.read_bytes())
    root.find("devices").append(
        etree.fromstring(
            "<disk type='block' device='lun'><source dev='/dev/sda'/>"
            "<target dev='sdz' bus='scsi'/></disk>"
        )
    )
    path.write_bytes(etree.tostring(root))
    _edit(store, point.id, lambda data: data.update(domain_xml_sha256=bs.sha256_file(path)))
    made = restore.restore(conn, "vm", store.dest, target="vm2", pool="restore")
    assert [p for _, _, p in definition(conn.lookupByName("vm2")).values()] == made["volumes"]


def test_a_tampered_previous_point_is_never_read_by_the_next_backup(conn, vm, dest):
    dom, disk, data, base = vm
    store = bs.Store(dest, "vm")
    first = backup.create(conn, "vm", dest, method="snapshot")["point"]
    image = store.path(first, "vdb.qcow2")
    qemuimg.rebase_unsafe(str(image), "/etc/shadow", "raw")
    _edit(store, first, lambda data: _describe(data["disks"]["vdb"], image))
    nxt = backup.create(conn, "vm", dest, method="snapshot")
    assert nxt["kind"] == "full", nxt
    assert "/etc/shadow" in nxt["new_chain_reason"] and "new full chain" in nxt["new_chain_reason"]
    assert "backing-filename" not in qemuimg.info(str(store.path(nxt["point"], "vdb.qcow2")))


def test_a_lock_file_planted_as_a_link_is_never_followed(conn, tmp_path, stored):
    store, points, secret = stored
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (store.root / bs.LOCK).unlink()
    (store.root / bs.LOCK).symlink_to(victim)
    with pytest.raises(SaltKvmError, match=r"lock file .*/\.lock is a symlink: refused"):
        restore.restore(conn, "vm", store.dest, target="vm2", pool="restore")
    with pytest.raises(SaltKvmError, match=r"lock file .*/\.lock is a symlink: refused"):
        backup_ops.prune(str(store.dest), "vm", keep=1)
    assert victim.read_text() == "precious"
    assert os.listdir(tmp_path / "pool") == []


# ---- gaps found after the first round (red team) ----------------------------------
def test_in_place_restore_is_refused_while_a_snapshot_or_backup_holds_the_domain(
    conn, vm, dest, tmp_path, monkeypatch
):
    """An in-place restore rewrites the disks a snapshot operation or a backup
    run of the domain is working on: it takes their per-domain lock, and is
    refused (naming the holder) with nothing written while they run."""
    from salt_kvm.backup import snapshots
    from salt_kvm.errors import ConflictError

    monkeypatch.setenv("SALT_KVM_LOCK_DIR", str(tmp_path / "locks"))
    dom, disk, data, base = vm
    backup.create(conn, "vm", dest, method="snapshot")
    qemu_io(data, "write -P 7 0 16M", "raw")
    sums = {p: bs.sha256_file(p) for p in (disk, data)}
    with snapshots.locked(dom, "snapshot s1"):
        with pytest.raises(ConflictError, match=r"held by snapshot s1 of vm pid"):
            restore.restore(conn, "vm", dest, force=True)
    assert {p: bs.sha256_file(p) for p in (disk, data)} == sums
    assert sorted(os.listdir(os.path.dirname(disk))) == ["base.qcow2", "vm-data.raw", "vm.qcow2"]
    # and a snapshot is refused while an in-place restore writes
    tried = []
    convert = qemuimg.convert

    def convert_and_snapshot(*args, **kwargs):
        try:
            snapshots.create(conn, "vm", "s2")
            tried.append(None)
        except SaltKvmError as exc:
            tried.append(exc)
        return convert(*args, **kwargs)

    monkeypatch.setattr(qemuimg, "convert", convert_and_snapshot)
    restore.restore(conn, "vm", dest, force=True)
    assert tried and all(isinstance(e, ConflictError) for e in tried), tried
    assert dom.snapshotNum(0) == 0


def _hostile_xml(store, point, change):
    from lxml import etree

    path = store.path(point, bs.DOMAIN_XML)
    root = etree.fromstring(path.read_bytes())
    change(root, etree)
    path.write_bytes(etree.tostring(root))
    _edit(store, point.id, lambda data: data.update(domain_xml_sha256=bs.sha256_file(path)))


@pytest.mark.parametrize(
    "what,match",
    [("loader", r"os/loader /etc/shadow"), ("template", r"os/nvram template /etc/shadow")],
)
def test_a_stored_firmware_path_outside_the_firmware_folders_is_refused(
    conn, tmp_path, stored, what, match
):
    """A loader (read by the guest as its flash) or an NVRAM template (copied
    into the guest's variables) is a host file: only the host's firmware
    folders are accepted."""
    store, points, secret = stored

    def change(root, etree):
        os_ = root.find("os")
        loader = etree.SubElement(os_, "loader", readonly="yes", type="pflash")
        loader.text = "/etc/shadow" if what == "loader" else "/usr/share/OVMF/OVMF_CODE.fd"
        nvram = etree.SubElement(os_, "nvram")
        if what == "template":
            nvram.set("template", "/etc/shadow")

    _hostile_xml(store, points[-1], change)
    with pytest.raises(SaltKvmError, match=rf"domain.xml asks for {match}.*refused"):
        restore.restore(conn, "vm", store.dest, target="vm2", pool="restore")
    assert os.listdir(tmp_path / "pool") == []
    assert "vm2" not in [d.name() for d in conn.listAllDomains(0)]


def test_a_restored_domain_gets_its_own_nvram_and_loopback_graphics(conn, tmp_path, stored):
    """The stored NVRAM path is the original's (or any host file, which libvirt
    would hand to qemu and delete with the new domain): dropped, libvirt makes
    the new domain its own. Graphics listen on loopback only, whatever the
    store says (no address of the host, no socket path)."""
    store, points, secret = stored
    victim = tmp_path / "vm_VARS.fd"
    victim.write_text("the original's variables")

    def change(root, etree):
        os_ = root.find("os")
        loader = etree.SubElement(os_, "loader", readonly="yes", type="pflash")
        loader.text = "/usr/share/OVMF/OVMF_CODE.fd"
        nvram = etree.SubElement(os_, "nvram", template="/usr/share/OVMF/OVMF_VARS.fd")
        nvram.text = str(victim)
        devices = root.find("devices")
        vnc = etree.SubElement(devices, "graphics", type="vnc", port="5900", listen="0.0.0.0")
        etree.SubElement(vnc, "listen", type="address", address="0.0.0.0")
        spice = etree.SubElement(devices, "graphics", type="spice", autoport="yes")
        etree.SubElement(spice, "listen", type="socket", socket=str(tmp_path / "planted"))
        etree.SubElement(spice, "listen", type="network", network="default")

    _hostile_xml(store, points[-1], change)
    restore.restore(conn, "vm", store.dest, target="vm2", pool="restore")
    xml = Domain(conn.lookupByName("vm2").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    nvram = xml.node.find("os/nvram")
    assert nvram is None or (nvram.text or "").strip() != str(victim)
    assert str(victim) not in xml.to_xml()
    graphics = xml.node.findall("devices/graphics")
    assert len(graphics) == 2
    for node in graphics:
        assert node.get("listen") in (None, "127.0.0.1"), node.attrib
        listens = [dict(e.attrib) for e in node.findall("listen")]
        assert all(e == {"type": "address", "address": "127.0.0.1"} for e in listens), listens
    assert victim.read_text() == "the original's variables"


def test_a_restored_domain_gets_console_passwords_of_its_own(conn, tmp_path, stored):
    """The stored definition's console password is the original's (it may run
    still, or the store may be read by others than the guest's owner): every
    VNC/SPICE console of the restored domain gets a new one, as a new guest's
    does (salt-cloud -a console shows it)."""
    store, points, secret = stored

    def change(root, etree):
        devices = root.find("devices")
        etree.SubElement(devices, "graphics", type="vnc", autoport="yes", passwd="original1")
        etree.SubElement(devices, "graphics", type="spice", autoport="yes")

    _hostile_xml(store, points[-1], change)
    restore.restore(conn, "vm", store.dest, target="vm2", pool="restore")
    xml = Domain(
        conn.lookupByName("vm2").XMLDesc(
            libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        )
    )
    passwords = [g.get("passwd") for g in xml.node.findall("devices/graphics")]
    assert len(passwords) == 2 and all(passwords), passwords
    assert "original1" not in passwords and len(set(passwords)) == 2


@pytest.mark.parametrize("how", ["other-owner", "group-writable", "world-writable", "symlink"])
def test_a_domain_folder_planted_in_a_shared_destination_is_refused(conn, vm, tmp_path, how):
    """In a world-writable destination (a careless ``chmod 1777``), a local
    user can make ``dest/<domain>`` before the first backup: root would then
    write the guest's data into a folder that user owns. Refused by name,
    nothing written; a folder root made itself is used."""
    if os.geteuid() != 0:
        pytest.skip("only root can give a folder away")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = shared / "vm"
    if how == "symlink":
        folder.symlink_to(elsewhere)
    else:
        folder.mkdir()
        if how == "other-owner":
            os.chown(folder, 65534, 65534)
        else:
            os.chmod(folder, 0o775 if how == "group-writable" else 0o777)
    with pytest.raises(SaltKvmError, match=rf"{folder}.*(owned by uid 65534|writable|link)"):
        backup.create(conn, "vm", str(shared), method="snapshot")
    assert os.listdir(elsewhere) == []
    if how != "symlink":
        assert os.listdir(folder) == []
    # once the planted folder is gone, root's own one in the same destination works
    if how == "symlink":
        folder.unlink()
    else:
        folder.rmdir()
    made = backup.create(conn, "vm", str(shared), method="snapshot")
    assert made["kind"] == "full"
    assert os.lstat(folder).st_uid == 0 and not os.lstat(folder).st_mode & 0o022


@pytest.mark.parametrize(
    "extra,match",
    [
        (
            "<interface type='ethernet'><script path='/tmp/x.sh'/></interface>",
            r"interface of type 'ethernet'.*interface script '/tmp/x.sh'",
        ),
        ("<interface type='direct'><source dev='eth0' mode='bridge'/></interface>", "'direct'"),
        (
            "<tpm model='tpm-tis'><backend type='passthrough'>"
            "<device path='/dev/tpm0'/></backend></tpm>",
            "tpm/backend of type 'passthrough'",
        ),
        ("<input type='evdev'><source dev='/dev/input/event0'/></input>", "input of type 'evdev'"),
        ("<audio id='1' type='file' path='/etc/shadow'/>", "audio of type 'file'"),
        ("<graphics type='sdl' display=':0'/>", r"graphics of type 'sdl' \(accepted: vnc, spice"),
        ("<rng model='virtio'><backend model='random'>/dev/sda</backend></rng>", "rng backend"),
        (
            "<serial type='tcp'><source mode='bind' host='0.0.0.0' service='4555'/>"
            "<protocol type='telnet'/><target port='2'/></serial>",
            r"serial of type 'tcp' \(accepted: pty, unix",
        ),
        (
            "<channel type='udp'><source mode='bind' host='0.0.0.0' service='4556'/>"
            "<target type='virtio' name='x'/></channel>",
            "channel of type 'udp'",
        ),
    ],
    ids=["ethernet-script", "direct", "tpm", "evdev", "audio-file", "sdl", "rng", "tcp", "udp"],
)
def test_a_stored_device_reaching_the_host_is_refused(conn, tmp_path, stored, extra, match):
    store, points, secret = stored
    _hostile_xml(
        store, points[-1], lambda root, etree: root.find("devices").append(etree.fromstring(extra))
    )
    with pytest.raises(SaltKvmError, match=rf"domain.xml asks for .*{match}.*refused"):
        restore.restore(conn, "vm", store.dest, target="vm2", pool="restore")
    assert os.listdir(tmp_path / "pool") == []
    assert "vm2" not in [d.name() for d in conn.listAllDomains(0)]


def test_backup_and_restore_images_are_private_from_their_first_byte(
    conn, vm, dest, tmp_path, monkeypatch
):
    """A point folder is traversable (0711) and its names are predictable: an
    image qemu-img makes with the umask's 0644 can be opened by any local user
    while it is written (minutes for a big disk), and the fd kept after the
    chmod. Every file qemu-img makes for a backup or a restore is 0600 when it
    is made."""
    import stat

    old = os.umask(0o022)
    seen = {}

    def watch(name, where):
        real = getattr(qemuimg, name)

        def wrapped(*args, **kwargs):
            real(*args, **kwargs)
            path = where(args)
            if os.path.isfile(path):
                seen[path] = stat.S_IMODE(os.stat(path).st_mode)

        monkeypatch.setattr(qemuimg, name, wrapped)

    watch("copy_flat", lambda a: a[2])
    watch("convert", lambda a: a[1])
    watch("create_overlay", lambda a: a[0])
    try:
        dom, disk, data, base = vm
        backup.create(conn, "vm", dest, method="snapshot")
        qemu_io(data, "write -P 5 4M 4M", "raw")
        backup.create(conn, "vm", dest, method="snapshot")
        dir_pool(conn, "restore", tmp_path / "pool")
        restore.restore(conn, "vm", dest, target="vm2", pool="restore")
        restore.restore(conn, "vm", dest, force=True)
    finally:
        os.umask(old)
    kinds = {p.rsplit(".", 1)[-1] for p in seen}
    assert len(seen) >= 6 and "restore-tmp" in kinds, seen
    assert {p: m for p, m in seen.items() if m & 0o077} == {}
