"""UEFI, secure boot, an emulated TPM and the VNC console on the real libvirtd,
two booted guests for the whole module (TCG + OVMF is slow):

- ``secure``: ``firmware: efi``, ``secure_boot``, ``tpm``, ``graphics: vnc``.
  The test image's loader (GRUB) is not signed for the enrolled keys: the
  firmware refuses it and stays in its own screens, which the screenshot
  shows. Made with the driver's library (it never gets an address);
  screenshot, console and destroy go through real salt-cloud. Backed up while
  it runs, lost and restored under its own name: its UEFI variables and TPM
  state come back (kvm_backup's ``firmware`` entry), and it starts on them.
- ``efi``: ``firmware: efi``, ``graphics: vnc`` through real ``salt-cloud -p``:
  it boots the test image from its ESP (the create waits for its DHCP lease)
  and the guest sees UEFI (``/sys/firmware/efi``). It moves live to the
  second hypervisor and back with its UEFI variables file (#15 item 2).
"""

import json
import os
import shutil
import socket
import struct
import time
import zlib

import libvirt
import pytest

from salt_kvm.backup import ops as backup_ops
from salt_kvm.backup import restore
from salt_kvm.backup import run as backup
from salt_kvm.backup import store as bs
from salt_kvm.cloud import migration, provision
from salt_kvm.cloud.spec import build_spec
from salt_kvm.virt import firmware, lifecycle, pools
from salt_kvm.virt import migrate as mig
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback

from . import guests, saltenv
from .cloudcheck import created, sized_profile
from .conftest import IMAGES, NETWORK, POOL, URI, backup_dest, unique
from .guests import remove_guest

SWTPM_DIR = "/var/lib/libvirt/swtpm"
SCREEN_TIMEOUT = 240


@pytest.fixture(scope="module")
def secure(hv, base_domain):
    name = unique("sboot")
    values = {
        "name": name,
        "base_domain": base_domain,
        "clone_strategy": "quick",
        "deploy": False,
        "nics": [{"network": NETWORK}],
        "firmware": "efi",
        "secure_boot": True,
        "tpm": True,
        "graphics": "vnc",
    }
    rollback = Rollback()
    started = time.monotonic()
    with rollback:
        guest = provision._clone(hv, build_spec(values), rollback, lambda *a: None, None)
        guest.domain.create()
        rollback.forget()
    print(f"\n{name}: defined and started in {time.monotonic() - started:.1f} s")
    yield name
    remove_guest(hv, name)


@pytest.fixture(scope="module")
def efi(hv, salt, base_domain):
    name = unique("efi")
    profile = sized_profile(base_domain, salt, deploy=False, firmware="efi", graphics="vnc")
    salt.write_profiles({"efi": profile}, "efi.conf")
    started = time.monotonic()
    info = created(salt.cloud("-p", "efi", name), name)
    print(f"\n{name}: booted with UEFI to its lease in {time.monotonic() - started:.1f} s")
    yield name, info
    remove_guest(hv, name)


def png_rows(data: bytes) -> bytes:
    """The decompressed image data of a PNG (chunk CRCs checked)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(
            kind + body
        )
        if kind == b"IHDR":
            header = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header and header[0] >= 640 and header[1] >= 200, header
    return zlib.decompress(idat)


def screenshot(salt, name, path, **extra):
    args = [f"{k}={v}" for k, v in extra.items()]
    out = json.loads(salt.cloud("-a", "screenshot", name, f"path={path}", *args).stdout)
    return json.dumps(out)


def wait_for_screen(salt, name, path) -> bytes:
    """The guest's screen once it shows something (the firmware draws late under TCG)."""
    deadline = time.monotonic() + SCREEN_TIMEOUT
    while True:
        screenshot(salt, name, path, overwrite="true")
        data = open(path, "rb").read()
        if len(set(png_rows(data))) > 8 or time.monotonic() > deadline:
            return data
        time.sleep(5)


