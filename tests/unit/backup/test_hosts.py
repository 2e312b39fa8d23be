"""The minions' ``kvm:hosts`` (the other hypervisors by name): entries
checked with errors naming the key, unknown names refused listing the
configured ones, the copy target and the replica folder of an entry."""

import pytest

from salt_kvm.backup import hosts
from salt_kvm.errors import SpecError

CONFIG = {
    "kvm1": "qemu+ssh://root@kvm1/system",
    "kvm2": {
        "uri": "qemu+ssh://root@kvm2/system",
        "backup": "ssh://root@kvm2:2222/srv/replica",
        "host_key": "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s",
        "password_pillar": "kvm:backup:ssh_password",
    },
    "nas-host": {"backup": "/mnt/nas/replica", "key_filename": "/root/.ssh/id_ed25519"},
}


def test_entries_give_the_uri_the_copy_target_and_the_replica_folder():
    parsed = hosts.parse_hosts(CONFIG)
    assert parsed["kvm1"].uri == "qemu+ssh://root@kvm1/system" and parsed["kvm1"].backup is None
    assert parsed["kvm2"].copy_args() == {
        "target": "ssh://root@kvm2:2222/srv/replica",
        "host_key": "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s",
        "password_pillar": "kvm:backup:ssh_password",
    }
    assert parsed["kvm2"].replica_folder() == "/srv/replica"
    assert parsed["nas-host"].replica_folder() == "/mnt/nas/replica"
    assert parsed["nas-host"].copy_args()["key_filename"] == "/root/.ssh/id_ed25519"
    assert hosts.parse_hosts(None) == {}


def test_an_unknown_name_is_refused_listing_the_configured_ones():
    parsed = hosts.parse_hosts(CONFIG)
    with pytest.raises(
        SpecError,
        match=r"^host: 'kvm9' is not a host of kvm:hosts \(accepted: kvm1, kvm2, nas-host\)$",
    ):
        hosts.lookup(parsed, "kvm9")
    with pytest.raises(SpecError, match=r"accepted: none: kvm:hosts is not set on this minion"):
        hosts.lookup({}, "kvm2")


def test_a_host_without_a_replica_folder_is_no_copy_target():
    with pytest.raises(SpecError, match=r"^kvm:hosts:kvm1:backup: host kvm1 has no replica folder"):
        hosts.parse_hosts(CONFIG)["kvm1"].copy_args()


def test_this_host_is_kvm_host_else_the_minion_id():
    parsed = hosts.parse_hosts(CONFIG)
    assert hosts.this_host(parsed, "kvm2", "whatever").name == "kvm2"
    assert hosts.this_host(parsed, None, "kvm1").name == "kvm1"
    with pytest.raises(SpecError, match=r"^kvm:host: this minion \(hv7\) is none of kvm:hosts"):
        hosts.this_host(parsed, None, "hv7")
    with pytest.raises(SpecError, match=r"^kvm:host: 'kvm9' is not a host of kvm:hosts"):
        hosts.this_host(parsed, "kvm9", "kvm1")


@pytest.mark.parametrize(
    ("config", "error"),
    [
        (["kvm1"], r"^kvm:hosts: .* is not a mapping"),
        ({"../x": "qemu:///system"}, r"^kvm:hosts: '\.\./x' is not a usable host name"),
        ({"kvm1": 42}, r"^kvm:hosts:kvm1: 42 is not a host entry"),
        (
            {"kvm1": {"url": "qemu:///system"}},
            r"^kvm:hosts:kvm1: unknown key\(s\) url \(accepted: uri, backup",
        ),
        ({"kvm1": {"uri": "qemu:// x"}}, r"^kvm:hosts:kvm1:uri: .* is not a libvirt URI"),
        (
            {"kvm1": {"backup": "srv/replica"}},
            r"^kvm:hosts:kvm1:backup: 'srv/replica' is not a replica folder",
        ),
        (
            {"kvm1": {"backup": "ssh://kvm1/../etc"}},
            r"^kvm:hosts:kvm1:backup: .* is not a replica folder",
        ),
        (
            {"kvm1": {"backup": "ftp://kvm1/srv"}},
            r"^kvm:hosts:kvm1:backup: .* is not a replica folder",
        ),
        ({"kvm1": {"key_filename": 7}}, r"^kvm:hosts:kvm1:key_filename: 7 is not a string"),
    ],
)
def test_bad_entries_are_refused_naming_the_key(config, error):
    with pytest.raises(SpecError, match=error):
        hosts.parse_hosts(config)


def test_a_password_is_never_taken_and_never_shown():
    with pytest.raises(SpecError) as err:
        hosts.parse_hosts({"kvm1": {"password": "hunter2-secret"}})
    assert "password_pillar" in str(err.value) and "hunter2-secret" not in str(err.value)
    with pytest.raises(SpecError) as err:
        hosts.parse_hosts({"kvm1": {"backup": "ssh://root:hunter2-secret@kvm1/srv"}})
    assert "hunter2-secret" not in str(err.value)
