"""Where a forward points (issue #13 item 7), against libvirt's test driver:
only domains salt-kvm manages, at the host's record of their MAC (DHCP
reservation or lease), never at what the guest agent says; forwards of
domains undefined outside salt-kvm are dropped at the next apply."""

import pytest

from salt_kvm.cloud import addresses
from salt_kvm.errors import ConflictError, SpecError
from salt_kvm.nat import firewall, forwards, placement
from salt_kvm.nat import rules as nat
from salt_kvm.nat.store import Entry, Placement, Store
from salt_kvm.virt.domain import new_domain

MAC = "52:54:00:aa:00:01"
NET = "natnet"
# libvirt's iptables backend with salt-kvm's accept first (no kernel touched).
FIREWALL_OK = {
    "backends": ["iptables"],
    "configured": None,
    "problem": None,
    "accept": {"iptables": True},
}


def network_xml(hosts):
    return f"""<network>
  <name>{NET}</name>
  <forward mode='nat'/>
  <bridge name='virbr-nt'/>
  <ip address='192.168.230.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='192.168.230.100' end='192.168.230.200'/>
      {hosts}
    </dhcp>
  </ip>
</network>"""


@pytest.fixture
def kernel(monkeypatch):
    """No nft, no sysctls: the kernel side is another test's business."""
    for name, value in {
        "replace_table": lambda script: None,
        "table_comments": lambda *_: {},
        "local_ports": lambda: set(),
        "ensure_forward_accept": lambda: False,
        "firewall": lambda: FIREWALL_OK,
        "running_taps": lambda *_: [],
        "route_localnet": lambda *_: False,
        "route_localnet_on": lambda _: set(),
        "libvirt_bridges": lambda: set(),
        "guarded_bridges": lambda: set(),
    }.items():
        monkeypatch.setattr(firewall, name, value, raising=False)
    if hasattr(forwards, "sync_kernel"):
        monkeypatch.setattr(forwards, "sync_kernel", lambda entries, **_: [])


def guest(conn, name, managed=True):
    xml = new_domain(name, "test", 256, 1, "/default-pool/x.qcow2", networks=(NET,))
    xml.interfaces[0].mac = MAC
    if managed:
        xml.set_managed_info({"base": "b", "strategy": "quick", "volumes": []})
    dom = conn.defineXML(xml.to_xml())
    dom.create()
    return dom


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "nat.json")


def test_the_reservation_of_the_nics_mac_is_the_target(conn, kernel, store):
    conn.networkCreateXML(network_xml(f"<host mac='{MAC}' ip='192.168.230.50'/>"))
    guest(conn, "vm1")
    assert placement.locate(conn, "vm1").address == "192.168.230.50"
    forwards.apply(conn, "vm1", [22], store=store)
    assert store.load()["vm1"].placement.address == "192.168.230.50"


def test_the_guest_agent_and_a_name_only_reservation_never_aim_a_forward(
    conn, kernel, store, monkeypatch
):
    # A reservation by host name is matched on what the guest sends; the agent
    # reports what the guest says. Both are the guest's word.
    conn.networkCreateXML(network_xml("<host name='vm1' ip='192.168.230.60'/>"))
    guest(conn, "vm1")
    monkeypatch.setattr(addresses, "addresses_from", lambda *_: ["192.168.230.70"])
    with pytest.raises(ConflictError, match="no DHCP reservation or lease for its MAC"):
        placement.locate(conn, "vm1")
    with pytest.raises(ConflictError):
        forwards.apply(conn, "vm1", [22], store=store)
    assert store.load() == {}


def test_the_hosts_last_record_serves_while_a_restarted_network_has_no_lease(conn, kernel, store):
    conn.networkCreateXML(network_xml(""))  # no reservation, and the test driver has no leases
    guest(conn, "vm1")
    recorded = Placement(NET, "virbr-nt", "192.168.230.0/24", "192.168.230.55", MAC)
    forwards.apply(conn, "vm1", [22], store=store, placement=recorded)
    forwards.add(conn, "vm1", 80, store=store)  # looked up again: the record serves
    assert store.load()["vm1"].placement == recorded
    other_mac = Placement(
        NET, "virbr-nt", "192.168.230.0/24", "192.168.230.56", "52:54:00:aa:00:09"
    )
    with pytest.raises(ConflictError):
        placement.locate(conn, "vm1", other_mac)  # a record for another MAC never serves


def test_only_domains_salt_kvm_manages(conn, kernel, store):
    conn.networkCreateXML(network_xml(f"<host mac='{MAC}' ip='192.168.230.50'/>"))
    guest(conn, "theirs", managed=False)
    with pytest.raises(SpecError) as err:
        forwards.apply(conn, "theirs", [22], store=store)
    assert err.value.key == "domain" and "not created by salt-kvm" in str(err.value)
    assert store.load() == {}


