"""Domain capabilities → what the host offers, and the firmware/TPM/console XML."""

import os
import struct
import zlib

import pytest
from lxml import etree

from salt_kvm.cloud import machine
from salt_kvm.cloud.features import GuestFeatures
from salt_kvm.errors import SpecError
from salt_kvm.virt import firmware, graphics
from salt_kvm.virt.domain import Domain, new_domain

CAPS = """<domainCapabilities><os supported='yes'>
  <enum name='firmware'><value>efi</value></enum>
  <loader supported='yes'><value>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</value>
    <value>/usr/share/OVMF/OVMF_CODE_4M.fd</value>
    <enum name='secure'><value>yes</value><value>no</value></enum></loader></os>
  <devices>
    <graphics supported='yes'><enum name='type'><value>vnc</value><value>dbus</value></enum>
    </graphics>
    <tpm supported='yes'><enum name='model'><value>tpm-crb</value></enum>
      <enum name='backendModel'><value>passthrough</value><value>emulator</value></enum></tpm>
  </devices></domainCapabilities>"""
BARE = """<domainCapabilities><os supported='yes'><enum name='firmware'/>
  <loader supported='yes'><enum name='type'><value>rom</value></enum></loader></os>
  <devices><graphics supported='yes'><enum name='type'><value>vnc</value></enum></graphics>
  <tpm supported='yes'><enum name='backendModel'><value>passthrough</value></enum></tpm>
  </devices></domainCapabilities>"""


def test_capabilities_of_a_host_with_ovmf_and_swtpm():
    host = firmware.parse_capabilities(CAPS)
    assert host.efi and host.secure_boot and host.tpm_emulator
    assert host.graphics == {"vnc", "dbus"}


def test_capabilities_of_a_host_without_them():
    host = firmware.parse_capabilities(BARE)
    assert not host.efi and not host.secure_boot and not host.tpm_emulator and host.tpm_known


class FakeConn:
    def __init__(self, caps):
        self.caps, self.asked = caps, []

    def getDomainCapabilities(self, emulator, arch, machine, virt_type, flags):  # noqa: N802
        self.asked.append(machine)
        return self.caps

    def getURI(self):  # noqa: N802
        return "qemu:///system"


def base():
    return new_domain("base", "qemu", 512, 1, "/pool/base.qcow2")


@pytest.mark.parametrize(
    "kwargs,key,package",
    [
        ({"efi": True}, "firmware", "ovmf"),
        ({"efi": True}, "firmware", "edk2-ovmf"),
        ({"tpm": True}, "tpm", "swtpm swtpm-tools"),
    ],
)
def test_refusals_name_the_key_and_the_package(kwargs, key, package):
    args = {"efi": False, "secure_boot": False, "tpm": False, "graphics": None, **kwargs}
    with pytest.raises(SpecError) as err:
        firmware.check_host(FakeConn(BARE), base(), "qemu", **args)
    assert err.value.key == key and package in str(err.value)


def test_secure_boot_is_checked_on_q35_and_spice_refused_where_qemu_has_none():
    conn = FakeConn(CAPS)
    firmware.check_host(conn, base(), "qemu", True, True, True, "vnc")
    assert conn.asked == ["q35"]
    with pytest.raises(SpecError) as err:
        firmware.check_host(conn, base(), "qemu", False, False, False, "spice")
    assert err.value.key == "graphics" and "vnc" in str(err.value.accepted)


def plan(features, efi, nvram="/pool/vm1_VARS.fd"):
    return machine.MachinePlan(features, efi, nvram=nvram if efi else None)


def test_efi_secure_boot_tpm_vnc_xml():
    xml = base()
    etree.SubElement(xml.node.find("devices"), "controller", type="ide", index="0")
    cdrom = etree.SubElement(xml.node.find("devices"), "disk", type="file", device="cdrom")
    etree.SubElement(cdrom, "target", dev="hdc", bus="ide")
    etree.SubElement(cdrom, "address", type="drive", controller="0", bus="1", unit="0")
    features = GuestFeatures(firmware="efi", secure_boot=True, tpm=True, graphics="vnc")
    machine.apply(xml, plan(features, True))
    os_node = xml.node.find("os")
    assert os_node.get("firmware") == "efi"
    assert os_node.find("type").get("machine") == "q35"
    assert {f.get("name"): f.get("enabled") for f in os_node.findall("firmware/feature")} == {
        "secure-boot": "yes",
        "enrolled-keys": "yes",
    }
    assert os_node.findtext("nvram") == "/pool/vm1_VARS.fd"
    assert xml.node.find("features/smm").get("state") == "on"
    assert xml.node.find("features/acpi") is not None
    assert xml.node.find("devices/controller[@type='ide']") is None
    assert xml.node.find("devices/disk[@device='cdrom']/target").attrib == {
        "dev": "sda",
        "bus": "sata",
    }
    assert xml.node.find(".//address[@type='drive']") is None
    tpm = xml.node.find("devices/tpm")
    assert tpm.get("model") == "tpm-crb"
    assert tpm.find("backend").attrib == {"type": "emulator", "version": "2.0"}
    (vnc,) = xml.node.findall("devices/graphics")
    assert vnc.get("type") == "vnc" and vnc.get("autoport") == "yes"
    assert vnc.find("listen").attrib == {"type": "address", "address": "127.0.0.1"}
    assert len(vnc.get("passwd")) == 8 and vnc.get("passwd").isalnum()
    assert xml.node.find("devices/video/model").get("type") == "vga"
    shown = machine.shown(xml)
    assert shown["firmware"] == "efi" and shown["secure_boot"] and shown["tpm"]
    assert shown["consoles"] == [{"type": "vnc", "address": "127.0.0.1", "port": None}]
    assert "passwd" not in str(shown)


