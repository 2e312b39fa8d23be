"""What the salt-cloud tests share: a profile of the test base, and how a
create's output and a destroy's aftermath are read."""

import json

import libvirt
import pytest

from .conftest import GUEST_PASSWORD, GUEST_USER


def sized_profile(base_domain, env, **extra):
    profile = {
        "provider": "test-kvm",
        "base_domain": base_domain,
        "clone_strategy": "quick",
        "ip_source": "ip-learning",
        "ssh_username": GUEST_USER,
        "password": GUEST_PASSWORD,
        "script": "salt-preinstalled",
        "minion": env.minion_settings(),
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


def cloud_error(proc, name):
    """salt-cloud reports a failed create in its output (and log), not always in its exit code."""
    text = proc.stdout + proc.stderr
    try:
        out = json.loads(proc.stdout)
        text += json.dumps(out)
    except json.JSONDecodeError:
        pass
    return text
