"""Static IPv6 reservations (``nics[].ip6``) on a dual-stack network of the
test driver: a libvirt ``<host id=DUID ip=...>`` in the IPv6 ``<dhcp>``,
keyed by the DUID-LL made from the NIC's MAC (libvirt takes no MAC there)."""

import pytest
from lxml import etree

from salt_kvm.cloud import dhcp
from salt_kvm.errors import ConflictError, SpecError
from salt_kvm.virt.domain import Domain

MAC, OTHER = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
DUAL = """<network>
  <name>dual</name>
  <bridge name='virbr6'/>
  <ip address='192.168.160.1' netmask='255.255.255.0'>
    <dhcp><range start='192.168.160.100' end='192.168.160.200'/></dhcp>
  </ip>
  <ip family='ipv6' address='fd00:160::1' prefix='64'>
    <dhcp><range start='fd00:160::100' end='fd00:160::1ff'/></dhcp>
  </ip>
</network>"""


@pytest.fixture
def dual(conn):
    net = conn.networkDefineXML(DUAL)
    net.create()
    return net


def hosts6(net):
    root = etree.fromstring(net.XMLDesc(0).encode())
    return [dict(h.attrib) for h in root.findall("ip[@family='ipv6']/dhcp/host")]


def test_the_duid_is_the_macs_duid_ll():
    assert dhcp.duid_ll("52:54:00:AB:00:0A") == "00:03:00:01:52:54:00:ab:00:0a"


def test_an_ipv6_reservation_is_keyed_by_the_duid_and_released(conn, dual):
    dhcp.check(conn, "dual", MAC, "fd00:160::50", "nics[0].ip6")
    assert dhcp.reserve(conn, "dual", MAC, "FD00:160::50", "vm1") is True
    assert dhcp.reserve(conn, "dual", MAC, "fd00:160::50", "vm1") is False
    assert hosts6(dual) == [{"id": dhcp.duid_ll(MAC), "ip": "fd00:160::50"}]
    # the IPv4 side takes its own reservation beside it, by MAC
    assert dhcp.reserve(conn, "dual", MAC, "192.168.160.50", "vm1") is True
    dhcp.release(conn, "dual", MAC, "fd00:160::50")
    assert hosts6(dual) == []
    assert "192.168.160.50" in dual.XMLDesc(0)


@pytest.mark.parametrize(
    "mac,ip,error",
    [
        (OTHER, "fd00:160::50", ConflictError),  # another NIC's
        (MAC, "fd00:160::51", ConflictError),  # this MAC has another one
        (OTHER, "fd00:999::5", SpecError),  # not in the network's IPv6 subnet
        (OTHER, "fd00:160::1", SpecError),  # the network's own address
    ],
)
def test_conflicting_ipv6_reservations_are_refused_first(conn, dual, mac, ip, error):
    dhcp.reserve(conn, "dual", MAC, "fd00:160::50", "vm1")
    with pytest.raises(error) as err:
        dhcp.check(conn, "dual", mac, ip, "nics[0].ip6")
    assert "nics[0].ip6" in str(err.value)
    assert len(hosts6(dual)) == 1


def test_an_ipv4_only_network_refuses_an_ipv6_reservation(conn):
    with pytest.raises(SpecError) as err:
        dhcp.check(conn, "default", MAC, "fd00:160::50", "nics[0].ip6")
    assert err.value.key == "nics[0].ip6" and "IPv6 DHCP" in str(err.value)


def test_a_guest_with_an_ip6_is_reserved_shown_released_and_rolled_back(conn, pool, base, dual):
    from salt_kvm.cloud import inventory, provision
    from salt_kvm.cloud.spec import build_spec
    from salt_kvm.virt.rollback import Rollback

    nic = {"network": "dual", "mac": MAC, "ip": "192.168.160.60", "ip6": "fd00:160::60"}
    values = {"name": "vm1", "base_domain": "base", "password": "pw", "nics": [nic]}
    values.update(clone_strategy="quick", virt_type="auto")

    def fail_while_waiting(step, data):
        if step == "waiting_for_ip":
            raise RuntimeError("injected")

    rollback = Rollback()
    with pytest.raises(RuntimeError, match="injected"), rollback:
        provision.create(conn, build_spec(values), rollback, fail_while_waiting)
    assert hosts6(dual) == [] and "192.168.160.60" not in dual.XMLDesc(0)  # rolled back

    guest = provision.create(conn, build_spec(values), Rollback(), lambda *a: None)
    assert hosts6(dual) == [{"id": dhcp.duid_ll(MAC), "ip": "fd00:160::60"}]
    (shown,) = inventory.describe(conn, guest.domain)["nics"]
    assert (shown["ip"], shown["ip6"]) == ("192.168.160.60", "fd00:160::60")
    info = Domain(guest.domain.XMLDesc(0)).managed_info()
    assert provision.release_reservations(conn, info) == [
        f"dual|{MAC}|192.168.160.60",
        f"dual|{MAC}|fd00:160::60",
    ]
    assert hosts6(dual) == [] and "192.168.160.60" not in dual.XMLDesc(0)


def test_an_ip6_the_network_cannot_take_stops_the_create_first(conn, pool, base):
    from salt_kvm.cloud import provision
    from salt_kvm.cloud.spec import build_spec
    from salt_kvm.virt.rollback import Rollback

    nic = {"network": "default", "mac": MAC, "ip6": "fd00:160::60"}
    values = {"name": "vm1", "base_domain": "base", "password": "pw", "nics": [nic]}
    before = sorted(d.name() for d in conn.listAllDomains(0))
    with pytest.raises(SpecError) as err:
        provision.create(conn, build_spec(values), Rollback(), lambda *a: None)
    assert err.value.key == "nics[0].ip6"
    assert sorted(d.name() for d in conn.listAllDomains(0)) == before


def test_a_transient_network_takes_reservations_live_only(conn):
    """A network made by net-create has no persistent config to change."""
    net = conn.networkCreateXML(DUAL.replace("<name>dual", "<name>dual-t"))
    assert not net.isPersistent()
    assert dhcp.reserve(conn, "dual-t", MAC, "fd00:160::50", "vm1") is True
    assert dhcp.reserve(conn, "dual-t", MAC, "192.168.160.50", "vm1") is True
    assert hosts6(net) == [{"id": dhcp.duid_ll(MAC), "ip": "fd00:160::50"}]
    dhcp.release(conn, "dual-t", MAC, "fd00:160::50")
    dhcp.release(conn, "dual-t", MAC, "192.168.160.50")
    assert "<host " not in net.XMLDesc(0)
