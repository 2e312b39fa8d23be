"""NAT rules: parsing (every refusal names the key) and the rendered ruleset."""

import json
import sys

import pytest

from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import SpecError
from salt_kvm.nat import hooks
from salt_kvm.nat import rules as nat
from salt_kvm.nat.store import Entry, Placement, Store, all_forwards

R = nat.Rule


def test_ports_map_to_10000_plus_port():
    assert nat.host_port_for(22) == 10022
    assert nat.parse_rules([22, "80"]) == [R(22, 10022), R(80, 10080)]


def test_true_is_the_slapos_default():
    assert [r.guest for r in nat.parse_rules(True)] == [22, 80, 443]
    assert [r.host for r in nat.parse_rules(True)] == [10022, 10080, 10443]


@pytest.mark.parametrize("empty", [None, False, "", []])
def test_nothing_means_no_rules(empty):
    assert nat.parse_rules(empty) == []


def test_slapos_string_and_mappings():
    assert nat.parse_rules("22 80  443") == nat.parse_rules(True)
    rules = nat.parse_rules(
        [{"guest": 53, "host": 5353, "proto": "UDP"}, {"guest": 80, "host_address": "192.0.2.2"}]
    )
    assert rules == [R(53, 5353, "udp"), R(80, 10080, "tcp", "192.0.2.2")]


@pytest.mark.parametrize(
    "value,key,accepted",
    [
        ([0], "nat_rules[0]", "1 to 65535"),
        ([65536], "nat_rules[0]", "1 to 65535"),
        (["ssh"], "nat_rules[0]", "1 to 65535"),
        ([{"guest": 22, "host": 70000}], "nat_rules[0].host", "1 to 65535"),
        ([{"guest": 22, "proto": "sctp"}], "nat_rules[0].proto", "tcp, udp"),
        ([{"host": 22}], "nat_rules[0].guest", "1 to 65535"),
        ([{"guest": 22, "port": 1}], "nat_rules[0]", "guest, host, proto, host_address"),
        ([{"guest": 22, "host_address": "nowhere"}], "nat_rules[0].host_address", "address"),
        ([60000], "nat_rules[0]", "explicit host port"),
        ([22, {"guest": 23, "host": 10022}], "nat_rules[1]", "distinct host ports"),
        (3.5, "nat_rules", "true (ports 22 80 443)"),
    ],
)
def test_refusals_name_the_key(value, key, accepted):
    with pytest.raises(SpecError) as err:
        nat.parse_rules(value)
    assert err.value.key == key
    assert accepted in str(err.value)


def test_more_rules_than_the_maximum():
    with pytest.raises(SpecError, match="at most 2"):
        nat.parse_rules([1, 2, 3], max_rules=2)


def test_same_port_different_protocols_or_addresses_is_fine():
    rules = nat.parse_rules(
        [
            {"guest": 53, "host": 5353, "proto": "udp"},
            {"guest": 53, "host": 5353, "proto": "tcp"},
            {"guest": 80, "host": 8080, "host_address": "192.0.2.2"},
            {"guest": 81, "host": 8080, "host_address": "192.0.2.3"},
        ]
    )
    assert len(rules) == 4
    with pytest.raises(SpecError, match="used twice"):
        nat.parse_rules(
            [{"guest": 80, "host": 8080}, {"guest": 81, "host": 8080, "host_address": "192.0.2.3"}]
        )


def test_profile_key_goes_through_the_same_parser():
    spec = build_spec({"name": "vm1", "base_domain": "b", "deploy": False, "nat_rules": True})
    assert spec.nat_rules == nat.parse_rules(True)
    with pytest.raises(SpecError) as err:
        build_spec({"name": "vm1", "base_domain": "b", "deploy": False, "nat_rules": [99999]})
    assert err.value.key == "nat_rules[0]"


def fwd(domain, rule, address, bridge="virbr1", subnet="192.168.214.0/24"):
    return nat.Forward(domain, rule, address, bridge, subnet)


