"""nics kinds: macvtap (type: direct), Open vSwitch ports with VLANs, mtu; their
refusals by name, and the interface XML each becomes."""

import pytest

from salt_kvm.cloud import sizing
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import SpecError
from salt_kvm.virt.domain import Domain, new_domain

MINIMAL = {"name": "vm1", "base_domain": "base", "password": "pw"}
MAC = "52:54:00:10:01:11"


def spec(*nics, **values):
    return build_spec({**MINIMAL, "nics": list(nics), **values})


def refused(key, *nics, **values):
    with pytest.raises(SpecError) as err:
        spec(*nics, **values)
    assert err.value.key == key, str(err.value)
    assert err.value.accepted and str(err.value).startswith(f"{key}: ")
    return err.value


def interfaces(*nics, **values):
    dom = new_domain("base", "qemu", 1024, 1, "/x.qcow2", networks=("default",))
    sizing.apply(dom, spec(*nics, **values))
    return Domain(dom.to_xml()).node.findall("devices/interface")


DIRECT = {"type": "direct", "source": "eth0"}
OVS = {"bridge": "br-ovs", "virtualport": "openvswitch"}


# ---- accepted forms and their XML ---------------------------------------------


def test_kinds_are_named_by_their_key_or_by_type():
    s = spec(
        "default",
        {"bridge": "br0"},
        {"type": "network", "network": "default"},
        {"type": "bridge", "bridge": "br0"},
        {**DIRECT, "mode": "vepa"},
        ip_source="qemu-agent",
    )
    assert [n.kind for n in s.nics] == ["network", "bridge", "network", "bridge", "direct"]
    assert (s.nics[4].source, s.nics[4].mode) == ("eth0", "vepa")


def test_macvtap_defaults_to_bridge_mode_and_becomes_a_direct_interface():
    (iface,) = interfaces({**DIRECT, "mac": MAC, "model": "e1000"}, ip_source="qemu-agent")
    assert iface.get("type") == "direct"
    assert dict(iface.find("source").attrib) == {"dev": "eth0", "mode": "bridge"}
    assert iface.find("mac").get("address") == MAC
    assert iface.find("model").get("type") == "e1000"
    assert iface.find("virtualport") is None and iface.find("mtu") is None


@pytest.mark.parametrize("mode", ["bridge", "vepa", "private", "passthrough"])
def test_every_macvtap_mode(mode):
    (iface,) = interfaces({**DIRECT, "mode": mode}, ip_source="qemu-agent")
    assert iface.find("source").get("mode") == mode


def test_an_ovs_port_with_one_vlan_tag_is_an_access_port():
    (iface,) = interfaces({**OVS, "vlan": 42, "mtu": 9000}, ip_source="arp")
    assert iface.get("type") == "bridge"
    assert iface.find("source").get("bridge") == "br-ovs"
    assert iface.find("virtualport").get("type") == "openvswitch"
    assert [t.get("id") for t in iface.findall("vlan/tag")] == ["42"]
    assert iface.find("vlan").get("trunk") is None
    assert iface.find("mtu").get("size") == "9000"


def test_several_vlan_tags_make_a_trunk_and_one_tag_can_be_one():
    (trunk,) = interfaces({**OVS, "vlan": [10, "20", 4094]}, ip_source="arp")
    assert trunk.find("vlan").get("trunk") == "yes"
    assert [t.get("id") for t in trunk.findall("vlan/tag")] == ["10", "20", "4094"]
    (single,) = interfaces({**OVS, "vlan": [7], "trunk": True}, ip_source="arp")
    assert single.find("vlan").get("trunk") == "yes"
    assert spec({**OVS, "vlan": [10, 20]}, ip_source="arp").nics[0].trunk


def test_an_ovs_port_without_vlan_and_mtu_bounds():
    ovs, _, _ = interfaces(OVS, {"network": "default", "mtu": 68}, {"bridge": "br0", "mtu": 65535})
    assert ovs.find("vlan") is None and ovs.find("virtualport").get("type") == "openvswitch"
    s = spec({"network": "default", "mtu": 68}, {"bridge": "br0", "mtu": "65535"})
    assert [n.mtu for n in s.nics] == [68, 65535]


# ---- refusals, by name --------------------------------------------------------


