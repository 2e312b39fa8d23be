import pytest

from salt_kvm.cloud import dhcp
from salt_kvm.errors import ConflictError, NotFoundError, SpecError

MAC, OTHER = "52:54:00:00:00:0a", "52:54:00:00:00:0b"


def hosts(conn):
    xml = conn.networkLookupByName("default").XMLDesc(0)
    return xml.count("<host ")


def test_reserve_is_idempotent_and_release_removes_it(conn):
    dhcp.check(conn, "default", MAC, "192.168.122.50", "nics[0].ip")
    assert dhcp.reserve(conn, "default", MAC, "192.168.122.50", "vm1") is True
    assert dhcp.reserve(conn, "default", MAC, "192.168.122.50", "vm1") is False
    assert hosts(conn) == 1
    dhcp.release(conn, "default", MAC, "192.168.122.50")
    assert hosts(conn) == 0


@pytest.mark.parametrize(
    "mac,ip,error",
    [
        (OTHER, "192.168.122.50", ConflictError),  # the address belongs to another MAC
        (MAC, "192.168.122.51", ConflictError),  # this MAC has another address
        (OTHER, "10.9.9.9", SpecError),  # not in the network
        (OTHER, "192.168.122.1", SpecError),  # the network's own address
    ],
)
def test_conflicting_reservations_are_refused_before_anything_changes(conn, mac, ip, error):
    dhcp.reserve(conn, "default", MAC, "192.168.122.50", "vm1")
    with pytest.raises(error) as err:
        dhcp.check(conn, "default", mac, ip, "nics[0].ip")
    assert "nics[0].ip" in str(err.value)
    assert hosts(conn) == 1


def test_unknown_network(conn):
    with pytest.raises(NotFoundError, match="no libvirt network"):
        dhcp.check(conn, "nope", MAC, "192.168.122.50", "nics[0].ip")


def test_two_fixed_ip_nics_of_one_guest_on_one_network_both_get_reserved(conn):
    """Reservations are keyed by MAC: the guest's name is on the first only
    (libvirt refuses a second entry with the same name)."""
    for mac, ip in ((MAC, "192.168.122.50"), (OTHER, "192.168.122.51")):
        dhcp.check(conn, "default", mac, ip, "nics[1].ip")
        assert dhcp.reserve(conn, "default", mac, ip, "vm1") is True
    xml = conn.networkLookupByName("default").XMLDesc(0)
    assert hosts(conn) == 2
    assert xml.count("name='vm1'") + xml.count('name="vm1"') == 1
    dhcp.release(conn, "default", OTHER, "192.168.122.51")
    dhcp.release(conn, "default", MAC, "192.168.122.50")
    assert hosts(conn) == 0
