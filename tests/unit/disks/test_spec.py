"""Disk specs: the module's arguments and the profile's ``disks:``; targets;
the disk XML; what a state compares."""

import pytest

from salt_kvm.cloud.spec import build_spec
from salt_kvm.disks import spec as disks
from salt_kvm.errors import SpecError
from salt_kvm.virt.domain import Disk, Domain, disks_metadata_element
from salt_kvm.virt.units import GIB, MIB
from salt_kvm.virt.xmlmodel import parse, tostring


def rejected(key, fn, *args):
    with pytest.raises(SpecError) as err:
        fn(*args)
    assert err.value.key == key, str(err.value)
    assert err.value.accepted, str(err.value)
    return err.value


def test_a_new_volume_defaults_to_sparse_qcow2_on_virtio_in_the_default_pool():
    spec = disks.parse_disk("data", {"size": "10G"})
    assert spec == disks.DiskSpec(name="data", size=10 * GIB, format="qcow2")
    assert spec.new and spec.pool == "default" and spec.preallocation == "off"
    assert disks.parse_disk("d", {"size": 2}).size == 2 * GIB  # a bare number is GiB


def test_an_existing_path_keeps_its_format_open_until_the_pool_says():
    spec = disks.parse_disk("img", {"path": "/srv/a.raw", "readonly": "yes", "bus": "sata"})
    assert spec.format is None and spec.readonly and spec.bus == "sata" and not spec.new


@pytest.mark.parametrize(
    "values,key,accepted",
    [
        ({}, "size", "size, path"),
        ({"size": "1G", "path": "/srv/a"}, "size", "size, path"),
        ({"size": "lots"}, "size", "2G"),
        ({"size": "1G", "format": "qcow3"}, "format", "qcow2, raw"),
        ({"path": "/srv/a", "format": "iso"}, "format", "cloop"),
        ({"size": "1G", "format": "cloop"}, "format", "qed"),
        ({"path": "/srv/a", "format": "cloop"}, "readonly", "true"),
        ({"path": "srv/a"}, "path", "absolute"),
        ({"path": "/srv/../etc/a"}, "path", "'..'"),
        ({"size": "1G", "bus": "usb"}, "bus", "virtio, scsi, sata, ide"),
        ({"size": "1G", "cache": "fast"}, "cache", "writeback"),
        ({"size": "1G", "index": 0}, "index", "from 1"),
        ({"size": "1G", "index": 4, "bus": "ide"}, "index", "to 3"),
        ({"size": "1G", "readonly": True}, "readonly", "false"),
        ({"size": "1G", "readonly": "maybe"}, "readonly", "true, false"),
        ({"size": "1G", "preallocation": "full"}, "preallocation", "off, metadata"),
        ({"size": "1G", "format": "raw", "preallocation": "metadata"}, "preallocation", "full"),
        ({"path": "/srv/a", "pool": "x"}, "pool", "leave it out"),
        ({"size": "1G", "colour": "red"}, "disk", "preallocation"),
    ],
)
def test_bad_disk_arguments_name_the_field_and_accepted_values(values, key, accepted):
    err = rejected(key, disks.parse_disk, "data", values)
    assert accepted in err.accepted


@pytest.mark.parametrize("name", ["", "a/b", "-x", "vdb", "sdc", "hda", "x" * 64, None, 3])
def test_disk_names_are_safe_aliases_and_not_targets(name):
    rejected("name", disks.parse_disk, name, {"size": "1G"})


def test_sizes_round_up_to_whole_sectors():
    assert disks.parse_disk("d", {"size": "1000b"}).size == 1024
    assert disks.parse_size_arg("3G") == 3 * GIB
    assert disks.parse_size_arg(1.5) == 1536 * MIB


@pytest.mark.parametrize(
    "index,bus,target", [(1, "virtio", "vdb"), (25, "virtio", "vdz"), (26, "scsi", "sdaa")]
)
def test_targets_follow_bus_and_index_both_ways(index, bus, target):
    assert disks.target_name(bus, index) == target
    assert disks.target_index(target) == index
    assert disks.target_index("fd0") is None


def test_profile_disks_ordered_by_index_then_mapping_order():
    parsed = disks.parse_disks(
        {
            "logs": {"size": "1G"},
            "second": {"path": "/srv/b.qcow2", "format": "qcow2", "index": 2},
            "first": {"path": "/srv/a.qcow2", "index": 1, "cache": "none"},
        }
    )
    assert [d.name for d in parsed] == ["first", "second", "logs"]