def test_plain_efi_keeps_the_machine_and_every_guest_gets_its_own_password():
    a, b = base(), base()
    for xml in (a, b):
        machine.apply(xml, plan(GuestFeatures(firmware="efi", graphics="vnc"), True))
    assert a.node.find("os/type").get("machine") == "pc"
    assert a.node.find("os/firmware/feature[@name='secure-boot']").get("enabled") == "no"
    assert a.node.find("features/smm") is None
    assert a.node.find("devices/graphics").get("passwd") != b.node.find("devices/graphics").get(
        "passwd"
    )


def test_a_base_console_gets_a_password_and_loopback_and_bios_drops_uefi():
    xml = base()
    g = etree.SubElement(xml.node.find("devices"), "graphics", type="vnc", listen="0.0.0.0")
    g.set("port", "5905")
    etree.SubElement(g, "listen", type="address", address="0.0.0.0")
    etree.SubElement(xml.node.find("devices"), "graphics", type="sdl")
    video = etree.SubElement(xml.node.find("devices"), "video")
    etree.SubElement(video, "model", type="cirrus", vram="16384")
    os_node = xml.node.find("os")
    os_node.set("firmware", "efi")
    etree.SubElement(os_node, "nvram").text = "/var/lib/libvirt/qemu/nvram/base_VARS.fd"
    machine.apply(xml, plan(GuestFeatures(firmware="bios"), False))
    assert os_node.get("firmware") is None and os_node.find("nvram") is None
    vnc, sdl = xml.node.findall("devices/graphics")
    assert sdl.attrib == {"type": "sdl"}  # a local display: left as it is
    assert vnc.get("listen") == "127.0.0.1" and vnc.get("port") is None
    assert [e.get("address") for e in vnc.findall("listen")] == ["127.0.0.1"]
    assert vnc.get("passwd")
    assert xml.node.find("devices/video/model").attrib == {"type": "vga"}


def test_graphics_none_removes_the_consoles():
    xml = base()
    etree.SubElement(xml.node.find("devices"), "graphics", type="vnc")
    machine.apply(xml, plan(GuestFeatures(graphics="none"), False))
    assert xml.node.find("devices/graphics") is None


def test_nvram_path_reads_both_forms():
    xml = Domain("<domain><os><nvram>/a/b_VARS.fd</nvram></os></domain>")
    assert firmware.nvram_path(xml) == "/a/b_VARS.fd"
    xml = Domain("<domain><os><nvram type='file'><source file='/c'/></nvram></os></domain>")
    assert firmware.nvram_path(xml) == "/c"
    assert firmware.nvram_path(base()) is None


def ppm(width, height, pixels: bytes, comment=b"") -> bytes:
    return b"P6\n" + comment + f"{width} {height}\n255\n".encode() + pixels


def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2) and b"IEND" in chunks
    return width, height, zlib.decompress(chunks[b"IDAT"])


def test_ppm_becomes_a_valid_png():
    pixels = bytes(range(2 * 3 * 3))
    width, height, raw = png_pixels(graphics.ppm_to_png(ppm(3, 2, pixels, b"# qemu\n")))
    assert (width, height) == (3, 2)
    assert raw == b"\x00" + pixels[:9] + b"\x00" + pixels[9:]


@pytest.mark.parametrize("data", [b"P3\n1 1\n255\n000", ppm(2, 2, b"\x00" * 5), b"P6\nx"])
def test_a_bad_screenshot_is_an_error(data):
    with pytest.raises(Exception, match="screenshot"):
        graphics.ppm_to_png(data)


def test_the_screenshot_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "shot.png"
    link.symlink_to(victim)
    with pytest.raises(SpecError) as err:
        graphics.write_new_file(str(link), b"png")
    assert err.value.key == "path" and "overwrite=true" in err.value.accepted
    graphics.write_new_file(str(link), b"png", overwrite=True)
    assert victim.read_bytes() == b"keep"
    assert not link.is_symlink() and link.read_bytes() == b"png"
    assert oct(os.stat(link).st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shot.png", "victim"]


def test_a_new_screenshot_is_written_and_an_existing_one_refused(tmp_path):
    path = tmp_path / "new.png"
    assert graphics.write_new_file(str(path), b"one") == str(path)
    with pytest.raises(SpecError):
        graphics.write_new_file(str(path), b"two")
    assert path.read_bytes() == b"one"
    with pytest.raises(SpecError):
        graphics.write_new_file(str(tmp_path / "missing" / "x.png"), b"x")


def test_passwords_are_random_and_vnc_sized():
    seen = {graphics.new_password() for _ in range(50)}
    assert len(seen) == 50 and all(len(p) == 8 and p.isalnum() for p in seen)


@pytest.mark.parametrize("name", ["shot.png\n", "shot.png ", " shot.png", "sh\tot.png", "a\x00b"])
def test_a_screenshot_path_with_whitespace_or_control_characters_is_refused(tmp_path, name):
    # path=$(mktemp) or a templated path with a trailing newline made a file
    # whose name ends in a newline, beside the one the operator looks for.
    with pytest.raises(SpecError) as err:
        graphics.write_new_file(str(tmp_path / name), b"png")
    assert err.value.key == "path" and err.value.accepted
    assert list(tmp_path.iterdir()) == []