def test_ruleset_structure():
    chains = nat.ruleset(
        [
            fwd("vm2", R(22, 10122), "192.168.214.12"),
            fwd("vm1", R(22, 10022), "192.168.214.11"),
            fwd("vm1", R(53, 5353, "udp"), "192.168.214.11"),
            fwd(
                "vm3",
                R(80, 8080, "tcp", "192.0.2.2"),
                "192.168.215.5",
                "virbr2",
                "192.168.215.0/24",
            ),
            fwd("vm4", R(443, 8443, "tcp", "0.0.0.0"), "192.168.214.14"),
        ]
    )
    assert list(chains) == ["guard", "prerouting", "output", "postrouting"]
    assert chains["guard"] == [
        'iifname "virbr1" ip daddr 127.0.0.0/8 drop comment "guard|virbr1"',
        'iifname "virbr2" ip daddr 127.0.0.0/8 drop comment "guard|virbr2"',
    ]
    mark = "ct mark set ct mark or 0x100000"

    def dnat(match, proto, port, to, comment):
        return f'{match} {proto} dport {port} {mark} dnat to {to} comment "{comment}"'

    local = "fib daddr type local"
    # Not given: the host's own traffic (output) and its guests' bridges, never
    # what arrives on the host's other (public) interfaces; 0.0.0.0: every address.
    inside = 'iifname { "virbr1", "virbr2" } fib daddr type local'
    assert chains["output"] == [
        dnat(local, "tcp", 10022, "192.168.214.11:22", "vm1|tcp||10022"),
        dnat(local, "udp", 5353, "192.168.214.11:53", "vm1|udp||5353"),
        dnat(local, "tcp", 10122, "192.168.214.12:22", "vm2|tcp||10122"),
        dnat("ip daddr 192.0.2.2", "tcp", 8080, "192.168.215.5:80", "vm3|tcp|192.0.2.2|8080"),
        dnat(local, "tcp", 8443, "192.168.214.14:443", "vm4|tcp|0.0.0.0|8443"),
    ]
    assert chains["prerouting"] == [
        dnat(inside, "tcp", 10022, "192.168.214.11:22", "vm1|tcp||10022"),
        dnat(inside, "udp", 5353, "192.168.214.11:53", "vm1|udp||5353"),
        dnat(inside, "tcp", 10122, "192.168.214.12:22", "vm2|tcp||10122"),
        dnat("ip daddr 192.0.2.2", "tcp", 8080, "192.168.215.5:80", "vm3|tcp|192.0.2.2|8080"),
        dnat(local, "tcp", 8443, "192.168.214.14:443", "vm4|tcp|0.0.0.0|8443"),
    ]
    marked = "ct mark and 0x100000 == 0x100000"
    assert chains["postrouting"] == [
        f"{marked} ip saddr 127.0.0.0/8 masquerade",
        f'{marked} oifname "virbr1" ip saddr 192.168.214.0/24 masquerade',
        f'{marked} oifname "virbr2" ip saddr 192.168.215.0/24 masquerade',
    ]


def test_script_replaces_the_table_in_one_file():
    text = nat.script([fwd("vm1", R(22, 10022), "192.168.214.11")])
    lines = text.splitlines()
    assert lines[:3] == ["add table ip salt_kvm", "delete table ip salt_kvm", "table ip salt_kvm {"]
    assert "    type nat hook output priority -100; policy accept;" in lines
    # No forwards: the tables are removed (IPv4 and IPv6), nothing else.
    assert nat.script([]).splitlines() == [
        "add table ip salt_kvm",
        "delete table ip salt_kvm",
        "add table ip6 salt_kvm",
        "delete table ip6 salt_kvm",
    ]
    # A guest without an IPv6 address: the IPv6 table stays empty.
    assert "table ip6 salt_kvm {" not in lines


def test_comment_is_safe_for_any_domain_name():
    assert nat.comment_for('we"ird name', R(22, 10022)) == "we_ird_name|tcp||10022"


