"""A UEFI guest's variables (NVRAM) and its emulated TPM's state in backup
points, on the test driver with real files (swtpm's state folder moved into
the test's temporary folder): stored with checksums, verified, replicated,
restored as the new domain's own NVRAM file, the TPM state only with the
identity; a tampered store is refused by name before anything is written."""
# ruff: noqa: F401, F811 - the fixtures of test_backup_snapshot, shared

import hashlib
import json
import os
import stat

import libvirt
import pytest
from lxml import etree

from salt_kvm.backup import firmware_state, restore, verify
from salt_kvm.backup import ops as backup_ops
from salt_kvm.backup import run as backup
from salt_kvm.backup import statefiles as sf
from salt_kvm.backup import store as bs
from salt_kvm.errors import ConflictError, SaltKvmError
from salt_kvm.virt import firmware
from salt_kvm.virt.domain import Domain
from tests.functional.backup.test_snapshot_method import dest, dir_pool, vm

LOADER = "/usr/share/OVMF/OVMF_CODE.fd"
VARS = b"\x5a" * 4096 + b"boot entry Boot0007" + b"\0" * 4096
PERMALL = b"swtpm permall state" * 64


@pytest.fixture
def swtpm(tmp_path, monkeypatch):
    folder = tmp_path / "swtpm"
    folder.mkdir(mode=0o711)
    monkeypatch.setattr(firmware_state, "SWTPM_DIR", str(folder))
    return folder


@pytest.fixture
def uefi_vm(conn, vm, swtpm, tmp_path):
    """The shut-off test domain with a UEFI loader, its own NVRAM file (salt-kvm's
    metadata names it) and an emulated TPM whose state folder holds a permall."""
    dom, disk, data, base = vm
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    nvram = tmp_path / "images" / "vm_VARS.fd"
    nvram.write_bytes(VARS)
    os_node = xml.node.find("os")
    etree.SubElement(os_node, "loader", readonly="yes", type="pflash").text = LOADER
    etree.SubElement(os_node, "nvram").text = str(nvram)
    tpm = etree.SubElement(xml.node.find("devices"), "tpm", model="tpm-crb")
    etree.SubElement(tpm, "backend", type="emulator", version="2.0")
    xml.set_managed_info({"volumes": [disk], "nvram": str(nvram)})
    dom = conn.defineXML(xml.to_xml())
    state = swtpm / dom.UUIDString() / "tpm2"
    state.mkdir(parents=True)
    (state / "tpm2-00.permall").write_bytes(PERMALL)
    (state / ".lock").write_bytes(b"")
    return dom, nvram, state


def manifest(dest, pid):
    path = bs.Store(dest, "vm").path(pid) / bs.MANIFEST
    return path, json.loads(path.read_text())


def test_nvram_and_tpm_state_are_stored_and_restored(conn, uefi_vm, dest, swtpm, tmp_path):
    dom, nvram, state = uefi_vm
    made = backup.create(conn, "vm", dest, method="snapshot")
    folder = bs.Store(dest, "vm").path(made["point"])
    _, data = manifest(dest, made["point"])
    assert data["firmware"] == {
        "consistency": "shut-off",
        "nvram": {
            "file": "nvram.fd",
            "size": len(VARS),
            "sha256": hashlib.sha256(VARS).hexdigest(),
        },
        "tpm_version": "2.0",
        "tpm": {
            "tpm2/tpm2-00.permall": {
                "file": "tpm.tpm2_tpm2-00.permall",
                "size": len(PERMALL),
                "sha256": hashlib.sha256(PERMALL).hexdigest(),
            }
        },
    }
    for name in ("nvram.fd", "tpm.tpm2_tpm2-00.permall"):
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o600
    assert (folder / "nvram.fd").read_bytes() == VARS
    assert backup_ops.verify(dest, "vm")["ok"]

    # a new domain: the variables are its own file in the pool, the TPM starts empty
    pool = tmp_path / "pool"
    dir_pool(conn, "restore", pool)
    copy = restore.restore(conn, "vm", dest, target="vm2", pool="restore")
    own = pool / firmware.nvram_volume_name("vm2")
    assert copy["nvram"] == "restored" and own.read_bytes() == VARS
    assert copy["tpm_state"] == "not copied: a new identity starts with an empty TPM"
    assert stat.S_IMODE(os.stat(own).st_mode) == 0o600
    xml = Domain(conn.lookupByName("vm2").XMLDesc(0))
    assert firmware.nvram_path(xml) == str(own) and xml.managed_info()["nvram"] == str(own)
    assert sorted(os.listdir(swtpm)) == [dom.UUIDString()]
    assert nvram.read_bytes() == VARS  # the original's file untouched

    # the same identity (the domain and its TPM state are gone): the TPM state comes back
    uuid = dom.UUIDString()
    dom.undefine()
    for child in state.iterdir():
        child.unlink()
    state.rmdir()
    state.parent.rmdir()
    back = restore.restore(conn, "vm", dest, target="vm", pool="restore")
    assert back["identity"] == "kept" and back["uuid"] == uuid
    assert back["nvram"] == "restored" and back["tpm_state"] == "restored"
    assert (pool / "vm_VARS.fd").read_bytes() == VARS
    restored = swtpm / uuid / "tpm2" / "tpm2-00.permall"
    assert restored.read_bytes() == PERMALL
    assert stat.S_IMODE(os.stat(restored).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(swtpm / uuid).st_mode) == 0o711
    assert stat.S_IMODE(os.stat(restored.parent).st_mode) == 0o700


