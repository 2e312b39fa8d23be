"""The migration's request, flags, URI and the target's definition (pure logic)."""

import libvirt
import pytest
from lxml import etree

from salt_kvm.cloud.migration import check_target
from salt_kvm.errors import SpecError
from salt_kvm.virt import migrate as mig
from salt_kvm.virt.domain import Domain, disks_metadata_element, new_domain

pytestmark = pytest.mark.unit


def test_options_are_checked_naming_the_key_and_accepted_values():
    assert mig.parse_request({}) == mig.Request()
    found = mig.parse_request({"copy_base": "yes", "address": "10.0.0.2", "port": "49300"})
    assert found == mig.Request(copy_base=True, address="10.0.0.2", port=49300)
    with pytest.raises(
        SpecError, match=r"^speed: is not a migration option \(accepted: copy_base, address, port\)"
    ):
        mig.parse_request({"speed": 10})
    assert mig.parse_request({"location": "hv2"}, ignore=("location",)) == mig.Request()
    with pytest.raises(
        SpecError,
        match=r"^port: 80 is out of range \(accepted: a whole number from 1024 to 65534\)",
    ):
        mig.parse_request({"port": 80})
    with pytest.raises(SpecError, match="^port: "):
        mig.parse_request({"port": "fast"})
    with pytest.raises(SpecError, match=r"^copy_base: 'maybe' is not a boolean"):
        mig.parse_request({"copy_base": "maybe"})
    for bad in ("10.0.0.2; rm -rf /", "tcp://hv2", "-hv2", ["hv2"]):
        with pytest.raises(SpecError, match="^address: .* is not an IP address or host name"):
            mig.parse_request({"address": bad})


def test_the_stream_goes_to_the_address_given_else_the_target_uri_host_else_loopback():
    plain = mig.Request()
    assert mig.stream_address("qemu+ssh://root@hv2.example.com/system", plain) == "hv2.example.com"
    assert mig.stream_address("qemu:///system", plain) == "127.0.0.1"
    sock = "qemu+unix:///system?socket=/var/lib/salt-kvm/hv2/run/libvirt-sock"
    assert mig.stream_address(sock, plain) == "127.0.0.1"
    given = mig.Request(address="10.1.2.3")
    assert mig.stream_address("qemu+ssh://root@hv2/system", given) == "10.1.2.3"
    assert mig.migration_uri("10.1.2.3", 49300) == "tcp://10.1.2.3:49300"
    assert mig.migration_uri("fd00::2", None) == "tcp://[fd00::2]"


def test_flags_live_or_paused_and_full_or_incremental_disks():
    always = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    live_quick = mig.flags(live=True, incremental=True)
    assert live_quick == always | libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_NON_SHARED_INC
    offline_full = mig.flags(live=False, incremental=False)
    assert offline_full == always | libvirt.VIR_MIGRATE_PAUSED | libvirt.VIR_MIGRATE_NON_SHARED_DISK


def test_params_name_the_disks_and_use_the_next_port_for_them():
    found = mig.params("<d/>", "<p/>", "tcp://127.0.0.1:46100", "127.0.0.1", ["vda"], 46100)
    assert found[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] == ["vda"]
    assert found[libvirt.VIR_MIGRATE_PARAM_DISKS_PORT] == 46101
    assert found[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] == "127.0.0.1"
    assert libvirt.VIR_MIGRATE_PARAM_DISKS_PORT not in mig.params("", "", "tcp://h", "h", [], None)


def test_the_target_definition_has_the_target_paths_in_disks_and_metadata():
    xml = new_domain("vm1", "qemu", 512, 1, "/src/vm1.qcow2")
    xml.set_managed_info({"base": "b", "volumes": ["/src/vm1.qcow2", "/src/vm1-data.qcow2"]})
    metadata = xml.node.find("metadata")
    metadata.append(disks_metadata_element({"/src/vm1-data.qcow2": {"name": "data"}}))
    moved = mig.rewrite(
        xml, {"/src/vm1.qcow2": "/dst/vm1.qcow2", "/src/vm1-data.qcow2": "/dst/vm1-data.qcow2"}
    )
    assert [d.path for d in moved.disks] == ["/dst/vm1.qcow2"]
    assert moved.managed_info()["volumes"] == ["/dst/vm1.qcow2", "/dst/vm1-data.qcow2"]
    assert list(moved.created_disks()) == ["/dst/vm1-data.qcow2"]
    assert [d.path for d in xml.disks] == ["/src/vm1.qcow2"]  # the source's is untouched
    assert isinstance(moved, Domain)


