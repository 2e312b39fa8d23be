"""Hostile and careless inputs (issue #13, item 13): every one is refused by
name before anything is created, or read the one documented way."""

import pytest

from salt_kvm.backup import snapshots
from salt_kvm.backup import store as backup_store
from salt_kvm.cloud import cloudinit
from salt_kvm.cloud.spec import build_spec
from salt_kvm.disks import spec as disks
from salt_kvm.errors import SpecError
from salt_kvm.images import cache as images
from salt_kvm.virt import checks, names, units

MINIMAL = {"name": "vm1", "base_domain": "base", "password": "pw"}
MAC, MAC2 = "52:54:00:12:34:56", "52:54:00:12:34:57"


def refused(values: dict, key: str) -> SpecError:
    with pytest.raises(SpecError) as err:
        build_spec({**MINIMAL, **values})
    assert err.value.key == key, str(err.value)
    assert err.value.accepted, str(err.value)
    return err.value


# ---- numbers: inf and nan never pass (they raised OverflowError/ValueError) --

NOT_FINITE = [float("inf"), float("-inf"), float("nan"), "inf", "nan", "1e999", "9" * 400]


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize(
    "key",
    [
        "cpus",
        "memory",
        "disk_size",
        "disk",
        "cpuunits",
        "ssh_port",
        "wait_for_ip_timeout",
        "wait_for_ip_interval",
    ],
)
def test_numbers_refuse_inf_and_nan_by_name(key, value):
    refused({key: value}, key)


@pytest.mark.parametrize("value", NOT_FINITE)
def test_shared_number_parsers_refuse_inf_and_nan(value):
    with pytest.raises(SpecError, match="size"):
        units.parse_size(value, "size", units.MIB)
    with pytest.raises(SpecError, match="keep"):
        units.parse_duration(value, "keep")
    with pytest.raises(SpecError, match="n"):
        checks.whole_number(value, "n", 0)
    with pytest.raises(SpecError, match="t"):
        checks.seconds(value, "t", 0)


def test_cpu_options_and_numa_memory_refuse_inf():
    refused({"cpu_options": {"cores": float("inf")}}, "cpu_options.cores")
    refused({"cpus": 2, "numa": [{"cpus": "0-1", "mem": float("inf")}]}, "numa.mem")


# ---- names match the whole string ---------------------------------------------


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\x00", " "])
def test_names_with_a_trailing_newline_are_refused(suffix):
    refused({"name": "vm1" + suffix}, "name")
    with pytest.raises(SpecError):
        names.check_vm_name("vm1" + suffix)
    with pytest.raises(SpecError):
        snapshots.check_name("before" + suffix)
    with pytest.raises(SpecError):
        backup_store.check_point_ref("20260101T000000Z" + suffix)


@pytest.mark.parametrize(
    "pattern,good",
    [
        (names._NAME_RE, "vm1"),
        (snapshots.NAME_RE, "before-upgrade"),
        (disks._NAME_RE, "data"),
        (disks._TARGET_RE, "vdb"),
        (backup_store.POINT_RE, "20260101T000000Z"),
        (images._NAME_RE, "image-sha256-" + "0" * 32 + ".qcow2"),
        (cloudinit._MODE_RE, "0644"),
    ],
)
def test_every_name_pattern_refuses_a_trailing_newline(pattern, good):
    assert pattern.fullmatch(good)
    assert not pattern.fullmatch(good + "\n")


def test_profile_fields_refuse_a_trailing_newline():
    refused({"keymap": "en-us\n"}, "keymap")
    refused({"nics": [{"network": "default", "mac": MAC + "\n"}]}, "nics[0].mac")
    refused({"cpus": 2, "numa": [{"cpus": "0-1\n"}]}, "numa")


def test_sizes_and_durations_refuse_trailing_garbage_and_unicode_digits():
    for value in ("2G\nrm", "\u0663G", "2G\x00"):
        with pytest.raises(SpecError):
            units.parse_size(value, "disk_size", units.GIB)
    with pytest.raises(SpecError):
        units.parse_duration("7d\nx", "keep")


