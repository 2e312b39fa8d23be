"""One provider over two hypervisors (#15): the main bed's libvirtd (hv1) and
the second hypervisor scripts/second-hypervisor runs beside it (hv2), whose
network is bridged onto hv1's test bridge: its guests lease from hv1's
dnsmasq and reach the master.

Three TCG guests in all (the map's), the fewest that show a map spread over
both hosts with ``auto`` choosing the emptier one.
"""

import json
import socket
import time

import libvirt
import pytest
import yaml

from salt_kvm.nat import forwards
from salt_kvm.virt import pools
from salt_kvm.virt.domain import new_domain

from . import saltenv
from .cloudcheck import cloud_error, sized_profile
from .conftest import POOL, PREFIX, URI, unique

BALLAST_MIB = 16384
FORWARD = saltenv.port("migration_forward")
# A host that does not answer: skipped by auto, named in the listings.
SILENT = f"qemu+unix:///system?socket=/nonexistent/{PREFIX}libvirt-sock"


@pytest.fixture(scope="module")
def cluster(salt, hv2):
    """The module's master with a provider over both hosts, in place of the
    one-host test provider: two providers over the same hypervisor would list
    its guests twice, and salt-cloud -d would destroy each name twice."""
    uri, _conn = hv2
    hosts = {"hv1": URI, "hv2": uri, "rack7": SILENT}
    salt.write_providers({"test-multi": {"driver": "libvirt", "hosts": hosts}})
    return salt


@pytest.fixture
def ballast(hv):
    """An autostart (never started) domain on hv1: committed memory, as a
    guest that boots with the host would be, without a running guest."""
    name = f"{PREFIX}ballast"
    with_leftover = [d for d in hv.listAllDomains(0) if d.name() == name]
    for dom in with_leftover:
        dom.undefine()
    xml = new_domain(name, "qemu", BALLAST_MIB, 1, f"/nonexistent/{name}.qcow2")
    dom = hv.defineXML(xml.to_xml())
    dom.setAutostart(1)
    yield name
    dom.undefine()


def _nodes(salt, *args):
    return json.loads(salt.cloud(*args).stdout)["test-multi"]["libvirt"]


def _volumes(conn):
    pool = conn.storagePoolLookupByName(POOL)
    pools.refresh(pool)
    return {v for v in pool.listVolumes() if v.startswith(PREFIX)}


def test_locations_list_both_hosts_and_bad_locations_are_refused_first(
    cluster, hv, hv2, base_domain
):
    found = json.loads(cluster.cloud("--list-locations", "test-multi").stdout)
    hosts = found["test-multi"]["libvirt"]
    assert set(hosts) == {"hv1", "hv2", "rack7"}
    assert "cannot connect to libvirt" in hosts.pop("rack7")["error"]
    for facts in hosts.values():
        assert facts["memory_mib"] > 0
        assert (
            facts["uncommitted_memory_mib"] == facts["memory_mib"] - facts["committed_memory_mib"]
        )
    name = unique("nowhere")
    before = (_volumes(hv), _volumes(hv2[1]))
    cluster.write_profiles(
        {"nowhere": sized_profile(base_domain, cluster, provider="test-multi", location="hv3")},
        "nowhere.conf",
    )
    proc = cluster.cloud("-p", "nowhere", name, check=False)
    text = cloud_error(proc, name)
    assert (
        "location: 'hv3' is not one of this provider's hosts (accepted: auto, hv1, hv2, rack7)"
        in text
    )
    for conn in (hv, hv2[1]):
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(name)
    assert (_volumes(hv), _volumes(hv2[1])) == before
    assert name not in cluster.accepted_keys()


def test_a_map_spreads_over_both_hosts_auto_takes_the_emptier(
    cluster, hv, hv2, base_domain, ballast, tmp_path
):
    """vm a: location hv1, b: location hv2, c: auto (hv1 carries the ballast,
    so hv2 is emptier; rack7 does not answer). Created in parallel (-P), they all answer test.ping;
    -Q shows each one's host; then a moves live to hv2 with its NAT forward and
    b offline to hv1 (_migrations); -d removes each from its host, and a's
    forward and the reservation pinning its address on hv1."""
    uri2, conn2 = hv2
    names = {role: unique(f"mh{role}") for role in "abc"}
    profile = sized_profile(base_domain, cluster, provider="test-multi", memory=512)
    cluster.write_profiles({"multi": profile}, "multi.conf")
    mapfile = cluster.conf / "cloud.maps.d" / "multi.map"
    mapfile.write_text(
        yaml.safe_dump(
            {
                "multi": [
                    {names["a"]: {"location": "hv1"}},
                    {names["b"]: {"location": "hv2"}},
                    {names["c"]: {"location": "auto"}},
                ]
            }
        )
    )
    before = (_volumes(hv), _volumes(conn2))
    try:
        cluster.cloud("-P", "-m", str(mapfile))
        nodes = _nodes(cluster, "-Q")
        where = {role: nodes[name]["location"] for role, name in names.items()}
        assert where == {"a": "hv1", "b": "hv2", "c": "hv2"}
        assert all(nodes[n]["private_ips"] for n in names.values()), nodes
        pings = cluster.salt(f"{PREFIX}mh*", "test.ping")
        assert {n: pings.get(n) for n in names.values()} == dict.fromkeys(names.values(), True)
        conn2.lookupByName(names["c"])  # really on hv2
        shown = json.loads(cluster.cloud("-a", "show_instance", names["c"]).stdout)
        assert names["c"] in json.dumps(shown) and '"location": "hv2"' in json.dumps(shown)
        _migrations(cluster, hv, (uri2, conn2), names, tmp_path)
    finally:
        pinned = forwards.pin_of(names["a"])
        cluster.cloud("-d", *names.values(), check=False)
        forwards.forget(names["a"])  # a failed test's forward, if -d did not remove it
    assert forwards.current(names["a"]) == []
    if pinned is not None:  # the reservation the migration made for a's forward is gone
        _uri, network, mac, _ip = pinned
        assert mac not in hv.networkLookupByName(network).XMLDesc(0)
    for name in names.values():
        for conn in (hv, conn2):
            with pytest.raises(libvirt.libvirtError):
                conn.lookupByName(name)
        assert name not in cluster.accepted_keys()
    assert (_volumes(hv), _volumes(conn2)) == before