def test_store_round_trip(tmp_path):
    store = Store(tmp_path / "nat.json")
    assert store.load() == {}
    placement = Placement(
        "net", "virbr1", "192.168.214.0/24", "192.168.214.11", "52:54:00:00:00:01"
    )
    entries = {"vm1": Entry(nat.parse_rules([22, {"guest": 53, "proto": "udp"}]), placement)}
    with store.locked():
        store.save(entries)
    assert store.load() == entries
    assert json.loads((tmp_path / "nat.json").read_text())["version"] == 1
    assert [f.comment for f in all_forwards(entries)] == ["vm1|tcp||10022", "vm1|udp||10053"]


def test_hooks_install_is_idempotent(tmp_path):
    written = hooks.install(tmp_path, state=tmp_path / "nat.json")
    assert sorted(written) == [
        str(tmp_path / "network.d" / "salt-kvm-nat"),
        str(tmp_path / "qemu.d" / "salt-kvm-nat"),
        str(tmp_path / "salt-kvm-hook.conf"),
        str(tmp_path / "salt-kvm-libvirt-hook"),
    ]
    assert hooks.install(tmp_path, state=tmp_path / "nat.json", test=True) == []
    assert hooks.install(tmp_path, state=tmp_path / "nat.json") == []
    script = (tmp_path / "qemu.d" / "salt-kvm-nat").read_text()
    assert script.startswith("#!/bin/sh\n") and "DRIVER=qemu" in script
    assert f"python={sys.executable}" in (tmp_path / "salt-kvm-hook.conf").read_text()


def fwd6(domain, rule, address, address6, bridge="virbr1"):
    return nat.Forward(domain, rule, address, bridge, "192.168.214.0/24", address6, "fd00:214::/64")


def test_ipv6_table_dnats_default_forwards_of_dual_stack_guests():
    forwards = [
        fwd6("vm1", R(22, 10022), "192.168.214.11", "fd00:214::11"),
        fwd6("vm1", nat.Rule(80, 8080, host_address="192.0.2.7"), "192.168.214.11", "fd00:214::11"),
        fwd("vm2", R(22, 10122), "192.168.214.12"),  # IPv4 only: no IPv6 forward
    ]
    chains = nat.ruleset6(forwards)
    mark = "ct mark set ct mark or 0x100000"
    assert chains["output"] == [
        f"fib daddr type local ip6 daddr != ::1 tcp dport 10022 {mark} "
        'dnat to [fd00:214::11]:22 comment "vm1|tcp||10022"'
    ]
    assert chains["prerouting"] == [
        f'iifname {{ "virbr1" }} fib daddr type local ip6 daddr != ::1 tcp dport 10022 {mark} '
        'dnat to [fd00:214::11]:22 comment "vm1|tcp||10022"'
    ]
    assert chains["postrouting"] == [
        'ct mark and 0x100000 == 0x100000 oifname "virbr1" ip6 saddr fd00:214::/64 masquerade'
    ]
    lines = nat.script(forwards).splitlines()
    assert lines.index("add table ip6 salt_kvm") > lines.index("table ip salt_kvm {")
    assert "table ip6 salt_kvm {" in lines
    assert nat.ruleset6([fwd("vm2", R(22, 10122), "192.168.214.12")]) == {}


def test_store_keeps_the_ipv6_placement_and_reads_old_files(tmp_path):
    store = Store(tmp_path / "nat.json")
    placement = Placement(
        "net",
        "virbr1",
        "192.168.214.0/24",
        "192.168.214.11",
        "52:54:00:00:00:01",
        "fd00:214::11",
        "fd00:214::/64",
    )
    entries = {"vm1": Entry(nat.parse_rules([22]), placement)}
    with store.locked():
        store.save(entries)
    assert store.load() == entries
    assert all_forwards(entries)[0].answers_ipv6
    old = json.loads((tmp_path / "nat.json").read_text())
    for item in old["domains"].values():
        del item["address6"], item["subnet6"]
    (tmp_path / "nat.json").write_text(json.dumps(old))
    assert store.load()["vm1"].placement.address6 == ""


# ---- host_address: IPv6 (issue 16 item 7) ----------------------------------