# ---- control characters in free text that goes into XML -------------------------


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x07", "\x7f", "\x85", "\ufffe", "\ud800"])
def test_control_characters_in_description_are_refused(char):
    refused({"description": f"web {char}server"}, "description")
    refused({"desc": f"web {char}server"}, "desc")


def test_a_multi_line_description_is_kept():
    assert build_spec({**MINIMAL, "description": "web\n\tserver\n"}).description == (
        "web\n\tserver\n"
    )


@pytest.mark.parametrize(
    "values,key",
    [
        ({"base_domain": "base\n"}, "base_domain"),
        ({"nics": [{"network": "default\x00"}]}, "nics[0].network"),
        ({"nics": [{"bridge": "br0\n"}]}, "nics[0].bridge"),
        ({"ssh_username": "root\nx"}, "ssh_username"),
    ],
)
def test_control_characters_in_other_free_text_are_refused(values, key):
    refused(values, key)


# ---- cloud_init.files modes -----------------------------------------------------


def mode_of(value):
    spec = cloudinit.parse({"files": {"/etc/x": {"content": "x", "mode": value}}})
    return spec.files[0].mode


@pytest.mark.parametrize(
    "value,mode",
    [
        (755, "0755"),  # unquoted 755, and unquoted 0755 (Salt's YAML reads it as 755)
        (644, "0644"),
        (600, "0600"),
        (0, "0000"),
        ("755", "0755"),
        ("0755", "0755"),
        ("0o640", "0640"),
        ("0777", "0777"),  # asked for in so many words
        ("4755", "4755"),
    ],
)
def test_file_modes_read_as_salt_reads_them(value, mode):
    assert mode_of(value) == mode


@pytest.mark.parametrize(
    "value",
    [
        493,  # what a YAML 1.1 loader makes of 0755: never reinterpreted
        0o755,
        1755,  # an int cannot carry setuid/setgid/sticky
        4755,
        777,  # world-writable from an unquoted number
        666,
        "777",  # world-writable: only as a quoted four-digit string
        "1755",  # (allowed, explicit) -- see below
        -1,
        "0999",
        "rw",
        True,
    ],
)
def test_surprising_file_modes_are_refused(value):
    if value == "1755":
        assert mode_of(value) == "1755"
        return
    with pytest.raises(SpecError) as err:
        mode_of(value)
    assert err.value.key == "cloud_init.files[/etc/x].mode"
    assert "quoted" in err.value.accepted


# ---- two fixed-IP NICs on one network ----------------------------------------------


def test_two_fixed_ip_nics_on_one_network_are_accepted():
    spec = build_spec(
        {
            **MINIMAL,
            "nics": [
                {"network": "default", "mac": MAC, "ip": "192.168.122.50"},
                {"network": "default", "mac": MAC2, "ip": "192.168.122.51"},
            ],
        }
    )
    assert [(n.mac, n.ip) for n in spec.nics] == [(MAC, "192.168.122.50"), (MAC2, "192.168.122.51")]


def test_one_ip_on_two_nics_of_one_network_is_refused():
    refused(
        {
            "nics": [
                {"network": "default", "mac": MAC, "ip": "192.168.122.50"},
                {"network": "default", "mac": MAC2, "ip": "192.168.122.50"},
            ]
        },
        "nics[1].ip",
    )


# ---- keys that are not strings (YAML `1: x`, `true: y`, `null:`) ------------------