def test_in_place_restore_puts_the_variables_and_tpm_state_back(conn, uefi_vm, dest):
    dom, nvram, state = uefi_vm
    backup.create(conn, "vm", dest, method="snapshot")
    nvram.write_bytes(b"changed since")
    (state / "tpm2-00.permall").write_bytes(b"a new owner's secrets")
    done = restore.restore(conn, "vm", dest, force=True)
    assert done["in_place"] and done["nvram"] == "restored" and done["tpm_state"] == "restored"
    assert nvram.read_bytes() == VARS
    assert (state / "tpm2-00.permall").read_bytes() == PERMALL
    assert not [p for p in nvram.parent.iterdir() if p.name.endswith(".restore-tmp")]


def test_in_place_restore_never_writes_an_nvram_file_not_the_domains_own(
    conn, uefi_vm, dest, tmp_path
):
    dom, nvram, state = uefi_vm
    backup.create(conn, "vm", dest, method="snapshot")
    shared = tmp_path / "shared_VARS.fd"  # a file salt-kvm did not make for it
    shared.write_bytes(b"someone else's")
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    xml.node.find("os/nvram").text = str(shared)
    conn.defineXML(xml.to_xml())
    done = restore.restore(conn, "vm", dest, force=True)
    assert done["nvram"] == f"stored, not restored: {shared} is not the domain's own file"
    assert shared.read_bytes() == b"someone else's"


def test_an_existing_nvram_file_in_the_pool_is_never_overwritten(conn, uefi_vm, dest, tmp_path):
    backup.create(conn, "vm", dest, method="snapshot")
    pool = tmp_path / "pool"
    dir_pool(conn, "restore", pool)
    (pool / "vm2_VARS.fd").write_bytes(b"another guest's variables")
    with pytest.raises(ConflictError, match=r"'vm2_VARS.fd' already exists in the pool"):
        restore.restore(conn, "vm", dest, target="vm2", pool="restore")
    assert sorted(os.listdir(pool)) == ["vm2_VARS.fd"]
    assert (pool / "vm2_VARS.fd").read_bytes() == b"another guest's variables"
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("vm2")


def test_kept_identity_refuses_a_tpm_state_folder_already_there(conn, uefi_vm, dest, tmp_path):
    dom, nvram, state = uefi_vm
    backup.create(conn, "vm", dest, method="snapshot")
    dom.undefine()  # its TPM state stays (a domain undefined without the TPM flag)
    dir_pool(conn, "restore", tmp_path / "pool")
    with pytest.raises(ConflictError, match=r"the TPM state of UUID .* is there already"):
        restore.restore(conn, "vm", dest, target="vm", pool="restore")
    assert os.listdir(tmp_path / "pool") == []
    assert (state / "tpm2-00.permall").read_bytes() == PERMALL