def _pinged(cluster, name, within):
    deadline = time.monotonic() + within
    while True:
        if cluster.salt(name, "test.ping", timeout=20).get(name) is True:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(5)


def _banner(port, within=60):
    """The first line the forwarded port answers with (sshd: SSH-2.0-...)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                data = sock.recv(64)
                if data:
                    return data.split(b"\r\n")[0].decode(errors="replace")
        except OSError:
            pass
        if time.monotonic() > deadline:
            return ""
        time.sleep(2)


def _migrations(cluster, hv, hv2, names, tmp_path):
    """The map's guests, reused (#15 item 2): a (running on hv1, a quick clone,
    with a NAT forward to its sshd) moves live to hv2 and its minion answers
    at once, the forward still reaches it (also after kvm_nat's refresh and
    re-apply on hv1); b (on hv2) is shut off, moved offline to hv1 by
    kvm_host.migrate (salt-call on the hypervisor), started, and answers.
    Each disk leaves its source pool; the migration's events are on the bus;
    bad input is refused first."""
    uri2, conn2 = hv2
    a, b = names["a"], names["b"]
    began = time.monotonic()
    port = f"port={saltenv.port('migration')}"
    refused = cluster.cloud("-a", "migrate", a, "location=hv9", check=False)
    assert "location: 'hv9' is not one of this provider's hosts" in cloud_error(refused, a)
    assert "accepted: hv1, hv2, rack7" in cloud_error(refused, a)
    a_disk = {v for v in _volumes(hv) if v.startswith(a)}
    assert a_disk
    forwards.add(hv, a, 22, FORWARD)
    assert _banner(FORWARD).startswith("SSH-2.0"), "the forward does not reach a's sshd"
    watcher = cluster.watch_events(f"salt/cloud/{a}/*")
    started = time.monotonic()
    cluster.cloud("-a", "migrate", a, "location=hv2", port)
    live_seconds = time.monotonic() - started
    events = cluster.collected_events(watcher)
    steps = [tag.rsplit("/", 1)[1] for tag, _ in events]
    assert steps == ["migrating", "migrate_copying", "migrated"], events
    assert conn2.lookupByName(a).isActive()
    with pytest.raises(libvirt.libvirtError):
        hv.lookupByName(a)
    assert cluster.salt(a, "test.ping") == {a: True}  # same key, same address
    assert _nodes(cluster, "-Q")[a]["location"] == "hv2"
    assert a_disk <= _volumes(conn2) and not a_disk & _volumes(hv)
    # a's forward stays in hv1's kernel (hv2 is bridged onto hv1's segment)
    assert forwards.listing(a)[a]["moved_to"] == "hv2"
    assert _banner(FORWARD).startswith("SSH-2.0"), "the forward lost a after the move"
    forwards.refresh(hv)
    forwards.reapply()
    assert forwards.current(a) and _banner(FORWARD).startswith("SSH-2.0")
    again = cluster.cloud("-a", "migrate", a, "location=hv2", check=False)
    assert "location: the guest is already on hv2" in cloud_error(again, a)

    cluster.cloud("-a", "stop", b)
    b_disk = {v for v in _volumes(conn2) if v.startswith(b)}
    started = time.monotonic()
    # the execution-module function, as a state or orchestration calls it on the hypervisor
    moved = saltenv.salt_call(
        saltenv.minion_config(tmp_path),
        "kvm_host.migrate",
        b,
        f"uri={URI}",
        f"source_uri={uri2}",
        port,
    )
    assert (moved["name"], moved["live"]) == (b, False), moved
    offline_seconds = time.monotonic() - started
    assert not hv.lookupByName(b).isActive() and hv.lookupByName(b).isPersistent()
    with pytest.raises(libvirt.libvirtError):
        conn2.lookupByName(b)
    assert b_disk <= _volumes(hv) and not b_disk & _volumes(conn2)
    cluster.cloud("-a", "start", b)
    assert _pinged(cluster, b, 240), f"{b} does not answer after its offline migration"
    total = time.monotonic() - began
    print(f"\nmigration: live {live_seconds:.1f} s, offline {offline_seconds:.1f} s, {total:.0f} s")