@pytest.mark.parametrize("odd", [1, True, None, 2.5])
@pytest.mark.parametrize(
    "values,key",
    [
        ({"nat_rules": [{"guest": 22, "ODD": "x"}]}, "nat_rules[0]"),
        ({"nics": [{"network": "default", "ODD": "x"}]}, "nics[0]"),
        ({"disks": {"data": {"size": 1, "ODD": "x"}}}, "disks.data"),
        ({"cpu_options": {"cores": 1, "ODD": "x"}}, "cpu_options"),
        ({"cloud_init": {"user_data": "x", "ODD": "x"}}, "cloud_init"),
        ({"shares": [{"source": "/srv", "ODD": "x"}]}, "shares[0]"),
        (
            {
                "hostdevs": [{"pci": "8086:10fb", "ODD": 1}],
                "hostdev_allowed": [{"pci": "8086:10fb"}],
            },
            "hostdevs[0]",
        ),
    ],
)
def test_a_key_that_is_not_a_string_is_refused_by_name(values, key, odd):
    def swap(value):
        if isinstance(value, dict):
            return {(odd if k == "ODD" else k): swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    for extra in ({}, {"zz": 1}):  # alone, and beside a string key (sorting both)
        given = swap(values)
        inner = given[key.split("[")[0].split(".")[0]]
        target = inner[0] if isinstance(inner, list) else inner
        if key.startswith("disks."):
            target = target["data"]
        target.update(extra)
        err = refused(given, key)
        assert repr(odd) in err.problem or str(odd) in err.problem


@pytest.mark.parametrize("odd", [1, True, None])
def test_a_profile_key_that_is_not_a_string_is_refused_by_name(odd):
    from salt_kvm.cloud.spec import check_written_keys

    for profile, provider in (({odd: "x"}, {}), ({}, {odd: "x"}), ({odd: "x", "memroy": 1}, {})):
        with pytest.raises(SpecError) as err:
            check_written_keys(profile, provider)
        assert err.value.key == str(odd), str(err.value)
        assert "not a string" in err.value.problem


# ---- salt-cloud's deploy settings ---------------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        ("sudo", "maybe"),
        ("force_minion_config", "perhaps"),
        ("keysize", "big"),
        ("keysize", -1),
        ("keysize", 1024),
        ("keysize", 4096.5),
        ("script", ["bootstrap-salt"]),
        ("script", "bootstrap-salt\n"),
        ("script_args", {"-P": True}),
        ("script_args", "-P\nrm -rf /"),
        ("deploy_command", ["sh", "x"]),
        ("deploy_command", "sh /tmp/x\nreboot"),
        ("sudo_password", ["pw"]),
        ("tmp_dir", ["/tmp/x"]),
        ("tmp_dir", "relative/dir"),
        ("tmp_dir", "/tmp/x\n"),
        ("tmp_dir", "/tmp/my dir"),
        ("ssh_username", " root"),
        ("ssh_username", "ro ot"),
        ("ssh_username", "root "),
    ],
)
def test_bad_deploy_settings_are_refused_by_name(key, value):
    refused({key: value}, key)


@pytest.mark.parametrize("value,expected", [("false", False), ("no", False), ("yes", True)])
def test_deploy_yes_no_settings_read_strings(value, expected):
    for key in ("sudo", "force_minion_config"):
        deploy = build_spec({**MINIMAL, key: value}).deploy
        assert getattr(deploy, key) is expected, key


def test_deploy_settings_keep_their_good_values():
    deploy = build_spec(
        {
            **MINIMAL,
            "keysize": 4096,
            "script": "bootstrap-salt",
            "script_args": "-P stable 3008",
            "tmp_dir": "/var/tmp/.saltcloud",
            "ssh_username": "debian",
        }
    ).deploy
    assert (deploy.keysize, deploy.script_args, deploy.tmp_dir) == (
        4096,
        "-P stable 3008",
        "/var/tmp/.saltcloud",
    )
    assert deploy.sudo is True  # not root: salt-cloud's default


@pytest.mark.parametrize("tmp_dir", ["/etc", "/root", "/tmp", "/usr/bin", "/home"])
def test_a_tmp_dir_the_deploy_command_names_must_be_below_tmp(tmp_dir):
    # The deploy empties and removes its working directory (rm -rf) in the
    # guest; a deploy_command naming tmp_dir itself makes it exactly tmp_dir.
    refused({"tmp_dir": tmp_dir, "deploy_command": f"sh {tmp_dir}/deploy.sh"}, "tmp_dir")
    # without the command naming it, the files go to a new <tmp_dir>-<uuid>
    assert build_spec({**MINIMAL, "tmp_dir": tmp_dir}).deploy.tmp_dir == tmp_dir


def test_a_tmp_dir_below_tmp_works_with_a_command_naming_it():
    values = {"tmp_dir": "/tmp/.saltcloud", "deploy_command": "sh /tmp/.saltcloud/deploy.sh"}
    assert build_spec({**MINIMAL, **values}).deploy.tmp_dir == "/tmp/.saltcloud"
