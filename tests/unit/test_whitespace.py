"""Host names, addresses, URIs and key fingerprints with a trailing newline
or a space (``$(cat file)`` in pillar or a profile): refused by the name of
their field before anything connects, not accepted and broken later
(issue #13's class; the patterns anchored with ``$`` let a final newline through)."""

import pytest

from salt_kvm import saltutil, ssh
from salt_kvm.backup import hosts as backup_hosts
from salt_kvm.backup import ops as backup_ops
from salt_kvm.cloud import locations
from salt_kvm.errors import SpecError
from salt_kvm.virt import migrate

PIN = "SHA256:" + "uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"


def key_of(call) -> str:
    with pytest.raises(SpecError) as err:
        call()
    return err.value.key


@pytest.mark.parametrize("suffix", ["\n", " ", "\r\n", "\t"])
def test_a_host_key_pin_with_a_suffix_is_refused(suffix):
    assert ssh.HostTrust.build(host_key=PIN).pins == (PIN,)
    assert key_of(lambda: ssh.HostTrust.build(host_key=PIN + suffix)) == "host_key"


@pytest.mark.parametrize("address", ["hv2\n", "hv2.example.com\n", "hv2 ", "10.0.0.2\n"])
def test_a_migration_address_with_a_suffix_is_refused(address):
    assert key_of(lambda: migrate.parse_request({"address": address})) == "address"


@pytest.mark.parametrize(
    "target",
    [
        "/mnt/nas\n",
        "/mnt/nas ",
        "ssh://root@kvm2/srv/replica\n",
        "ssh://root@kvm2 /srv/replica",
        "ssh://root@kvm2\n/srv/replica",
        "ssh://root@kv\tm2/srv/replica",
    ],
)
def test_a_copy_target_with_whitespace_is_refused(target):
    assert key_of(lambda: backup_ops.parse_target(target)) == "target"


def test_host_names_with_a_trailing_newline_are_not_host_names():
    assert backup_hosts.is_host_name("kvm2")
    assert not backup_hosts.is_host_name("kvm2\n")
    assert key_of(lambda: locations.parse_hosts({"hv1\n": "qemu:///system"})) == "hosts"


@pytest.mark.parametrize("uri", ["qemu:///system\n", " qemu:///system", "qemu:///sys tem", 5])
def test_a_libvirt_uri_with_whitespace_is_refused_by_its_key(uri):
    assert key_of(lambda: saltutil.hypervisor_uri({}, {}, uri)) == "uri"
    pillar = {"kvm": {"connection": {"uri": uri}}}
    assert key_of(lambda: saltutil.hypervisor_uri({}, pillar)) == "kvm:connection:uri"
    assert (
        key_of(
            lambda: saltutil.connection_args({"providers": {}}, {"driver": "libvirt", "url": uri})
        )
        == "url"
    )


@pytest.mark.parametrize("pad", [" {}", "{} ", "{}\n", "\t{}"])
@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"base_domain": "{}"}, "base_domain"),
        ({"base_domain": "base", "nics": [{"network": "{}"}]}, "nics[0].network"),
        ({"base_domain": "base", "nics": ["{}"]}, "nics[0].network"),
        (
            {"base_domain": "base", "ip_source": "arp", "nics": [{"bridge": "{}"}]},
            "nics[0].bridge",
        ),
        ({"image": "https://example.com/x.qcow2", "image_pool": "{}"}, "image_pool"),
        ({"base_domain": "base", "disks": {"data": {"size": 1, "pool": "{}"}}}, "disks.data.pool"),
    ],
)
def test_a_libvirt_object_name_padded_with_whitespace_is_refused_by_its_key(pad, values, key):
    """A name libvirt looks up (a domain, network, bridge, pool): one padded in
    the profile was accepted, then failed at lookup ("no network named
    ' default'") or, for a pool, after the guest was defined."""
    from salt_kvm.cloud.spec import build_spec

    def fill(value):
        if isinstance(value, str):
            return value.replace("{}", pad.format("name0")) if "{}" in value else value
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    base = {"name": "vm1", "deploy": False}
    with pytest.raises(SpecError) as err:
        build_spec({**base, **fill(values)})
    assert err.value.key == key
    assert any(w in str(err.value) for w in ("space", "control character"))