def test_secure_boot_tpm_guest_runs_and_its_screen_is_a_png(hv, salt, secure, tmp_path):
    dom = hv.lookupByName(secure)
    xml = dom.XMLDesc(0)
    assert "secboot" in xml or ".ms.fd" in xml, "libvirt picked a secure-boot loader"
    assert "<smm state='on'/>" in xml and "q35" in xml
    assert os.path.isdir(os.path.join(SWTPM_DIR, dom.UUIDString())), "swtpm state"
    assert os.path.exists(f"{IMAGES}/{firmware.nvram_volume_name(secure)}")
    path = tmp_path / "secure.png"
    data = wait_for_screen(salt, secure, path)
    assert len(set(png_rows(data))) > 8, "the screen stayed blank"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    refused = salt.cloud("-a", "screenshot", secure, f"path={path}", check=False)
    assert "overwrite=true" in refused.stdout + refused.stderr


def rfb_security_types(port: int) -> list[int]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        version = sock.recv(12)
        assert version.startswith(b"RFB 003."), version
        sock.sendall(b"RFB 003.008\n")
        (count,) = sock.recv(1)
        assert count > 0, "the server refused the connection"
        types = b""
        while len(types) < count:
            types += sock.recv(count - len(types))
        return list(types)


def test_the_console_asks_for_the_password(hv, salt, secure):
    out = json.loads(salt.cloud("-a", "console", secure).stdout)
    text = json.dumps(out)
    found = next(v for v in _walk(out) if isinstance(v, dict) and "consoles" in v)
    (console,) = found["consoles"]
    assert console["type"] == "vnc" and console["address"] == "127.0.0.1"
    assert len(console["password"]) == 8 and console["port"] >= 5900
    assert rfb_security_types(console["port"]) == [2]  # VNC authentication only, never None (1)
    shown = salt.cloud("-a", "show_instance", secure).stdout
    assert console["password"] not in shown
    assert '"tpm": true' in shown and '"secure_boot": true' in shown
    assert console["password"] not in hv.lookupByName(secure).XMLDesc(0)
    assert console["password"] in text


def _walk(value):
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)


def test_an_efi_guest_boots_the_test_image(hv, efi):
    name, info = efi
    assert info["machine"]["firmware"] == "efi"
    assert "password" not in json.dumps(info)
    dom = hv.lookupByName(name)
    assert "firmware='efi'" in dom.XMLDesc(0)
    guest = guests.TestGuest(name, dom, info["ip_address"], None)
    assert guest.run("test -d /sys/firmware/efi && echo uefi").strip() == "uefi"
    assert os.path.exists(f"{IMAGES}/{firmware.nvram_volume_name(name)}")


def test_a_backup_brings_back_the_uefi_variables_and_the_tpm_state(hv, secure):
    """The running ``secure`` guest backed up, lost (domain, disk, NVRAM file and
    TPM state removed), restored under its own name: the variables and the TPM
    state are the backed-up bytes, and the guest starts on them."""
    dom = hv.lookupByName(secure)
    uuid = dom.UUIDString()
    nvram = f"{IMAGES}/{firmware.nvram_volume_name(secure)}"
    tpm_dir = os.path.join(SWTPM_DIR, uuid)
    template = Domain(dom.XMLDesc(0)).node.find("os/nvram").get("template")
    dest = backup_dest("fwb")
    started = time.monotonic()
    try:
        made = backup.create(hv, secure, dest)
        point = bs.Store(dest, secure).point(made["point"])
        folder = bs.Store(dest, secure).path(point)
        assert point.firmware.consistency == "settled"  # read from the running guest
        assert set(point.firmware.tpm) == {"tpm2/tpm2-00.permall"}, point.firmware
        stored_vars = (folder / "nvram.fd").read_bytes()
        stored_tpm = (folder / "tpm.tpm2_tpm2-00.permall").read_bytes()
        assert stored_vars == open(nvram, "rb").read()  # the idle firmware wrote nothing since
        assert stored_vars != open(template, "rb").read(), "the guest's own variables"
        assert stored_tpm == open(os.path.join(tpm_dir, "tpm2/tpm2-00.permall"), "rb").read()
        assert backup_ops.verify(dest, secure)["ok"]

        lifecycle.remove(hv, secure)  # lost: its disk, NVRAM file and TPM state with it
        assert not os.path.exists(nvram) and not os.path.exists(tpm_dir)
        back = restore.restore(hv, secure, dest, target=secure)
        assert back["identity"] == "kept" and back["uuid"] == uuid
        assert back["nvram"] == "restored" and back["tpm_state"] == "restored"
        assert open(nvram, "rb").read() == stored_vars
        assert open(os.path.join(tpm_dir, "tpm2/tpm2-00.permall"), "rb").read() == stored_tpm
        restored = hv.lookupByName(secure)
        assert firmware.nvram_path(Domain(restored.XMLDesc(0))) == nvram
        restored.create()  # swtpm reads the restored state, the firmware its variables
        time.sleep(3)
        assert restored.isActive()
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    print(f"\n{secure}: backed up, lost and restored in {time.monotonic() - started:.1f} s")


