"""What salt-cloud's listings report, on libvirt's test driver."""

from salt_kvm.cloud import inventory
from salt_kvm.virt.domain import new_domain


def define(conn, name, managed, start=False):
    xml = new_domain(name, "test", 256, 1, f"/default-pool/{name}.qcow2")
    if managed:
        xml.set_managed_info({"base": "b", "strategy": "quick", "volumes": []})
    dom = conn.defineXML(xml.to_xml())
    if start:
        dom.create()
    return dom


def test_list_nodes_min_is_salt_kvms_guests_with_their_state_only(conn):
    define(conn, "ours-up", managed=True, start=True)
    define(conn, "ours-down", managed=True)
    define(conn, "theirs", managed=False, start=True)
    nodes = inventory.managed_min(conn)
    assert nodes == {
        "ours-up": {"id": "ours-up", "state": "running"},
        "ours-down": {"id": "ours-down", "state": "stopped"},
    }
    # The same names and states as the full listing.
    full = inventory.managed(conn)
    assert {n: v["state"] for n, v in full.items()} == {n: v["state"] for n, v in nodes.items()}