@pytest.mark.parametrize(
    "tamper, error",
    [
        (lambda f: f.update(nvram={**f["nvram"], "file": "../vm.qcow2"}), "firmware.nvram.file"),
        (lambda f: f.update(nvram={**f["nvram"], "size": 2**40}), "firmware.nvram.size"),
        (lambda f: f.update(tpm={"tpm2/../../x": f["tpm"]["tpm2/tpm2-00.permall"]}), "tpm2/../"),
        (lambda f: f.update(tpm_version="3.0"), "firmware.tpm_version"),
        (lambda f: f.update(consistency="live"), "firmware.consistency"),
        (lambda f: f["nvram"].update(sha256="x" * 64), "firmware.nvram.sha256"),
    ],
)
def test_a_tampered_firmware_manifest_is_refused_by_name(conn, uefi_vm, dest, tamper, error):
    made = backup.create(conn, "vm", dest, method="snapshot")
    path, data = manifest(dest, made["point"])
    tamper(data["firmware"])
    path.write_text(json.dumps(data))
    with pytest.raises(SaltKvmError, match=error.replace(".", r"\.")):
        restore.restore(conn, "vm", dest, target="vm2")
    problems = backup_ops.verify(dest, "vm")["problems"]
    assert error in json.dumps(problems)


def test_a_tampered_or_linked_state_file_is_refused(conn, uefi_vm, dest, tmp_path):
    made = backup.create(conn, "vm", dest, method="snapshot")
    store = bs.Store(dest, "vm")
    stored = store.path(made["point"]) / "nvram.fd"
    stored.write_bytes(b"\0" * len(VARS))  # same size, other bytes
    point = store.point(made["point"])
    assert verify.verify_point(store, point) == [f"{point.id}/nvram.fd: checksum mismatch"]
    dir_pool(conn, "restore", tmp_path / "pool")
    with pytest.raises(SaltKvmError, match=r"nvram\.fd: checksum mismatch"):
        restore.restore(conn, "vm", dest, target="vm2", pool="restore")
    stored.unlink()
    stored.symlink_to(tmp_path / "images" / "vm_VARS.fd")  # the right bytes, by a link
    assert verify.verify_point(store, point) == [
        f"{point.id}/nvram.fd: not a regular file (a symbolic link is refused)"
    ]
    with pytest.raises(SaltKvmError, match="symbolic link is refused"):
        restore.restore(conn, "vm", dest, target="vm2", pool="restore")
    assert os.listdir(tmp_path / "pool") == []


def test_an_old_manifest_without_firmware_still_verifies_and_restores(
    conn, uefi_vm, dest, tmp_path
):
    made = backup.create(conn, "vm", dest, method="snapshot")
    path, data = manifest(dest, made["point"])
    del data["firmware"]
    path.write_text(json.dumps(data))
    folder = path.parent
    (folder / "nvram.fd").unlink()
    (folder / "tpm.tpm2_tpm2-00.permall").unlink()
    assert backup_ops.verify(dest, "vm")["ok"]
    dir_pool(conn, "restore", tmp_path / "pool")
    copy = restore.restore(conn, "vm", dest, target="vm2", pool="restore")
    assert copy["nvram"] == "none stored" and copy["tpm_state"] == "none stored"
    xml = Domain(conn.lookupByName("vm2").XMLDesc(0))
    assert firmware.nvram_path(xml) is None  # libvirt makes it from the template
    assert sorted(os.listdir(tmp_path / "pool")) == sorted(
        os.path.basename(v) for v in copy["volumes"]
    )


def test_replicate_copies_the_state_files(conn, uefi_vm, dest, tmp_path):
    made = backup.create(conn, "vm", dest, method="snapshot")
    replica = tmp_path / "replica"
    replica.mkdir()
    done = backup_ops.replicate(dest, "vm", str(replica))
    assert done["copied"] == [made["point"]]
    copied = bs.Store(str(replica), "vm").path(made["point"])
    assert (copied / "nvram.fd").read_bytes() == VARS
    assert (copied / "tpm.tpm2_tpm2-00.permall").read_bytes() == PERMALL
    assert backup_ops.verify(str(replica), "vm")["ok"]


def test_a_running_guests_state_that_keeps_changing_is_not_stored(tmp_path, monkeypatch):
    reads = iter(range(100))
    monkeypatch.setattr(firmware_state, "_read", lambda path, limit: bytes([next(reads)]))
    with pytest.raises(SaltKvmError, match="kept changing while it was read"):
        firmware_state._settled(tmp_path / "x", 10, live=True)
    settled = iter([b"a", b"b", b"b"])
    monkeypatch.setattr(firmware_state, "_read", lambda path, limit: next(settled))
    assert firmware_state._settled(tmp_path / "x", 10, live=True) == b"b"
    assert sf.STATE_CONSISTENCY_SETTLED == "settled"
