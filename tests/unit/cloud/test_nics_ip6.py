"""nics[].ip6: a static IPv6 reservation on a dual-stack libvirt network,
validated by the spec; the seed tells the guest's DHCPv6 client to ask with
the DUID-LL the reservation is keyed by."""

import pytest
import yaml

from salt_kvm.cloud import cloudinit
from salt_kvm.cloud import deploy as cloud_deploy
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import SpecError
from tests.unit.cloud.test_seed import read_iso

MINIMAL = {"name": "vm1", "base_domain": "base", "password": "pw", "deploy": False}
MAC = "52:54:00:10:01:11"


def spec(*nics, **values):
    return build_spec({**MINIMAL, "nics": list(nics), **values})


def test_an_ip6_beside_the_ip_on_a_network():
    (nic,) = spec({"network": "dual", "mac": MAC, "ip6": "FD00:160::0050"}).nics
    assert nic.ip6 == "fd00:160::50" and nic.ip is None and not nic.static


@pytest.mark.parametrize(
    "nic,key,accepted",
    [
        ({"network": "dual", "ip6": "fd00:160::50"}, "nics[0].ip6", "mac and ip6"),
        ({"network": "dual", "mac": MAC, "ip6": "192.168.1.5"}, "nics[0].ip6", "IPv6"),
        ({"network": "dual", "mac": MAC, "ip6": "fe80::5"}, "nics[0].ip6", "IPv6"),
        ({"network": "dual", "mac": MAC, "ip6": "ff02::5"}, "nics[0].ip6", "IPv6"),
        ({"network": "dual", "mac": MAC, "ip6": "fd00::5/64"}, "nics[0].ip6", "IPv6"),
        ({"bridge": "br0", "mac": MAC, "ip6": "fd00::5"}, "nics[0].ip6", "libvirt network"),
    ],
)
def test_refusals_name_the_key(nic, key, accepted):
    with pytest.raises(SpecError) as err:
        spec(nic)
    assert err.value.key == key and accepted in str(err.value)


def test_one_ip6_twice_is_refused():
    mac2 = "52:54:00:10:01:12"
    with pytest.raises(SpecError) as err:
        spec(
            {"network": "dual", "mac": MAC, "ip6": "fd00::5"},
            {"network": "dual", "mac": mac2, "ip6": "fd00::5"},
        )
    assert err.value.key == "nics[1].ip6"


def test_the_seed_makes_networkd_ask_with_the_duid_ll():
    s = spec({"network": "dual", "mac": MAC, "ip6": "fd00:160::50"})
    _, files = read_iso(cloud_deploy.seed_iso(s, None, None))
    data = yaml.safe_load(files["user-data"])
    (command,) = data["bootcmd"]
    assert "DUIDType=link-layer" in command[-1] and "systemd-networkd" in command[-1]
    assert command[:2] == ["sh", "-c"]
    assert cloudinit.duid_config([]) == {}  # no ip6: no seed for it
    assert cloud_deploy.seed_iso(spec("default"), None, None) is None