@pytest.mark.parametrize(
    "given,kept",
    [
        ("fd00:214::1", "fd00:214::1"),
        ("FD00:0214:0::0001", "fd00:214::1"),  # as ``ip`` and nft write it
        ("::", nat.EVERY6),
        ("::1", "::1"),
        ("0.0.0.0", nat.EVERY),
        ("192.0.2.7", "192.0.2.7"),
    ],
)
def test_host_address_takes_ipv6_addresses_and_every_ipv6_address(given, kept):
    assert nat.parse_rules([{"guest": 22, "host_address": given}])[0].host_address == kept


def test_a_bad_host_address_names_the_key_and_every_accepted_value():
    with pytest.raises(SpecError) as err:
        nat.parse_rules([{"guest": 22, "host_address": "fd00::zz"}])
    assert err.value.key == "nat_rules[0].host_address"
    for accepted in ("IPv4", "IPv6", "0.0.0.0", "::"):
        assert accepted in str(err.value)


def test_an_ipv6_host_address_dnats_that_address_only_and_nothing_on_ipv4():
    forwards = [
        fwd6("vm1", nat.Rule(22, 10022, host_address="fd99::7"), "192.168.214.11", "fd00:214::11"),
        fwd6("vm1", nat.Rule(80, 10080, host_address=nat.EVERY6), "192.168.214.11", "fd00:214::11"),
    ]
    assert nat.ruleset(forwards) == {}  # no IPv4 side, no guard, no route_localnet
    assert nat.localnet_bridges(forwards) == []
    chains = nat.ruleset6(forwards)
    mark = "ct mark set ct mark or 0x100000"
    assert (
        chains["prerouting"]
        == chains["output"]
        == [
            f"ip6 daddr fd99::7 tcp dport 10022 {mark} "
            'dnat to [fd00:214::11]:22 comment "vm1|tcp|fd99::7|10022"',
            f"fib daddr type local ip6 daddr != ::1 tcp dport 10080 {mark} "
            'dnat to [fd00:214::11]:80 comment "vm1|tcp|::|10080"',
        ]
    )
    # The host's own connections (from its address, not on the guest's
    # subnet, maybe without a route back) are masqueraded to the bridge.
    assert (
        'ct mark and 0x100000 == 0x100000 oifname "virbr1" fib saddr type local masquerade'
        in chains["postrouting"]
    )


def test_an_ipv6_host_address_to_an_ipv4_only_guest_has_no_dnat():
    forward = fwd("vm2", nat.Rule(22, 10122, host_address="fd99::7"), "192.168.214.12")
    assert nat.ruleset([forward]) == {} and nat.ruleset6([forward]) == {}


def test_ipv6_loopback_as_host_address_is_never_dnated():
    forward = fwd6("vm1", nat.Rule(22, 10022, host_address="::1"), "192.168.214.11", "fd00::11")
    assert nat.ruleset([forward]) == {} and nat.ruleset6([forward]) == {}


def test_an_ipv6_rule_prints_its_address_in_brackets():
    assert str(nat.Rule(22, 10022, host_address="fd99::7")) == "[fd99::7]:10022/tcp -> 22"


def test_the_lease_reserved_for_the_macs_duid_ll_is_the_ipv6_target():
    """A guest told to ask with its DUID-LL (nics[].ip6) asked first with its
    machine-id DUID: both leases carry its MAC; the reserved one is taken."""
    from lxml import etree

    from salt_kvm.nat import placement

    mac = "52:54:00:00:00:0a"
    root = etree.fromstring(
        "<network><ip family='ipv6' address='fd00:160::1' prefix='64'><dhcp>"
        "<range start='fd00:160::100' end='fd00:160::1ff'/>"
        f"<host id='00:03:00:01:{mac}' ip='fd00:160::60'/>"
        "<host id='00:03:00:01:52:54:00:00:00:0b' ip='fd00:160::61'/>"
        "</dhcp></ip></network>"
    )
    leased = ["fd00:160::1a2", "fd00:160::60"]
    assert placement._address6(root, mac, leased, "")[1] == "fd00:160::60"
    assert placement._address6(root, mac, ["fd00:160::1a2"], "")[1] == "fd00:160::1a2"
    # a reservation alone (no lease for the MAC) is not where the guest is
    assert placement._address6(root, "52:54:00:00:00:0b", [], "")[1] == ""
