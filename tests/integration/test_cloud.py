"""salt-cloud with salt-kvm's libvirt driver against real libvirtd, booted guests
and a real salt-master: profiles become minions that answer test.ping."""

import json

import libvirt
import pytest

from . import saltenv
from .conftest import GUEST_PASSWORD, GUEST_USER, unique


@pytest.fixture(scope="module")
def salt(tmp_path_factory, hv):
    env = saltenv.start_master(tmp_path_factory.mktemp("salt"))
    env.write_providers(saltenv.provider())
    yield env
    saltenv.stop_master(env)


def sized_profile(base_domain, **extra):
    profile = {
        "provider": "test-kvm",
        "base_domain": base_domain,
        "clone_strategy": "quick",
        "ip_source": "ip-learning",
        "ssh_username": GUEST_USER,
        "password": GUEST_PASSWORD,
        "script": "salt-preinstalled",
        "minion": saltenv.minion_settings(),
        "grains": {"role": "salt-kvm-test"},
    }
    profile.update(extra)
    return profile


def created(proc, name):
    """salt-cloud -p prints {name: result}; -m/-P nest it under provider and driver."""
    out = json.loads(proc.stdout)
    if name in out:
        return out[name]
    (provider_out,) = out.values()
    return provider_out["libvirt"][name]


def assert_gone(hv, salt, name, volumes_before, pool_volumes):
    with pytest.raises(libvirt.libvirtError):
        hv.lookupByName(name)
    assert pool_volumes() == volumes_before
    assert name not in salt.accepted_keys()


def test_profile_makes_a_sized_minion_that_pings(hv, salt, base_domain, pool_volumes):
    name = unique("sized")
    before = pool_volumes()
    salt.write_profiles(
        {"sized": sized_profile(base_domain, cpus=2, memory="768MB", disk_size="4G")}, "sized.conf"
    )
    proc = salt.cloud("-p", "sized", name)
    try:
        info = created(proc, name)
        assert info["vcpus"] == 2 and info["memory_mib"] == 768
        assert salt.salt(name, "test.ping") == {name: True}
        grains = salt.salt(name, "grains.item", "num_cpus", "role", "host")[name]
        assert grains["num_cpus"] == 2 and grains["role"] == "salt-kvm-test"
        assert grains["host"] == name
        mem_kib = int(salt.salt(name, "cmd.run", "awk '/MemTotal/ {print $2}' /proc/meminfo")[name])
        assert 600 * 1024 < mem_kib <= 768 * 1024
        disk = int(salt.salt(name, "cmd.run", "lsblk -bdno SIZE /dev/vda")[name])
        assert disk == 4 * 1024**3
    finally:
        salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, pool_volumes)


def cloud_error(proc, name):
    """salt-cloud reports a failed create in its output (and log), not always in its exit code."""
    text = proc.stdout + proc.stderr
    try:
        out = json.loads(proc.stdout)
        text += json.dumps(out)
    except json.JSONDecodeError:
        pass
    return text


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"wait_for_ip_timeout": 3}, "got no IP address from ip-learning within 3s"),
        ({"nics": ["skt-no-such-network"]}, "skt-no-such-network"),
    ],
    ids=["ip-timeout", "libvirt-start-error"],
)
def test_failures_leave_nothing_behind(hv, salt, base_domain, pool_volumes, extra, message):
    name = unique("fault")
    before = pool_volumes()
    salt.write_profiles({"fault": sized_profile(base_domain, **extra)}, "fault.conf")
    proc = salt.cloud("-p", "fault", name, check=False)
    assert message in cloud_error(proc, name)
    assert "Everything this run created was removed" in cloud_error(proc, name)
    assert_gone(hv, salt, name, before, pool_volumes)


def test_wrong_ssh_password_leaves_nothing_behind(hv, salt, base_domain, pool_volumes):
    name = unique("badpw")
    before = pool_volumes()
    salt.write_profiles({"badpw": sized_profile(base_domain, password="wrong")}, "badpw.conf")
    proc = salt.cloud("-p", "badpw", name, check=False)
    assert "SSH login as 'root'" in cloud_error(proc, name)
    assert_gone(hv, salt, name, before, pool_volumes)


def test_bad_profile_value_names_the_key_and_creates_nothing(hv, salt, base_domain, pool_volumes):
    name = unique("badkey")
    before = pool_volumes()
    salt.write_profiles({"badkey": sized_profile(base_domain, clone_strategy="linked")}, "bk.conf")
    proc = salt.cloud("-p", "badkey", name, check=False)
    text = cloud_error(proc, name)
    assert "clone_strategy" in text and "quick, full" in text
    assert_gone(hv, salt, name, before, pool_volumes)