@pytest.mark.parametrize(
    "nic, key, words",
    [
        ({"type": "macvtap", "source": "eth0"}, "nics[0].type", "not a NIC type"),
        ({"type": "direct"}, "nics[0].source", "required"),
        ({**DIRECT, "mode": "bridged"}, "nics[0].mode", "not a macvtap mode"),
        ({**DIRECT, "network": "default"}, "nics[0]", "does not take network"),
        ({"type": "bridge", "network": "default"}, "nics[0]", "needs bridge"),
        ({**DIRECT, "mtu": 9000}, "nics[0].mtu", "libvirt refuses an MTU on macvtap"),
        ({**DIRECT, "vlan": 42}, "nics[0].vlan", "Open vSwitch ports only"),
        ({**DIRECT, "virtualport": "openvswitch"}, "nics[0].virtualport", "bridge NICs"),
        ({"bridge": "br0", "source": "eth0"}, "nics[0].source", "type: direct"),
        ({"bridge": "br0", "mode": "vepa"}, "nics[0].mode", "type: direct"),
        ({"bridge": "br0", "vlan": 42}, "nics[0].vlan", "needs virtualport: openvswitch"),
        ({"network": "default", "vlan": 42}, "nics[0].vlan", "needs virtualport"),
        ({**OVS, "virtualport": "802.1Qbh"}, "nics[0].virtualport", "not a virtual port"),
        (
            {"network": "default", "virtualport": "openvswitch"},
            "nics[0].virtualport",
            "applies to a bridge NIC",
        ),
        ({**OVS, "vlan": 0}, "nics[0].vlan", "1 to 4094"),
        ({**OVS, "vlan": [10, 4095]}, "nics[0].vlan[1]", "1 to 4094"),
        ({**OVS, "vlan": [10, 10]}, "nics[0].vlan[1]", "twice"),
        ({**OVS, "vlan": []}, "nics[0].vlan", "empty"),
        ({**OVS, "vlan": "ten"}, "nics[0].vlan", "whole number"),
        ({**OVS, "vlan": [10, 20], "trunk": False}, "nics[0].trunk", "make a trunk"),
        ({**OVS, "trunk": True}, "nics[0].trunk", "needs vlan"),
        ({"bridge": "br0", "mtu": 67}, "nics[0].mtu", "68 to 65535"),
        ({"bridge": "br0", "mtu": 65536}, "nics[0].mtu", "68 to 65535"),
        ({"bridge": "br0", "mtu": "big"}, "nics[0].mtu", "whole number"),
    ],
)
def test_combinations_that_cannot_work_are_refused_by_name(nic, key, words):
    err = refused(key, nic, ip_source="qemu-agent")
    assert words in str(err)


def test_a_static_ip_on_macvtap_is_refused_the_host_cannot_reach_it():
    err = refused(
        "nics[0].ip", {**DIRECT, "mac": MAC, "ip": "192.168.1.11/24"}, ip_source="qemu-agent"
    )
    assert "cannot talk to its own host" in str(err)
    assert "network or bridge NIC" in err.accepted


@pytest.mark.parametrize("source, shown", [(None, "ip-learning (the default)"), ("arp", "'arp'")])
def test_lease_and_arp_cannot_find_a_guest_with_only_macvtap_nics(source, shown):
    values = {"ip_source": source} if source else {}
    err = refused("ip_source", DIRECT, {**DIRECT, "source": "eth1"}, **values)
    assert str(err).startswith(f"ip_source: {shown} cannot find a guest")
    assert "qemu-agent" in err.accepted


def test_in_vepa_mode_a_reflecting_switch_can_show_the_guest_to_the_hosts_neighbour_table():
    vepa = {**DIRECT, "mode": "vepa"}
    assert spec(vepa, DIRECT, ip_source="arp").ip_source == "arp"
    err = refused("ip_source", vepa)  # still no libvirt lease
    assert "ip-learning (the default) cannot find a guest whose every NIC" in str(err)


def test_the_agent_or_a_second_nic_finds_a_macvtap_guest():
    assert spec(DIRECT, ip_source="qemu-agent").ip_source == "qemu-agent"
    assert spec(DIRECT, ip_source="auto").ip_source == "auto"
    assert spec(DIRECT, "default").ip_source == "ip-learning"
    # On a bridge beside it, the host's neighbour table can know the guest.
    assert spec(DIRECT, {"bridge": "br0"}, ip_source="arp").ip_source == "arp"
    # but no lease comes on a bridge or macvtap
    refused("ip_source", DIRECT, {"bridge": "br0"})


def test_an_unknown_key_names_the_new_ones_as_accepted():
    err = refused("nics[0]", {"bridge": "br0", "vlans": [1]})
    for key in ("type", "source", "mode", "virtualport", "vlan", "trunk", "mtu"):
        assert key in err.accepted
