"""In-place restores on a booted guest keep what its definition says: a raw
data disk (made by kvm_disk) stays raw and the guest reads the backed-up
data from it; a raw block disk (a loop device behind an LV-like link) is
written into the device, its node and link untouched; a qcow2 block disk is
refused by name with nothing written."""

import contextlib
import os
import subprocess
import tempfile

import libvirt
import pytest

from salt_kvm.backup import restore
from salt_kvm.backup import run as backup
from salt_kvm.backup import store as bs
from salt_kvm.disks import ops as diskops
from salt_kvm.disks import spec as disks
from salt_kvm.errors import SaltKvmError
from salt_kvm.virt import lifecycle, pools, qemuimg
from salt_kvm.virt.domain import Domain

from . import guests
from .conftest import POOL, PREFIX, backup_dest, unique

MIB = 1024**2


@pytest.fixture(scope="module")
def loop_link():
    """A 64 MiB loop device, named by a symbolic link as LVM names an LV."""
    folder = tempfile.mkdtemp(prefix=f"{PREFIX}blk-", dir="/var/tmp")
    os.chmod(folder, 0o711)  # qemu (not root) opens the link
    backing = os.path.join(folder, "lv.img")
    with open(backing, "wb") as handle:
        handle.truncate(64 * MIB)
    device = subprocess.run(
        ["losetup", "--find", "--show", backing], capture_output=True, text=True, check=True
    ).stdout.strip()
    link = os.path.join(folder, "lv")
    os.symlink(device, link)
    yield device, link
    subprocess.run(["losetup", "-d", device], check=False)
    with contextlib.suppress(OSError):
        os.unlink(link)
        os.unlink(backing)
        os.rmdir(folder)


@pytest.fixture(scope="module")
def guest(hv, base_domain, loop_link):
    device, link = loop_link
    name = unique("rs")
    g = guests.boot_guest(hv, base_domain, name)
    try:
        raw = diskops.attach(
            hv,
            g.dom,
            disks.parse_disk("data", {"size": "64M", "format": "raw"}),
            delete_with_domain=True,
        )
        spec = disks.parse_disk("blk", {"path": link, "format": "raw"})
        blk = diskops.attach(hv, g.dom, spec, (os.path.dirname(link), device))
        g.data_path = raw["source"]
        g.run(
            "for i in $(seq 60); do [ -b /dev/vdb ] && [ -b /dev/vdc ] && break; sleep 1; done; "
            "mkfs.ext4 -q /dev/vdb && mkfs.ext4 -q /dev/vdc && mkdir -p /d /b && "
            "mount /dev/vdb /d && mount /dev/vdc /b"
        )
        assert (raw["target"], blk["target"]) == ("vdb", "vdc"), (raw, blk)
        yield g
    finally:
        guests.remove_guest(hv, name)
        pool = hv.storagePoolLookupByName(POOL)
        pools.refresh(pool)
        for vol in pool.listVolumes():
            if vol.startswith(f"{name}-"):
                with contextlib.suppress(libvirt.libvirtError):
                    pool.storageVolLookupByName(vol).delete(0)


def _disks(dom):
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return {d.target_dev: (d.type, d.driver_type, d.path) for d in xml.disks}


def _write(g, path):
    return g.run(
        f"dd if=/dev/urandom of={path} bs=1M count=8 status=none && sync && md5sum {path}"
    ).split()[0]


def test_in_place_restore_keeps_raw_file_and_block_disks(hv, guest, loop_link):
    device, link = loop_link
    dest = backup_dest("restore")
    try:
        md5 = {"d": _write(guest, "/d/a"), "b": _write(guest, "/b/a")}
        made = backup.create(hv, guest.name, dest, disks=["vdb", "vdc"])
        assert made["disks"] == ["vdb", "vdc"], made
        _write(guest, "/d/a")  # what the restore must undo
        _write(guest, "/b/a")
        assert lifecycle.shutdown(guest.dom, timeout=300)
        before = _disks(guest.dom)
        assert before["vdb"][:2] == ("file", "raw") and before["vdc"][:2] == ("block", "raw")

        # a qcow2 block disk cannot be kept: refused by name, nothing written
        xml = Domain(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        next(d for d in xml.disks if d.target_dev == "vdc").driver_type = "qcow2"
        hv.defineXML(xml.to_xml())
        sums = {p: bs.sha256_file(p) for p in (guest.data_path, device)}
        with pytest.raises(SaltKvmError, match=r"vdc: .* restored in place only as raw"):
            restore.restore(hv, guest.name, dest, force=True)
        assert {p: bs.sha256_file(p) for p in (guest.data_path, device)} == sums
        xml = Domain(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        next(d for d in xml.disks if d.target_dev == "vdc").driver_type = "raw"
        hv.defineXML(xml.to_xml())

        done = restore.restore(hv, guest.name, dest, force=True)
        assert done["formats"]["vdb"] == "raw" and done["formats"]["vdc"] == "raw", done
        assert _disks(guest.dom) == before  # the definition is unchanged
        assert qemuimg.info(guest.data_path)["format"] == "raw"  # and so is the file
        assert os.path.islink(link) and os.readlink(link) == device
        assert os.path.exists(device) and os.stat(device).st_mode & 0o170000 == 0o060000
        folder = bs.Store(dest, guest.name).path(made["point"])
        for path, target in ((guest.data_path, "vdb"), (device, "vdc")):
            qemuimg.run(
                "compare", "-q", "-f", "raw", "-F", "qcow2", path, str(folder / f"{target}.qcow2")
            )

        guest.dom.create()  # the guest reads the backed-up data, and writes on
        guest.address = guests.wait_booted(guest.dom)
        out = guest.run(
            "mount /dev/vdb /d && mount /dev/vdc /b && md5sum /d/a /b/a && "
            "echo ok > /d/new && echo ok > /b/new && sync && cat /d/new /b/new"
        ).split()
        assert out[0] == md5["d"] and out[2] == md5["b"] and out[-2:] == ["ok", "ok"], out
    finally:
        subprocess.run(["rm", "-rf", dest], check=False)
