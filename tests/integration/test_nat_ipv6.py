"""NAT forwards over IPv6 on a booted guest: a dual-stack libvirt network this
module makes (isolated, never a shared one), one guest on it. A default
forward answers on the network's own IPv6 host address, from the host, at the
guest's DHCPv6 address the host recorded for its MAC; its IPv4 side is
unchanged. Not exclusive: it adds and removes only its own forwards (the state
file and table are changed under the NAT lock) and restarts nothing."""

import contextlib
import dataclasses
import socket
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from salt_kvm import ssh
from salt_kvm.cloud import deploy as cloud_deploy
from salt_kvm.cloud import dhcp, inventory, provision
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import SaltKvmError
from salt_kvm.nat import firewall, forwards, relays
from salt_kvm.nat import rules as nat
from salt_kvm.nat.store import Store
from salt_kvm.virt import connection, lifecycle
from salt_kvm.virt.rollback import Rollback

from .conftest import BASE, GUEST_PASSWORD, GUEST_USER, PREFIX, URI, unique
from .saltenv import PORT_BASE, port

STEM = PREFIX.strip("-")
# One subnet per port base (two streams, a worktree beside another).
OCTET = 150 + (PORT_BASE // 100) % 50
HOST4, HOST6 = f"192.168.{OCTET}.1", f"fd5b:5c00:{OCTET}::1"
SSH = port("nat_ipv6")
# The guest's NIC: a fixed MAC and a static IPv6 reservation (nics[].ip6),
# outside the DHCPv6 range, inside the subnet.
MAC = f"52:54:00:5b:{OCTET:02x}:50"
RESERVED6 = f"fd5b:5c00:{OCTET}::50"


def network_xml():
    return f"""<network>
  <name>{STEM}-v6</name>
  <bridge name='{STEM}-v6' stp='on' delay='0'/>
  <ip address='{HOST4}' netmask='255.255.255.0'>
    <dhcp><range start='192.168.{OCTET}.100' end='192.168.{OCTET}.200'/></dhcp>
  </ip>
  <ip family='ipv6' address='{HOST6}' prefix='64'>
    <dhcp><range start='fd5b:5c00:{OCTET}::100' end='fd5b:5c00:{OCTET}::1ff'/></dhcp>
  </ip>
</network>"""


def dhcp_lease(net, mac, kind=libvirt.VIR_IP_ADDR_TYPE_IPV6, timeout=180, want=None):
    """The guest's lease of that family (the guest may lease IPv6 before IPv4,
    or the other way round; the create waited for the first only); ``want``:
    that address (the guest may lease another one first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for lease in net.DHCPLeases(mac) or []:
            if lease["type"] == kind and want in (None, lease["ipaddr"]):
                return lease["ipaddr"]
        time.sleep(1)
    seen = [lease["ipaddr"] for lease in net.DHCPLeases(mac) or []]
    raise AssertionError(f"no lease of type {kind} ({want}) for {mac} in {timeout} s: {seen}")


@pytest.fixture(scope="module")
def conn():
    with connection.connected(URI) as c:
        yield c


@pytest.fixture(scope="module")
def guest(conn, base_domain):
    name = unique("nat6")
    started = time.monotonic()
    net = conn.networkCreateXML(network_xml())
    try:
        values = {
            "name": name,
            "base_domain": BASE,
            "clone_strategy": "quick",
            "nics": [{"network": net.name(), "mac": MAC, "ip6": RESERVED6}],
            "deploy": False,
            "memory": "768MB",
            "virt_type": "qemu",
        }
        spec = build_spec(values)
        seed = cloud_deploy.seed_iso(spec, None, None)  # DUIDType=link-layer for the ip6
        with Rollback() as rollback:
            made = provision.create(conn, spec, rollback, lambda *_: None, seed_iso=seed)
            rollback.forget()
        mac = made.macs[0]
        print(f"created, first address: {time.monotonic() - started:.1f} s")
        dhcp_lease(net, mac)
        print(f"a first DHCPv6 lease: {time.monotonic() - started:.1f} s")
        address6 = dhcp_lease(net, mac, want=RESERVED6)
        dhcp_lease(net, mac, libvirt.VIR_IP_ADDR_TYPE_IPV4)  # the IPv4 forward's target
        print(f"guest with its reserved DHCPv6 lease: {time.monotonic() - started:.1f} s")
        yield name, mac, address6
    finally:
        released, left = [], ""
        with contextlib.suppress(SaltKvmError, libvirt.libvirtError):
            info = lifecycle.managed_info(conn.lookupByName(name)) or {}
            released = provision.release_reservations(conn, info)  # as salt-cloud -d does
            left = net.XMLDesc(0)
        with contextlib.suppress(SaltKvmError, libvirt.libvirtError):
            lifecycle.remove(conn, name)
        forwards.forget(name)  # as salt-cloud -d does (or the qemu release hook)
        net.destroy()
    # Nothing of the guest's forwards left running: no relay process, no pidfile.
    assert relays_of(name) == [], "a relay outlived its guest"
    # Its IPv6 reservation released as salt-cloud -d does.
    assert released == [f"{STEM}-v6|{MAC}|{RESERVED6}"] and "<host " not in left


def relays_of(name):
    """The pids of relay processes (any runner) for ``name``'s forwards."""
    safe = name.replace("/", "_")
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if f"{relays.PREFIX}{safe}-" in cmdline:
                found.append(int(proc.name))
    return found


def mac_via(host, timeout=120):
    with ssh.connect(host, GUEST_USER, GUEST_PASSWORD, port=SSH, timeout=timeout) as session:
        return session.check("cat /sys/class/net/eth0/address").strip()


def test_a_forward_answers_on_the_networks_ipv6_address(conn, guest):
    name, mac, address6 = guest
    forwards.apply(conn, name, [{"guest": 22, "host": SSH}])
    placement = Store().load()[name].placement
    assert (placement.address6, placement.subnet6) == (address6, f"fd5b:5c00:{OCTET}::/64")
    assert forwards.listing(name)[name]["address6"] == address6
    assert mac_via(HOST6) == mac  # [fd5b:...::1]:port, the host's own address on the network
    assert mac_via("127.0.0.1") == mac  # the IPv4 side as before
    comments = firewall.table_comments(nat.TABLE6_FAMILY)
    assert nat.comment_for(name, nat.Rule(22, SSH)) in comments["output"]


def test_a_forward_answers_on_ipv6_loopback_through_the_relay(conn, guest):
    """``[::1]`` cannot be DNATed: a userspace relay, started by the same apply,
    carries it to the guest's IPv4 address."""
    name, mac, _ = guest
    forwards.apply(conn, name, [{"guest": 22, "host": SSH}])
    assert len(relays_of(name)) == 1
    address = Store().load()[name].placement.address
    shown = forwards.listing(name)[name]["relays"]
    assert shown == [{"listen": f"[::1]:{SSH}", "to": f"{address}:22", "running": True}]
    assert mac_via("::1") == mac
    forwards.apply(conn, name, [])  # the forward goes: its relay with it
    assert relays_of(name) == []
    with pytest.raises(OSError):
        socket.create_connection(("::1", SSH), timeout=5).close()


def test_an_ipv4_only_guest_answers_on_the_networks_ipv6_address_through_a_relay(conn, guest):
    """Without an IPv6 record for the guest (an IPv4-only guest: this one's
    placement with its IPv6 side left out), nft has nothing to DNAT to; relays
    on ``[::1]`` and on the network's IPv6 host address carry it to IPv4."""
    name, mac, _ = guest
    forwards.apply(conn, name, [{"guest": 22, "host": SSH}])
    located = Store().load()[name].placement
    ipv4_only = dataclasses.replace(located, address6="", subnet6="")
    forwards.apply(conn, name, [{"guest": 22, "host": SSH}], placement=ipv4_only)
    assert name not in str(firewall.table_comments(nat.TABLE6_FAMILY))  # no ip6 DNAT
    assert len(relays_of(name)) == 2
    assert mac_via(HOST6) == mac
    assert mac_via("::1") == mac
    forwards.apply(conn, name, [{"guest": 22, "host": SSH}])  # its IPv6 lease again: DNAT
    assert len(relays_of(name)) == 1  # [::1] only
    assert mac_via(HOST6) == mac


def test_show_instance_reports_the_ipv6_address_beside_the_ipv4_one(conn, guest):
    name, _, address6 = guest
    shown = inventory.describe(conn, conn.lookupByName(name))
    ips = shown["private_ips"]
    assert address6 in ips and any(ip.startswith(f"192.168.{OCTET}.") for ip in ips)


def test_removing_the_forward_empties_the_ipv6_side(conn, guest):
    name, _, _ = guest
    forwards.apply(conn, name, [{"guest": 22, "host": SSH}])
    forwards.apply(conn, name, [])
    assert name not in str(firewall.table_comments(nat.TABLE6_FAMILY))
    assert relays_of(name) == []
    with pytest.raises(OSError):
        socket.create_connection((HOST6, SSH), timeout=5).close()


@contextlib.contextmanager
def host_ula():
    """A ULA this test adds to the loopback interface and removes (never an
    address of the machine's uplink; this kernel has no dummy links): an
    IPv6 address of the host on no libvirt network, so the guest has no
    on-link route back to it."""
    address = f"fd5b:5d00:{OCTET}::7"
    subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo"], check=True)
    try:
        yield address
    finally:
        subprocess.run(["ip", "-6", "addr", "del", f"{address}/128", "dev", "lo"], check=False)


def test_a_forward_on_a_host_ipv6_address_answers_there_only(conn, guest):
    """``host_address``: the network's IPv6 host address given explicitly,
    then a ULA of the host on no guest network; DNATed to the guest's IPv6
    address, and relayed when the guest is treated as IPv4-only."""
    name, mac, _ = guest
    try:
        forwards.apply(conn, name, [{"guest": 22, "host": SSH, "host_address": HOST6}])
        assert mac_via(HOST6) == mac
        assert relays_of(name) == []  # DNAT only, not even [::1]
        with pytest.raises(OSError):  # IPv6 only: nothing on IPv4
            socket.create_connection(("127.0.0.1", SSH), timeout=5).close()
        with host_ula() as ula:
            forwards.apply(conn, name, [{"guest": 22, "host": SSH, "host_address": ula}])
            assert nat.comment_for(name, nat.Rule(22, SSH, "tcp", ula)) in str(
                firewall.table_comments(nat.TABLE6_FAMILY)
            )
            assert mac_via(ula) == mac  # DNAT, the host's own connection masqueraded
            located = Store().load()[name].placement
            ipv4_only = dataclasses.replace(located, address6="", subnet6="")
            rule = [{"guest": 22, "host": SSH, "host_address": ula}]
            forwards.apply(conn, name, rule, placement=ipv4_only)
            assert len(relays_of(name)) == 1 and name not in str(
                firewall.table_comments(nat.TABLE6_FAMILY)
            )
            assert mac_via(ula) == mac  # the relay on [ula], to the guest's IPv4
            forwards.apply(conn, name, [])
            assert relays_of(name) == []
    finally:
        forwards.apply(conn, name, [])


def test_the_guest_has_its_static_ipv6_reservation_and_a_forward_answers_there(conn, guest):
    """nics[].ip6: libvirt's <host id=DUID-LL> in the IPv6 <dhcp>, the guest's
    networkd told (by the seed) to ask with that DUID; the forward's IPv6
    target is the reserved address."""
    name, mac, address6 = guest
    assert address6 == RESERVED6
    net = conn.networkLookupByName(f"{STEM}-v6")
    assert f"id='{dhcp.duid_ll(MAC)}'" in net.XMLDesc(0).replace('"', "'")
    (nic,) = inventory.describe(conn, conn.lookupByName(name))["nics"]
    assert nic["ip6"] == RESERVED6
    forwards.apply(conn, name, [{"guest": 22, "host": SSH}])
    assert Store().load()[name].placement.address6 == RESERVED6
    with ssh.connect(HOST6, GUEST_USER, GUEST_PASSWORD, port=SSH, timeout=120) as session:
        assert RESERVED6 in session.check("ip -6 addr show dev eth0")
    forwards.apply(conn, name, [])
