"""Several hypervisors behind one provider, on two private test-driver hosts
and one that does not answer (#15): listings, --list-locations, actions that
find the guest wherever it is, and placement."""

import logging

import libvirt
import pytest
from salt.exceptions import SaltCloudConfigError

from salt_kvm.cloud import fleet, placement
from salt_kvm.cloud.locations import AUTO
from salt_kvm.cloud.spec import build_spec
from salt_kvm.clouds import libvirt as driver
from salt_kvm.errors import NotFoundError, SaltKvmError

from .twohosts import URIS, guest


def test_listing_names_each_guests_host_and_skips_a_silent_host(hosts, tmp_path, caplog):
    guest(hosts["hv1"], "vm-a", running=True)
    guest(hosts["hv2"], "vm-b")
    guest(hosts["hv2"], "not-ours", managed=False)
    with caplog.at_level(logging.WARNING):
        nodes = fleet.Fleet(URIS).nodes({"cachedir": str(tmp_path)}, driver.inventory.managed)
    assert {n: v["location"] for n, v in nodes.items()} == {"vm-a": "hv1", "vm-b": "hv2"}
    assert nodes["vm-a"]["state"] == "running"
    assert "host rack7 did not answer" in caplog.text


def test_a_guest_is_found_wherever_it_is(hosts):
    guest(hosts["hv2"], "vm-b")
    with fleet.Fleet(URIS).guest("vm-b") as (host, conn):
        assert host == "hv2"
        assert conn.lookupByName("vm-b").name() == "vm-b"
    with pytest.raises(NotFoundError) as err, fleet.Fleet(URIS).guest("vm-x"):
        pass
    assert "no domain named 'vm-x' on any host (hv1, hv2, rack7)" in str(err.value)
    assert "did not answer: rack7" in str(err.value)


def test_locations_show_memory_committed_memory_and_guests(hosts):
    guest(hosts["hv1"], "vm-a", memory=1024, running=True)
    guest(hosts["hv1"], "vm-off", memory=4096)  # shut off, not autostart: not committed
    hosts["hv1"].lookupByName("test").destroy()  # the node's own guest
    found = fleet.Fleet(URIS).locations()
    hv1, hv2 = found["hv1"], found["hv2"]
    assert hv1["committed_memory_mib"] == 1024
    assert hv1["uncommitted_memory_mib"] == hv1["memory_mib"] - 1024
    assert hv1["guests"] == ["vm-a", "vm-off"]
    assert hv2["guests"] == [] and hv2["committed_memory_mib"] == 512  # "test" runs there
    assert "cannot connect" in found["rack7"]["error"]


def test_auto_places_on_the_emptier_host_that_has_the_base(hosts, tmp_path):
    for conn in hosts.values():
        guest(conn, "base", managed=False)
    guest(hosts["hv1"], "big", memory=2048, running=True)
    spec = build_spec({"name": "new", "base_domain": "base", "memory": "256 MiB", "deploy": False})
    placements = placement.Placements(tmp_path)
    chosen = placement.place(placements, URIS, fleet.Fleet(URIS).connect, spec, AUTO)
    assert chosen.name == "hv2"
    assert placements.running()[0]["host"] == "hv2"

    # A placement of a create still running counts on its host.
    hosts["hv2"].lookupByName("base").undefine()
    with pytest.raises(SaltKvmError) as err:
        placement.place(placements, URIS, fleet.Fleet(URIS).connect, spec, "hv2")
    assert "location hv2: hv2 has no base domain base" in str(err.value)


def test_a_name_on_another_host_is_refused_where_it_is_not(hosts, tmp_path):
    for conn in hosts.values():
        guest(conn, "base", managed=False)
    guest(hosts["hv1"], "vm1")
    spec = build_spec({"name": "vm1", "base_domain": "base", "deploy": False})
    connect = fleet.Fleet(URIS).connect
    with pytest.raises(SaltKvmError, match="location hv2: vm1 already exists on host hv1"):
        placement.place(placement.Placements(tmp_path), URIS, connect, spec, "hv2")


def test_a_missing_network_keeps_a_host_out(hosts, tmp_path):
    for conn in hosts.values():
        guest(conn, "base", managed=False)
    hosts["hv1"].networkLookupByName("default").destroy()
    spec = build_spec({"name": "n", "base_domain": "base", "deploy": False})
    chosen = placement.place(
        placement.Placements(tmp_path), URIS, fleet.Fleet(URIS).connect, spec, AUTO
    )
    assert chosen.name == "hv2"


# ---- through the driver's own functions --------------------------------------------


def test_driver_lists_and_acts_on_guests_of_every_host(provider, hosts, caplog):
    guest(hosts["hv2"], "vm-b")
    assert driver.list_nodes()["vm-b"]["location"] == "hv2"
    assert driver.list_nodes_min()["vm-b"]["location"] == "hv2"
    assert driver.show_instance("vm-b", call="action")["location"] == "hv2"
    assert driver.start("vm-b", call="action") == {"vm-b": "running"}
    assert hosts["hv2"].lookupByName("vm-b").isActive()
    found = driver.avail_locations()
    assert set(found) == {"hv1", "hv2", "rack7"}
    assert found["hv1"]["uri"] == "test:///hv1"  # as written: no credentials in it
    assert "required 'url'" not in caplog.text  # hosts, not url, configures it
    with pytest.raises(driver.SaltCloudSystemExit, match="no domain named 'vm-x' on any host"):
        driver.start("vm-x", call="action")


def test_driver_refuses_hosts_with_url_and_functions_need_a_location(provider):
    with pytest.raises(SaltCloudConfigError, match="location: is required with hosts"):
        driver.image_list({}, call="function")
    with pytest.raises(SaltCloudConfigError, match=r"'hv9' .*\(accepted: hv1, hv2, rack7\)"):
        driver.image_list({"location": "hv9"}, call="function")
    provider["url"] = "qemu:///system"
    with pytest.raises(SaltCloudConfigError, match="hosts: is given together with url"):
        driver.list_nodes()


def test_a_uri_password_never_shows_in_locations():
    uri = "qemu+ssh://root:s3cretpw@127.0.0.1:1/system?no_tty=1"  # loopback, closed port
    found = fleet.Fleet({"h": uri}).locations()["h"]
    assert found["error"] and "s3cretpw" not in str(found)


def test_cleanup_undoes_a_killed_create_on_the_host_it_was_placed_on(provider, hosts, tmp_path):
    from salt_kvm.cloud import intent

    from .test_intent import killed

    for conn in hosts.values():  # a domain of the name on both: only hv2's is the killed one's
        guest(conn, "vmk")
    journal = intent.Journal(tmp_path, "vmk")
    journal.begin()
    journal.intend("domain", name="vmk")
    killed(journal)
    placements = placement.Placements(tmp_path)
    placements.add("vmk", "hv2", 256)
    record = placements._path("vmk")
    record.write_text(record.read_text().replace('"pid": ', '"pid": 1, "was": '))  # pid 1: not ours
    assert placements.killed("vmk") == "hv2"

    removed = driver.cleanup({}, call="function")
    assert removed["vmk"] == ["domain vmk"]
    assert "rack7" in removed["hosts that did not answer"]
    with pytest.raises(libvirt.libvirtError):
        hosts["hv2"].lookupByName("vmk")
    hosts["hv1"].lookupByName("vmk")  # not the killed create's: kept
    assert placements.killed("vmk") is None  # its placement went with it