def _moved(conn, dconn, name, hosts, target_uri):
    request = mig.Request(port=saltenv.port("migration_firmware"))
    planned = migration.plan(conn, dconn, name, hosts, target_uri, request)
    return migration.run(conn, dconn, planned)


def _vars(conn, name):
    """The guest's UEFI variables file on ``conn``'s host: its path and bytes
    (read through libvirt: hv2's pool is in its own mount namespace's view)."""
    pool = conn.storagePoolLookupByName(POOL)
    pools.refresh(pool)
    vol = pool.storageVolLookupByName(firmware.nvram_volume_name(name))
    stream = conn.newStream(0)
    vol.download(stream, 0, 0, 0)
    data = b""
    while True:
        chunk = stream.recv(1 << 20)
        if chunk in (None, b"", -2):
            break
        data += chunk
    stream.finish()
    return vol.path(), data


def test_an_efi_guest_moves_live_to_another_host_and_back_with_its_variables(hv, hv2, efi):
    """Its UEFI variables file goes with it (copied through libvirt, the
    definition naming the target's copy, the source's removed after), and the
    guest keeps running UEFI on each host."""
    name, info = efi
    uri2, conn2 = hv2
    _path, before = _vars(hv, name)
    started = time.monotonic()
    there = _moved(hv, conn2, name, ("hv1", "hv2"), uri2)
    assert conn2.lookupByName(name).isActive()
    path2, copied = _vars(conn2, name)
    assert there["nvram"] == path2 and copied == before
    assert firmware.nvram_path(Domain(conn2.lookupByName(name).XMLDesc(0))) == path2
    assert not os.path.exists(f"{IMAGES}/{firmware.nvram_volume_name(name)}")
    guest = guests.TestGuest(name, conn2.lookupByName(name), info["ip_address"], None)
    assert guest.run("test -d /sys/firmware/efi && echo uefi").strip() == "uefi"
    back = _moved(conn2, hv, name, ("hv2", "hv1"), URI)
    assert back["nvram"] == f"{IMAGES}/{firmware.nvram_volume_name(name)}"
    assert firmware.nvram_path(Domain(hv.lookupByName(name).XMLDesc(0))) == back["nvram"]
    assert open(back["nvram"], "rb").read() == before
    with pytest.raises(libvirt.libvirtError):
        conn2.lookupByName(name)
    guest = guests.TestGuest(name, hv.lookupByName(name), info["ip_address"], None)
    assert guest.run("test -d /sys/firmware/efi && echo uefi").strip() == "uefi"
    print(f"\n{name}: to hv2 and back in {time.monotonic() - started:.1f} s")


def test_destroy_removes_the_nvram_and_the_tpm_state(hv, salt, secure, efi):
    doomed = [secure, efi[0]]
    uuids = {n: hv.lookupByName(n).UUIDString() for n in doomed}
    for name in doomed:
        salt.cloud("-d", name)
        with pytest.raises(libvirt.libvirtError):
            hv.lookupByName(name)
        assert not os.path.exists(f"{IMAGES}/{firmware.nvram_volume_name(name)}")
        assert not os.path.exists(os.path.join(SWTPM_DIR, uuids[name]))
