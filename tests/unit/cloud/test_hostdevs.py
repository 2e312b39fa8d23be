"""hostdevs: how a profile names host PCI and USB devices, and its refusals."""

import pytest

from salt_kvm.cloud.hostdevs import HostdevSpec
from salt_kvm.cloud.spec import build_spec, check_written_keys
from salt_kvm.errors import SpecError
from salt_kvm.virt.domain import Domain, has_hostdevs, new_domain

ALLOWED = [{"pci": "8086:10fb"}, {"usb": "046d:c52b"}]  # the provider's
MINIMAL = {"name": "vm1", "base_domain": "base", "password": "pw", "hostdev_allowed": ALLOWED}


def refused(key, value):
    with pytest.raises(SpecError) as err:
        build_spec({**MINIMAL, "hostdevs": value})
    assert err.value.key == key, str(err.value)
    assert err.value.accepted
    return err.value


def test_every_form_a_device_is_named_by():
    devs = build_spec(
        {
            **MINIMAL,
            "hostdevs": [
                {"pci": "0000:03:00.0"},
                {"pci": "04:10.7"},
                {"pci": "8086:10FB", "managed": False},
                {"usb": "046d:c52b"},
                {"usb": {"bus": 1, "device": "4"}},
            ],
        }
    ).hostdevs
    assert devs == [
        HostdevSpec("pci", address=(0, 3, 0, 0)),
        HostdevSpec("pci", address=(0, 4, 0x10, 7)),
        HostdevSpec("pci", vendor=0x8086, product=0x10FB, managed=False),
        HostdevSpec("usb", vendor=0x046D, product=0xC52B),
        HostdevSpec("usb", address=(1, 4)),
    ]
    assert [d.shown for d in devs] == [
        "pci 0000:03:00.0",
        "pci 0000:04:10.7",
        "pci 8086:10fb",
        "usb 046d:c52b",
        "usb bus 1 device 4",
    ]


def test_no_hostdevs_is_an_empty_list():
    assert build_spec(MINIMAL).hostdevs == []
    assert build_spec({**MINIMAL, "hostdevs": []}).hostdevs == []
    assert build_spec({**MINIMAL, "hostdev_allowed": None}).hostdev_allowed == []


def test_without_the_providers_hostdev_allowed_no_device_is_taken():
    values = {**MINIMAL, "hostdevs": [{"pci": "0000:03:00.0"}]}
    del values["hostdev_allowed"]
    with pytest.raises(SpecError) as err:
        build_spec(values)
    assert err.value.key == "hostdevs"
    assert "provider allows no host devices" in str(err.value)
    assert "hostdev_allowed in the provider configuration" in err.value.accepted
    assert build_spec(MINIMAL).hostdev_allowed == [
        HostdevSpec("pci", vendor=0x8086, product=0x10FB),
        HostdevSpec("usb", vendor=0x046D, product=0xC52B),
    ]


def test_a_profile_cannot_allow_host_devices_itself():
    check_written_keys({}, {"hostdev_allowed": ALLOWED})
    with pytest.raises(SpecError) as err:
        check_written_keys({"hostdev_allowed": ALLOWED}, {})
    assert err.value.key == "hostdev_allowed"
    assert "take any device from the host" in str(err.value)
    assert "provider configuration" in err.value.accepted


def test_a_bad_allow_list_is_refused_by_its_name():
    with pytest.raises(SpecError, match=r"^hostdev_allowed\[0\]\.pci: "):
        build_spec({**MINIMAL, "hostdev_allowed": [{"pci": "nope"}]})


@pytest.mark.parametrize(
    "value, key, words",
    [
        ("0000:03:00.0", "hostdevs", "not a list"),
        ({"pci": "03:00.0"}, "hostdevs", "not a list"),
        ({}, "hostdevs", "not a list"),
        (["0000:03:00.0"], "hostdevs[0]", "not a host device"),
        ([{"pci": "03:00.0", "usb": "046d:c52b"}], "hostdevs[0]", "exactly one of pci or usb"),
        ([{"managed": True}], "hostdevs[0]", "exactly one of pci or usb"),
        ([{"pci": "03:00.0", "rom": "off"}], "hostdevs[0]", "unknown key(s) rom"),
        ([{"pci": "03:00.8"}], "hostdevs[0].pci", "not a PCI address"),
        ([{"pci": "3:0.0"}], "hostdevs[0].pci", "not a PCI address"),
        ([{"pci": "pci_0000_03_00_0"}], "hostdevs[0].pci", "lspci -D"),
        ([{"pci": 8086}], "hostdevs[0].pci", "not a PCI address"),
        ([{"usb": "1:4"}], "hostdevs[0].usb", "not a USB vendor:product"),
        ([{"usb": {"bus": 1}}], "hostdevs[0].usb", "needs bus and device"),
        ([{"usb": {"bus": 0, "device": 4}}], "hostdevs[0].usb.bus", "1 to 255"),
        ([{"usb": {"bus": 1, "device": 128}}], "hostdevs[0].usb.device", "1 to 127"),
        ([{"pci": "03:00.0", "managed": "maybe"}], "hostdevs[0].managed", "not a boolean"),
        ([{"pci": "03:00.0"}, {"pci": "0000:03:00.0"}], "hostdevs[1]", "given twice"),
    ],
)
def test_bad_items_are_refused_by_name(value, key, words):
    assert words in str(refused(key, value))


def test_has_hostdevs_sees_passthrough_devices_and_hostdev_nics():
    dom = new_domain("vm", "qemu", 512, 1, "/x.qcow2")
    assert not has_hostdevs(dom) and not has_hostdevs(dom.to_xml())
    with_pci = Domain(
        dom.to_xml().replace(
            "</devices>",
            "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
            "<address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source>"
            "</hostdev></devices>",
        )
    )
    assert has_hostdevs(with_pci) and has_hostdevs(with_pci.to_xml())
    sriov = dom.to_xml().replace(
        "</devices>",
        "<interface type='hostdev' managed='yes'><source><address type='pci' domain='0x0000' "
        "bus='0x03' slot='0x10' function='0x1'/></source></interface></devices>",
    )
    assert has_hostdevs(sriov)
    assert not has_hostdevs("<domain type='qemu'><name>x</name></domain>")