def test_location_names_a_host_of_the_provider_other_than_the_guest_s():
    hosts = {"hv1": "qemu:///system", "hv2": "qemu+ssh://hv2/system"}
    assert check_target("hv2", hosts, "hv1") == "hv2"
    with pytest.raises(SpecError, match=r"^location: is required .*\(accepted: hv1, hv2\)"):
        check_target(None, hosts)
    with pytest.raises(SpecError, match=r"^location: 'hv9' is not one of .*\(accepted: hv1, hv2\)"):
        check_target("hv9", hosts)
    with pytest.raises(SpecError, match="^location: the guest is already on hv1"):
        check_target("hv1", hosts, "hv1")
    with pytest.raises(SpecError, match="^location: this provider has one hypervisor"):
        check_target("hv2", None)


class _Dom:
    """What refusals() asks a domain besides its XML."""

    def snapshotListNames(self, flags):  # noqa: N802 - libvirt's name
        return []

    def listAllCheckpoints(self, flags):  # noqa: N802 - libvirt's name
        return []


def test_media_shared_and_non_file_disks_and_a_tpm_are_named():
    xml = new_domain("vm1", "qemu", 512, 1, "/src/vm1.qcow2")
    devices = xml.node.find("devices")
    cdrom = etree.SubElement(devices, "disk", type="file", device="cdrom")
    etree.SubElement(cdrom, "source", file="/src/seed.iso")
    etree.SubElement(cdrom, "target", dev="sda")
    etree.SubElement(cdrom, "readonly")
    empty = etree.SubElement(devices, "disk", type="file", device="cdrom")
    etree.SubElement(empty, "target", dev="sdb")
    block = etree.SubElement(devices, "disk", type="block", device="disk")
    etree.SubElement(block, "source", dev="/dev/vg/data")
    etree.SubElement(block, "target", dev="vdb")
    shared = etree.SubElement(devices, "disk", type="file", device="disk")
    etree.SubElement(shared, "source", file="/src/shared.raw")
    etree.SubElement(shared, "target", dev="vdc")
    etree.SubElement(shared, "shareable")
    etree.SubElement(xml.node.find("os"), "nvram").text = "/src/vm1_VARS.fd"  # moves
    tpm = etree.SubElement(devices, "tpm", model="tpm-crb")
    etree.SubElement(tpm, "backend", type="emulator", version="2.0")
    assert mig.refusals(_Dom(), Domain(xml.to_xml())) == [
        "it has a TPM: its state (swtpm's files, outside any storage pool) is not moved, "
        "and a TPM whose state forks breaks what it sealed",
        "disk sda is a read-only medium (/src/seed.iso): eject it first",
        "disk vdb is not a file (block): only pool volumes move",
        "disk vdc is shareable: storage the hosts would have to share",
    ]
    plain = new_domain("vm2", "qemu", 512, 1, "/src/vm2.qcow2")
    assert mig.refusals(_Dom(), plain) == []


def test_the_target_definition_names_the_moved_nvram():
    xml = new_domain("vm1", "qemu", 512, 1, "/src/vm1.qcow2")
    etree.SubElement(xml.node.find("os"), "nvram").text = "/src/vm1_VARS.fd"
    xml.set_managed_info({"volumes": ["/src/vm1.qcow2"], "nvram": "/src/vm1_VARS.fd"})
    paths = {"/src/vm1.qcow2": "/dst/vm1.qcow2", "/src/vm1_VARS.fd": "/dst/vm1_VARS.fd"}
    moved = mig.rewrite(xml, paths)
    assert moved.node.find("os/nvram").text == "/dst/vm1_VARS.fd"
    assert moved.managed_info()["nvram"] == "/dst/vm1_VARS.fd"
    assert moved.managed_info()["volumes"] == ["/dst/vm1.qcow2"]
