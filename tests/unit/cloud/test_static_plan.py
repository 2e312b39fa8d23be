"""nics[].ip on a bridge: the static plan, its refusals and its network config."""

import pytest
import yaml

from salt_kvm.cloud import cloudinit
from salt_kvm.cloud import deploy as cloud_deploy
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import SpecError
from tests.unit.cloud.test_deploy import plan
from tests.unit.cloud.test_seed import read_iso

MINIMAL = {"name": "vm1", "base_domain": "base", "password": "pw"}
MAC = "52:54:00:10:01:11"
MAC2 = "52:54:00:10:02:11"


def bridge(**extra):
    return {"bridge": "br0", "mac": MAC, "ip": "192.168.1.11", "prefix": 24, **extra}


def spec(*nics, **values):
    return build_spec({**MINIMAL, "nics": list(nics), **values})


def refused(key, *nics, **values):
    with pytest.raises(SpecError) as err:
        spec(*nics, **values)
    assert err.value.key == key, str(err.value)
    assert err.value.accepted and str(err.value).startswith(f"{key}: ")
    return err.value


# ---- accepted forms -----------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{"prefix": 24}, {"prefix": "24"}, {"prefix": None, "netmask": "255.255.255.0"}],
)
def test_prefix_or_netmask(extra):
    (nic,) = spec(bridge(**extra)).nics
    assert nic.static and nic.prefix == 24


def test_ip_with_its_prefix_in_one_value():
    (nic,) = spec({"bridge": "br0", "mac": MAC, "ip": "192.168.1.11/24"}).nics
    assert (nic.ip, nic.prefix) == ("192.168.1.11", 24)


def test_a_static_ip_on_a_bridge_makes_the_plan_the_address_source():
    s = spec(bridge(gateway="192.168.1.1", dns=["192.168.1.1", "192.168.1.2"]))
    assert s.ip_source == "plan"
    assert s.nics[0].gateway == "192.168.1.1" and s.nics[0].dns == ["192.168.1.1", "192.168.1.2"]
    assert spec(bridge(dns="192.168.1.1")).nics[0].dns == ["192.168.1.1"]
    assert spec(bridge(), ip_source="plan").ip_source == "plan"


def test_a_reservation_on_a_network_keeps_the_lease_source():
    s = spec({"network": "default", "mac": MAC, "ip": "192.168.122.50"})
    assert s.ip_source == "ip-learning" and not s.nics[0].static


# ---- refusals ---------------------------------------------------------------


def test_an_address_on_a_bridge_without_a_prefix():
    err = refused("nics[0].ip", bridge(prefix=None))
    assert "prefix" in err.problem and "netmask" in err.accepted


@pytest.mark.parametrize(
    "nic,key",
    [
        (bridge(prefix=33), "nics[0].prefix"),
        (bridge(prefix="x"), "nics[0].prefix"),
        (bridge(prefix=True), "nics[0].prefix"),
        (bridge(prefix=31), "nics[0].prefix"),
        (bridge(prefix=0), "nics[0].prefix"),
        ({"bridge": "br0", "mac": MAC, "ip": "192.168.1.11/4"}, "nics[0].ip"),
        (bridge(prefix=None, netmask="255.255.255.254"), "nics[0].netmask"),
        (bridge(prefix=None, netmask="255.0.255.0"), "nics[0].netmask"),
        (bridge(netmask="255.255.255.0"), "nics[0].netmask"),  # with prefix: twice
        ({"bridge": "br0", "mac": MAC, "ip": "192.168.1.11/24", "prefix": 24}, "nics[0].prefix"),
        ({"bridge": "br0", "mac": MAC, "ip": "192.168.1.11/x"}, "nics[0].ip"),
        (bridge(ip="192.168.1.0"), "nics[0].ip"),
        (bridge(ip="192.168.1.255"), "nics[0].ip"),
        (bridge(mac=None), "nics[0].ip"),
        (bridge(gateway="10.0.0.1"), "nics[0].gateway"),
        (bridge(gateway="192.168.1.11"), "nics[0].gateway"),
        (bridge(gateway="nope"), "nics[0].gateway"),
        (bridge(dns=["192.168.1.1", "x"]), "nics[0].dns"),
        (bridge(dns={"a": 1}), "nics[0].dns"),
    ],
)
def test_bad_plan_values_are_refused_by_name(nic, key):
    refused(key, nic)


def test_a_gateway_outside_the_subnet_says_which_subnet():
    err = refused("nics[0].gateway", bridge(gateway="192.168.2.1"))
    assert "outside 192.168.1.0/24" in err.problem