def test_profile_disk_errors_name_the_disk():
    err = rejected("disks.data.size", disks.parse_disks, {"data": {"size": "x"}})
    assert str(err).startswith("disks.data.size: ")
    rejected(
        "disks.b.index",
        disks.parse_disks,
        {"a": {"size": 1, "index": 1}, "b": {"size": 1, "index": 1}},
    )
    rejected("disks.b.path", disks.parse_disks, {"a": {"path": "/p"}, "b": {"path": "/p"}})
    rejected("disks", disks.parse_disks, ["data"])
    rejected("disks.data", disks.parse_disks, {"data": "10G"})


def test_profile_keys_reach_the_vm_spec():
    base = {"name": "vm1", "base_domain": "base", "password": "pw"}
    assert build_spec(base).disks == disks.ProfileDisks()
    spec = build_spec(
        {
            **base,
            "disks": {"data": {"size": "2G", "index": 1}},
            "delete_disks": True,
            "disk_allowed_dirs": ["/srv/images/"],
        }
    )
    assert spec.disks.disks[0].size == 2 * GIB and spec.disks.disks[0].index == 1
    assert spec.disks.delete is True and spec.disks.allowed_dirs == ("/srv/images",)
    with pytest.raises(SpecError, match="^disks.data.format: "):
        build_spec({**base, "disks": {"data": {"size": "2G", "format": "iso"}}})
    with pytest.raises(SpecError, match="^disk_allowed_dirs: "):
        build_spec({**base, "disk_allowed_dirs": ["relative"]})


def test_within_is_by_path_component():
    assert disks.within("/srv/images/a.raw", ["/srv/images"])
    assert not disks.within("/srv/images2/a.raw", ["/srv/images"])
    assert disks.within("/dev/sdb", ["/dev/"])


def test_disk_element_carries_alias_serial_and_flags():
    spec = disks.parse_disk("data", {"path": "/dev/sdb", "format": "raw", "shareable": True})
    disk = disks.disk_element(spec, "vdb", disks.Source("/dev/sdb", "raw", block=True))
    expected = parse(
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        "<source dev='/dev/sdb'/><target dev='vdb' bus='virtio'/><serial>data</serial>"
        "<shareable/><alias name='ua-data'/></disk>"
    )
    assert tostring(disk.node) == tostring(expected)
    assert disk.name == "data" and disk.shareable and not disk.readonly
    disk.readonly, disk.shareable = True, False
    assert disk.node.find("readonly") is not None and disk.node.find("shareable") is None


def test_long_names_get_no_serial_and_unnamed_disks_are_their_target():
    spec = disks.parse_disk("a" * 21, {"size": "1G"})
    disk = disks.disk_element(spec, "vdc", disks.Source("/p/x.qcow2", "qcow2"))
    assert disk.serial is None and disk.name == "a" * 21
    assert Disk(parse("<disk><target dev='vda'/></disk>")).name == "vda"


def test_created_disk_records_round_trip_through_the_metadata():
    records = {"/p/vm1-data.qcow2": {"name": "data", "delete_with_domain": True}}
    dom = Domain("<domain><name>vm1</name><metadata/></domain>")
    dom.node.find("metadata").append(disks_metadata_element(records))
    assert Domain(dom.to_xml()).created_disks() == records
    assert Domain("<domain/>").created_disks() == {}


def test_differences_a_state_reports_and_the_growth_it_applies():
    current = {
        "source": "/p/vm1-data.qcow2",
        "format": "qcow2",
        "bus": "virtio",
        "cache": None,
        "index": 1,
        "readonly": False,
        "shareable": False,
        "size": 2 * GIB,
    }
    assert disks.differences(current, disks.parse_disk("data", {"size": "2G"})) == ([], None)
    assert disks.differences(current, disks.parse_disk("data", {"size": "3G"})) == ([], 3 * GIB)
    fixed, _ = disks.differences(current, disks.parse_disk("data", {"size": "1G", "bus": "sata"}))
    assert len(fixed) == 2 and "bus" in fixed[0] and "only grow" in fixed[1]


def test_the_example_profile_is_valid():
    import pathlib

    import yaml

    examples = pathlib.Path(__file__).parents[3] / "profiles.example"
    (profile,) = yaml.safe_load(
        (examples / "cloud.profiles.d/data-disks.conf").read_text()
    ).values()
    # disk_allowed_dirs is the provider's (a profile that sets it is refused)
    providers = yaml.safe_load((examples / "cloud.providers.d/kvm.conf").read_text())
    provider = providers[profile["provider"]]
    spec = build_spec(
        {"name": "db1", "disk_allowed_dirs": provider["disk_allowed_dirs"], **profile}
    )
    assert [d.name for d in spec.disks.disks] == ["data", "archive"]
    assert spec.disks.allowed_dirs == ("/srv/images",) and spec.disks.delete is False