def test_forwards_of_an_undefined_domain_are_dropped_at_the_next_apply(conn, kernel, store):
    conn.networkCreateXML(network_xml(f"<host mac='{MAC}' ip='192.168.230.50'/>"))
    guest(conn, "vm1")
    gone = Placement(NET, "virbr-nt", "192.168.230.0/24", "192.168.230.51", "52:54:00:aa:00:02")
    with store.locked():
        store.save(
            {
                "undefined-by-virsh": Entry([nat.Rule(80, 10080)], gone),
                "test": Entry([nat.Rule(81, 10081)], gone),  # exists, but not salt-kvm's
            }
        )
    forwards.apply(conn, "vm1", [22], store=store)
    assert sorted(store.load()) == ["vm1"]


def test_refresh_honours_the_configured_maximum(conn, kernel, store):
    conn.networkCreateXML(network_xml(f"<host mac='{MAC}' ip='192.168.230.50'/>"))
    guest(conn, "vm1")
    ports = list(range(1000, 1070))  # more than the default 64
    forwards.apply(conn, "vm1", ports, max_rules=100, store=store)
    forwards.refresh(conn, store, max_rules=100)
    assert len(store.load()["vm1"].rules) == 70


def test_a_create_whose_forward_write_fails_leaves_no_forward(conn, pool, base, monkeypatch, store):
    """The undo is registered before the write: a failure half-way through
    (the table loaded, then iptables fails) leaves neither table rules nor state."""
    from salt_kvm.cloud import provision
    from salt_kvm.cloud.spec import build_spec
    from salt_kvm.virt.rollback import Rollback

    kernel = {"script": ""}
    monkeypatch.setenv("SALT_KVM_NAT_STATE", str(store.path))
    for name, value in {
        "replace_table": lambda script: kernel.update(script=script),
        "table_comments": lambda *_: {},
        "local_ports": lambda: set(),
        "running_taps": lambda *_: [],
        "route_localnet": lambda *_: False,
        "route_localnet_on": lambda _: set(),
        "libvirt_bridges": lambda: set(),
        "guarded_bridges": lambda: {"virbr0"},
        "firewall": lambda: FIREWALL_OK,
    }.items():
        monkeypatch.setattr(firewall, name, value, raising=False)

    def iptables_fails():
        raise forwards.SaltKvmError("iptables -w -t filter -N SALT_KVM_FWD failed: injected")

    monkeypatch.setattr(firewall, "ensure_forward_accept", iptables_fails)
    nic = {"network": "default", "mac": "52:54:00:12:34:58", "ip": "192.168.122.62"}
    values = {"name": "vm1", "base_domain": "base", "password": "pw", "clone_strategy": "quick"}
    rollback = Rollback()
    with pytest.raises(forwards.SaltKvmError, match="injected"):
        with rollback:
            spec = build_spec({**values, "virt_type": "auto", "nics": [nic], "nat_rules": [22]})
            provision.create(conn, spec, rollback, lambda *a: None)
    assert "vm1" not in kernel["script"]
    assert store.load() == {}


def test_the_ipv6_address_is_the_hosts_dhcpv6_record_for_the_mac(conn, kernel, store):
    """On a dual-stack network: the lease libvirt records for the NIC's MAC (the
    test driver has no leases: the host's last record stands in), never one
    for another MAC nor one outside the network's IPv6 subnet."""
    dual = network_xml(f"<host mac='{MAC}' ip='192.168.230.50'/>").replace(
        "</network>",
        "<ip family='ipv6' address='fd5b:230::1' prefix='64'><dhcp>"
        "<range start='fd5b:230::100' end='fd5b:230::1ff'/></dhcp></ip></network>",
    )
    conn.networkCreateXML(dual)
    guest(conn, "vm1")
    recorded = Placement(
        NET, "virbr-nt", "192.168.230.0/24", "192.168.230.50", MAC, "fd5b:230::150", "x"
    )
    found = placement.locate(conn, "vm1", recorded)
    assert (found.address, found.address6, found.subnet6) == (
        "192.168.230.50",
        "fd5b:230::150",
        "fd5b:230::/64",
    )
    outside = Placement(NET, "virbr-nt", "", "192.168.230.50", MAC, "fd5b:999::150", "")
    assert placement.locate(conn, "vm1", outside).address6 == ""
    assert placement.locate(conn, "vm1").address6 == ""  # no record, no lease: IPv4 only