@pytest.mark.parametrize("key", ["prefix", "netmask", "gateway", "dns"])
def test_plan_keys_only_apply_to_an_ip_on_a_bridge(key):
    value = {"prefix": 24, "netmask": "255.255.255.0"}.get(key, "192.168.122.1")
    refused(f"nics[0].{key}", {"network": "default", "mac": MAC, "ip": "192.168.122.9", key: value})
    refused(f"nics[0].{key}", {"bridge": "br0", "mac": MAC, key: value})


def test_a_network_reservation_takes_no_prefix_form():
    refused("nics[0].ip", {"network": "default", "mac": MAC, "ip": "192.168.122.9/24"})


def test_two_nics_with_the_same_address():
    err = refused("nics[1].ip", bridge(), {"bridge": "br1", "mac": MAC2, "ip": "192.168.1.11/24"})
    assert "nics[0]" in err.problem


@pytest.mark.parametrize("source", ["ip-learning", "lease", "qemu-agent", "arp", "auto"])
def test_an_address_source_that_contradicts_the_plan(source):
    err = refused("ip_source", bridge(), ip_source=source)
    assert "nics[0]" in err.problem and err.accepted.startswith("plan")


def test_plan_without_a_static_address():
    refused("ip_source", {"bridge": "br0", "mac": MAC}, ip_source="plan")
    with pytest.raises(SpecError, match="^ip_source: plan needs"):
        build_spec({**MINIMAL, "ip_source": "plan"})


def test_every_nic_of_a_planned_vm_needs_a_mac():
    err = refused("nics[1].mac", bridge(), "default")
    assert "nics[0].ip" in err.problem


def test_a_static_ip_and_a_network_config_of_the_profile_exclude_each_other():
    err = refused("nics[0].ip", bridge(), cloud_init={"network_config": {"version": 2}})
    assert "cloud_init.network_config" in err.problem


# ---- the rendered network config --------------------------------------------


def test_network_config_matches_each_nic_by_mac():
    s = spec(
        bridge(gateway="192.168.1.1", dns=["192.168.1.1"]),
        {"network": "default", "mac": MAC2},
    )
    assert cloudinit.network_config(s.nics) == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": MAC},
                "set-name": "eth0",
                "addresses": ["192.168.1.11/24"],
                "routes": [{"to": "0.0.0.0/0", "via": "192.168.1.1"}],
                "nameservers": {"addresses": ["192.168.1.1"]},
            },
            "eth1": {"match": {"macaddress": MAC2}, "set-name": "eth1", "dhcp4": True},
        },
    }


def test_no_network_config_without_a_static_address():
    s = spec({"network": "default", "mac": MAC, "ip": "192.168.122.50"})
    assert cloudinit.network_config(s.nics) is None
    assert cloud_deploy.seed_iso(s, None, None) is None


def test_the_seed_carries_the_network_config_even_without_other_seed_data():
    s = spec(bridge(gateway="192.168.1.1"), deploy=False)
    _, files = read_iso(cloud_deploy.seed_iso(s, None, None))
    network = yaml.safe_load(files["network-config"])
    assert network["ethernets"]["eth0"]["addresses"] == ["192.168.1.11/24"]
    assert network["ethernets"]["eth0"]["routes"] == [{"to": "0.0.0.0/0", "via": "192.168.1.1"}]
    assert files["user-data"].startswith(b"#cloud-config")


def test_the_seed_of_a_cloud_init_deploy_has_both_the_minion_and_the_network():
    s = spec(bridge(), deploy_method="cloud-init")
    _, files = read_iso(cloud_deploy.seed_iso(s, plan(), None))
    assert yaml.safe_load(files["network-config"])["ethernets"]["eth0"]["match"] == {
        "macaddress": MAC
    }
    paths = [f["path"] for f in yaml.safe_load(files["user-data"])["write_files"]]
    assert "/etc/salt/pki/minion/minion.pem" in paths


# ---- bridges without a plan -----------------------------------------------------


@pytest.mark.parametrize("given", [{}, {"ip_source": "ip-learning"}, {"ip_source": "lease"}])
def test_only_bridges_without_a_plan_refuse_the_lease_source(given):
    # libvirt's leases exist only on its own networks: the create would wait
    # wait_for_ip_timeout (600 s) for an address that never comes.
    err = refused("ip_source", {"bridge": "br0"}, {"bridge": "br1", "mac": MAC2}, **given)
    assert "bridge" in err.problem
    for way_out in ("qemu-agent", "arp", "auto", "nics[].ip"):
        assert way_out in err.accepted


@pytest.mark.parametrize("source", ["qemu-agent", "agent", "arp", "auto"])
def test_only_bridges_with_a_source_that_can_answer(source):
    assert spec({"bridge": "br0"}, ip_source=source).ip_source in ("qemu-agent", "arp", "auto")


def test_a_bridge_beside_a_network_keeps_the_lease_source():
    assert spec({"bridge": "br0"}, "default").ip_source == "ip-learning"
