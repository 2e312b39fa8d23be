"""Firmware, TPM and console keys on libvirt's test driver: refusals before
anything is made, the console's password kept out of every read but the
secure one, the console and screenshot actions, and the NVRAM delete gate."""

import struct

import libvirt
import pytest

from salt_kvm.cloud import actions, console, provision, seed
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt import firmware, lifecycle
from salt_kvm.virt.domain import Domain, new_domain
from salt_kvm.virt.rollback import Rollback


def spec(**values):
    base = {"name": "vm1", "base_domain": "base", "password": "pw", "clone_strategy": "quick"}
    return build_spec({**base, **values})


def state(conn, pool):
    pool.refresh(0)
    return sorted(d.name() for d in conn.listAllDomains(0)), sorted(pool.listVolumes())


def test_efi_where_the_host_has_no_firmware_is_refused_naming_the_package(conn, pool, base):
    """The test driver's domain capabilities list no UEFI firmware."""
    try:
        conn.getDomainCapabilities(None, "x86_64", "pc", "test", 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        pytest.skip(f"this libvirt's test driver has no domain capabilities: {exc}")
    before = state(conn, pool)
    with pytest.raises(SpecError) as err:
        provision.create(conn, spec(firmware="efi"), Rollback(), lambda *a: None)
    assert err.value.key == "firmware"
    assert "ovmf (Debian/Ubuntu)" in str(err.value) and "edk2-ovmf" in str(err.value)
    assert state(conn, pool) == before


def test_vnc_console_password_is_only_in_the_secure_xml(conn, pool, base, tmp_path):
    events = []
    guest = provision.create(
        conn,
        spec(graphics="vnc", tpm=True),
        Rollback(),
        lambda step, data: events.append((step, data)),
    )
    dom = guest.domain
    secure = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
    password = secure.node.find("devices/graphics").get("passwd")
    assert password and len(password) == 8
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        assert password not in dom.XMLDesc(flags)
    assert password not in repr(events)
    shown = actions.describe(conn, "vm1")
    assert password not in repr(shown)
    assert shown["machine"]["tpm"] is True
    assert shown["machine"]["consoles"][0]["address"] == "127.0.0.1"
    (reach,) = console.console(conn, "vm1")["vm1"]["consoles"]
    assert reach["password"] == password and reach["type"] == "vnc"
    assert reach["url"].startswith("vnc://127.0.0.1:") and "tunnel" not in reach
    path = tmp_path / "vm1.png"
    written = console.screenshot(conn, "vm1", str(path))
    assert written["vm1"]["screenshot"] == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    with pytest.raises(SpecError, match="overwrite=true"):
        console.screenshot(conn, "vm1", str(path))
    actions.destroy(conn, "vm1", False)
    assert "vm1" not in state(conn, pool)[0]


@pytest.mark.skipif(
    libvirt.getVersion() < 10_000_000,
    reason="libvirt 9's test driver has no virDomainUpdateDeviceFlags (the seed's eject)",
)
def test_the_seed_ejection_keeps_the_console_password(conn, pool, base, monkeypatch):
    """The definition written back after the seed is ejected is read with the
    secure flag: without it the console would lose its password."""

    def upload(conn, pool_name, volume, data):  # the test driver cannot stream
        xml = f"<volume><name>{volume}</name><capacity>{len(data)}</capacity></volume>"
        return conn.storagePoolLookupByName(pool_name).createXML(xml, 0)

    monkeypatch.setattr(seed, "upload", upload)
    guest = provision.create(
        conn, spec(graphics="vnc", deploy_method="none"), Rollback(), lambda *a: None, b"iso"
    )
    definition = libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE
    before = Domain(guest.domain.XMLDesc(definition))
    provision.detach_seed(conn, guest)
    after = Domain(guest.domain.XMLDesc(definition))
    assert not [d for d in after.disks if d.device == "cdrom" and d.path]
    assert after.node.find("devices/graphics").get("passwd") == before.node.find(
        "devices/graphics"
    ).get("passwd")


def test_console_of_a_guest_without_one_says_which_key(conn, pool, base):
    provision.create(conn, spec(), Rollback(), lambda *a: None)
    with pytest.raises(SaltKvmError, match="graphics"):
        console.console(conn, "vm1")


def test_tunnel_line_for_a_remote_hypervisor():
    line = console.tunnel_line("qemu+ssh://admin@hv1:2222/system", "127.0.0.1", 5901)
    assert line == "ssh -N -p 2222 -L 127.0.0.1:5901:127.0.0.1:5901 admin@hv1"


def define_with_nvram(conn, name, nvram, recorded):
    xml = new_domain(name, "test", 256, 1, f"/default-pool/{name}.img")
    os_node = xml.node.find("os")
    loader = os_node.makeelement("loader", {"readonly": "yes", "type": "pflash"})
    loader.text = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    os_node.append(loader)
    os_node.append(os_node.makeelement("nvram", {}))
    os_node.find("nvram").text = nvram
    xml.set_managed_info({"base": "base", **({"nvram": nvram} if recorded else {})})
    return conn.defineXML(xml.to_xml())


def test_nvram_goes_only_when_it_is_the_guests_own_and_unused(conn):
    """The delete gate: a UEFI variables file another domain uses is kept, as
    is one salt-kvm did not make for the guest."""
    path = "/default-pool/vm1_VARS.fd"
    vm1 = define_with_nvram(conn, "vm1", path, recorded=True)
    other = define_with_nvram(conn, "other", path, recorded=False)
    assert not lifecycle.nvram_is_own(vm1)
    assert not lifecycle.nvram_is_own(other)  # not recorded as made for it
    other.undefine()
    assert lifecycle.nvram_is_own(vm1)
    lifecycle.undefine(vm1)
    assert "vm1" not in [d.name() for d in conn.listAllDomains(0)]


def test_a_uefi_base_clones_with_its_own_copy_of_the_variables(conn, pool, base, monkeypatch):
    """The base's NVRAM (a pool volume here) is copied to ``<name>_VARS.fd``;
    the base's own file is never the clone's, and destroy removes the copy only.
    (The test driver lists no firmware: the host is said to have OVMF.)"""
    ovmf = firmware.HostSupport(efi=True, secure_boot=True, graphics_known=False)
    monkeypatch.setattr(firmware, "host_support", lambda *a: ovmf)
    xml = Domain(base.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    vars_vol = pool.createXML(
        "<volume><name>base_VARS.fd</name><capacity>540672</capacity></volume>", 0
    )
    os_node = xml.node.find("os")
    loader = os_node.makeelement("loader", {"readonly": "yes", "type": "pflash"})
    loader.text = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    os_node.append(loader)
    nvram = os_node.makeelement("nvram", {})
    nvram.text = vars_vol.path()
    os_node.append(nvram)
    conn.defineXML(xml.to_xml())
    for strategy in ("quick", "full"):
        name = f"vm-{strategy}"
        guest = provision.create(
            conn, spec(name=name, clone_strategy=strategy), Rollback(), lambda *a: None
        )
        made = Domain(guest.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        own = made.node.findtext("os/nvram").strip()
        assert own.endswith(f"/{name}_VARS.fd") and own != vars_vol.path()
        assert made.managed_info()["nvram"] == own
        pool.refresh(0)
        assert f"{name}_VARS.fd" in pool.listVolumes()
        removed = actions.destroy(conn, name, False)
        assert own in removed["volumes"]
        pool.refresh(0)
        assert f"{name}_VARS.fd" not in pool.listVolumes()
    assert "base_VARS.fd" in pool.listVolumes()
