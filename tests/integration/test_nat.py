"""NAT port forwards on booted guests, through the real kernel and libvirtd.

Two guests on two libvirt NAT networks this module makes (never the shared
ones): vm1 on the first, vm2 on the second, so vm2 reaching a forward to vm1
crosses libvirt's forward rejects the way outside traffic does.
"""

import concurrent.futures
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from salt_kvm import ssh
from salt_kvm.cloud import provision
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import SaltKvmError
from salt_kvm.nat import firewall, forwards, hookfiles
from salt_kvm.nat import hooks as nathook
from salt_kvm.nat import rules as nat
from salt_kvm.nat.store import Store
from salt_kvm.virt import connection
from salt_kvm.virt.rollback import Rollback

from .conftest import BASE, GUEST_PASSWORD, GUEST_USER, PREFIX, URI, unique
from .probes import LOOPBACK_PROBE
from .saltenv import minion_config, port, salt_call_proc

# Alone, after scripts/run-integration's parallel streams, and not only for the
# libvirtd restart below: the tests compare salt-kvm's whole host-wide NAT table
# and state file before and after (another stream's forward would change them),
# delete that table (cutting other guests' forwards meanwhile) and date the
# host's libvirt hooks into the future (every kvm_nat call then warns).
pytestmark = pytest.mark.exclusive

NET_PREFIXES = os.environ.get("SALT_KVM_NAT_TEST_NETS", "192.168.214,192.168.215").split(",")
STEM = PREFIX.strip("-")
# Host ports of the forwards (from the port base, see saltenv): vm1's SSH, vm2's
# SSH, vm1's UDP responder, one more of vm1's.
SSH1, SSH2, UDP1, HTTP1 = (port("nat_forwards", i) for i in range(4))
SSH1_RULE = f"{{guest: 22, host: {SSH1}}}"
UDP1_RULE = f"{{guest: 5353, proto: udp, host: {UDP1}}}"
HTTP1_RULE = f"{{guest: 80, host: {HTTP1}}}"
UDP_RESPONDER = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', 5353))\n"
    "while True:\n"
    "    data, peer = s.recvfrom(512)\n"
    "    s.sendto(b'guest:' + data, peer)\n"
)


def network_xml(index, prefix):
    return f"""<network>
  <name>{STEM}-nat{index}</name>
  <forward mode='nat'/>
  <bridge name='virbr-{STEM}{index}' stp='on' delay='0'/>
  <ip address='{prefix}.1' netmask='255.255.255.0'>
    <dhcp><range start='{prefix}.100' end='{prefix}.250'/></dhcp>
  </ip>
</network>"""


@pytest.fixture(scope="module")
def conn():
    # Written here when setup-host has not; libvirtd runs them only after a
    # restart, which the test marked restarts_libvirtd makes if they are not active.
    # The host's hook.conf is the machine's, not this checkout's: put back what
    # setup-host (or the user) wrote, or a hook keeps naming a checkout that a
    # CI run deletes afterwards.
    before = hookfiles.CONF.read_bytes() if hookfiles.CONF.exists() else None
    nathook.install()
    try:
        with connection.connected(URI) as c:
            yield c
    finally:
        if before is not None:
            hookfiles.CONF.write_bytes(before)


@pytest.fixture(scope="module")
def networks(conn):
    made = []
    for index, prefix in enumerate(NET_PREFIXES):
        xml = network_xml(index, prefix)
        made.append((conn.networkCreateXML(xml), xml))
    yield made
    with connection.connected(URI) as fresh:  # libvirtd may have restarted meanwhile
        for _, xml in made:
            name = xml.split("<name>")[1].split("<")[0]
            try:
                fresh.networkLookupByName(name).destroy()
            except libvirt.libvirtError:
                pass


def boot(name, network, nat_rules=None):
    values = {
        "nat_rules": nat_rules,
        "name": name,
        "base_domain": BASE,
        "clone_strategy": "quick",
        "nics": [network],
        "deploy": False,
        "memory": "768MB",
        "virt_type": "qemu",
    }
    with connection.connected(URI) as c, Rollback() as rollback:
        guest = provision.create(c, build_spec(values), rollback, lambda *_: None)
        rollback.forget()
        return guest.macs[0]


@pytest.fixture(scope="module")
def guests(conn, networks, base_domain):
    names = [unique("nat1"), unique("nat2")]
    nets = [networks[0][0].name(), networks[1][0].name()]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # vm2's forward comes from the profile key, applied by the create itself.
        macs = list(pool.map(boot, names, nets, [None, [{"guest": 22, "host": SSH2}]]))
    yield dict(zip(names, macs, strict=True))
    with connection.connected(URI) as fresh:
        from salt_kvm.virt import lifecycle

        for name in names:
            forwards.forget(name)
            try:
                lifecycle.remove(fresh, name)
            except SaltKvmError:
                pass


@pytest.fixture
def vm1_on_ssh1(guests):
    """vm1's SSH forwarded from SSH1, as test_apply_forwards_ssh_and_udp_into_the_guest
    leaves it (applied here when that test did not run first)."""
    vm1 = next(iter(guests))
    if nat.Rule(22, SSH1) not in forwards.current(vm1):
        forwards.apply(None, vm1, [{"guest": 22, "host": SSH1}], placement=_where(vm1))
    return vm1


@pytest.fixture(scope="module")
def udp_responder(guests):
    """The UDP responder on vm1's port 5353 (test_apply_forwards_ssh_and_udp_into_the_guest
    starts it too), started over the test network, not through a forward."""
    where = _where(next(iter(guests)))
    with ssh.connect(where.address, GUEST_USER, GUEST_PASSWORD, timeout=240) as session:
        session.put(UDP_RESPONDER.encode(), "/root/udp.py", 0o644)
        started = "{ nohup python3 /root/udp.py >/dev/null 2>&1 & }"
        session.check(f"ss -lun | grep -q ':5353 ' || {started}")


def guest_mac_via(port, timeout=240):
    with ssh.connect("127.0.0.1", GUEST_USER, GUEST_PASSWORD, port=port, timeout=timeout) as s:
        return s.check("cat /sys/class/net/eth0/address").strip()


def udp_ask(port, payload=b"ping", tries=30):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        for _ in range(tries):
            sock.sendto(payload, ("127.0.0.1", port))
            try:
                return sock.recvfrom(512)[0]
            except TimeoutError:
                continue
    return None


def kernel_and_state():
    table = firewall.nft("list", "table", "ip", nat.TABLE_NAME, check=False).stdout
    state = Store().path.read_text() if Store().path.exists() else ""
    return table, state


def salt_call(tmp_path, *args):
    proc = salt_call_proc(minion_config(tmp_path), *args)
    return json.loads(proc.stdout)["local"] if proc.stdout.strip() else proc.stderr


def test_apply_forwards_ssh_and_udp_into_the_guest(guests, tmp_path):
    vm1 = next(iter(guests))
    out = salt_call(tmp_path, "kvm_nat.apply", vm1, f"rules=[{SSH1_RULE}]")
    assert out["new"] == [{"guest": 22, "host": SSH1, "proto": "tcp", "host_address": None}]
    assert guest_mac_via(SSH1) == guests[vm1]
    rules = [{"guest": 22, "host": SSH1}, {"guest": 5353, "proto": "udp", "host": UDP1}]
    assert forwards.apply(None, vm1, rules, placement=_where(vm1))["new"][1]["host"] == UDP1
    with ssh.connect("127.0.0.1", GUEST_USER, GUEST_PASSWORD, port=SSH1) as session:
        session.put(UDP_RESPONDER.encode(), "/root/udp.py", 0o644)
        session.check("nohup python3 /root/udp.py >/dev/null 2>&1 &")
    assert udp_ask(UDP1) == b"guest:ping"
    listed = salt_call(tmp_path, "kvm_nat.list", vm1)[vm1]
    assert [(f["host"], f["proto"], f["active"]) for f in listed["forwards"]] == [
        (SSH1, "tcp", True),
        (UDP1, "udp", True),
    ]


def _where(name):
    with connection.connected(URI) as c:
        return forwards.locate(c, name)


def test_refusals_change_nothing(guests, vm1_on_ssh1, tmp_path):
    vm1, vm2 = guests
    before = kernel_and_state()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    cases = [
        ((vm2, "rules=[70000]"), "rules[0]: 70000 is out of range"),
        ((vm2, "rules=[{guest: 22, proto: sctp}]"), "rules[0].proto: 'sctp' is not a protocol"),
        ((vm2, f"rules=[{SSH1_RULE}]"), f"{SSH1}/tcp is already forwarded to {vm1}"),
        ((vm2, f"rules=[{{guest: 22, host: {busy_port}}}]"), "in use by a process on the host"),
        ((f"{PREFIX}no-such-domain", "rules=[22]"), "no domain named"),
        ((vm2, "rules=[{guest: 22, host_address: 198.51.100.1}]"), "not an address of this host"),
        ((vm2, "rules=[{guest: 22, proto: TCPX}]"), "rules[0].proto: 'TCPX' is not a protocol"),
        # Without rules, apply would remove every forward of vm1: refused.
        ((vm1,), "rules: required"),
    ]
    try:
        for args, message in cases:
            out = salt_call(tmp_path, "kvm_nat.apply", *args)
            assert message in json.dumps(out), (args, out)
            assert kernel_and_state() == before, args
    finally:
        busy.close()
    with pytest.raises(SaltKvmError, match="at most 2"):
        forwards.apply(None, vm2, [1, 2, 3], max_rules=2)
    with connection.connected(URI) as c:
        metadata = (
            "<metadata><ski:instance xmlns:ski='urn:salt-kvm:instance:1'>"
            "<ski:base>none</ski:base></ski:instance></metadata>"
        )
        for name, meta, message in [
            (f"{PREFIX}nat-nonet", metadata, "no interface on an active libvirt-managed"),
            (f"{PREFIX}nat-theirs", "", "was not created by salt-kvm"),
        ]:
            ghost = c.defineXML(
                f"<domain type='qemu'><name>{name}</name><memory>65536</memory>{meta}"
                "<os><type>hvm</type></os></domain>"
            )
            try:
                with pytest.raises(SaltKvmError, match=message):
                    forwards.apply(c, ghost.name(), [22])
            finally:
                ghost.undefine()
    assert kernel_and_state() == before


def test_two_guests_each_reach_the_right_one_also_from_guests(guests, vm1_on_ssh1):
    vm1, vm2 = guests
    assert forwards.current(vm2) == [nat.Rule(22, SSH2)]
    assert guest_mac_via(SSH1) == guests[vm1]
    assert guest_mac_via(SSH2) == guests[vm2]
    probe = "import socket; s = socket.create_connection(('{}', {}), 10); print(s.recv(7).decode())"
    gateway1, gateway2 = (f"{p}.1" for p in NET_PREFIXES)
    with ssh.connect("127.0.0.1", GUEST_USER, GUEST_PASSWORD, port=SSH2) as on_vm2:
        # From another network: through libvirt's forward rejects, as outside traffic.
        assert on_vm2.check(f'python3 -c "{probe.format(gateway2, SSH1)}"').strip() == "SSH-2.0"
    with ssh.connect("127.0.0.1", GUEST_USER, GUEST_PASSWORD, port=SSH1) as on_vm1:
        # Hairpin: vm1 reaches its own forward through the host.
        assert on_vm1.check(f'python3 -c "{probe.format(gateway1, SSH1)}"').strip() == "SSH-2.0"


def test_state_twice_and_test_mode(guests, tmp_path):
    vm1 = next(iter(guests))
    single = ("state.single", "kvm_nat.forwarded", vm1)
    rules = f"rules=[{SSH1_RULE}, {UDP1_RULE}, {HTTP1_RULE}]"
    before = kernel_and_state()
    (dry,) = salt_call(tmp_path, *single, rules, "test=True").values()
    assert dry["result"] is None and dry["changes"]["new"][1]["guest"] == 80
    # the default mapping (guest p -> host 10000 + p) in a dry run, which binds nothing
    (default,) = salt_call(tmp_path, *single, "rules=[22, 80]", "test=True").values()
    mapped = [(r["guest"], r["host"]) for r in default["changes"]["new"]]
    assert mapped == [(22, 10022), (80, 10080)]
    assert kernel_and_state() == before
    (first,) = salt_call(tmp_path, *single, rules).values()
    assert first["result"] is True and len(first["changes"]["new"]) == 3
    (second,) = salt_call(tmp_path, *single, rules).values()
    assert second["result"] is True and second["changes"] == {}
    (dry_again,) = salt_call(tmp_path, *single, rules, "test=True").values()
    assert dry_again["result"] is True and dry_again["changes"] == {}
    (back,) = salt_call(tmp_path, *single, f"rules=[{SSH1_RULE}, {UDP1_RULE}]").values()
    assert [r["guest"] for r in back["changes"]["new"]] == [22, 5353]
    assert guest_mac_via(SSH1) == guests[vm1]


def guest_reaches_host_loopback(session, where):
    """Whether a datagram the guest sends to 127.0.0.1 arrives at a host socket there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(3)
        port = listener.getsockname()[1]
        gw_mac = Path(f"/sys/class/net/{where.bridge}/address").read_text().strip()
        session.check(f"python3 /root/probe.py {where.address} 127.0.0.1 {port} {gw_mac}")
        try:
            return listener.recvfrom(512)[0] == b"guest-was-here"
        except TimeoutError:
            return False


def route_localnet(bridge):
    return (firewall.SYSCTL / bridge / "route_localnet").read_text().strip()


def test_guests_never_reach_the_hosts_loopback(guests):
    vm1 = next(iter(guests))
    where = _where(vm1)
    forwards.apply(None, vm1, [{"guest": 22, "host": SSH1}], placement=where)
    assert route_localnet(where.bridge) == "1"
    assert nat.GUARD + where.bridge in firewall.table_comments()["guard"]
    # Straight to the guest on the test's own network: removing the forward
    # below must not cut the session the probe runs in.
    with ssh.connect(where.address, GUEST_USER, GUEST_PASSWORD, timeout=240) as session:
        session.put(LOOPBACK_PROBE.encode(), "/root/probe.py", 0o644)
        # route_localnet on, the guard loaded: dropped.
        assert not guest_reaches_host_loopback(session, where)
        # The guard gone (as after `nft flush ruleset`) and route_localnet still
        # on: this is the exposure the invariant forbids; the probe sees it.
        firewall.nft("delete", "table", "ip", nat.TABLE_NAME)
        try:
            assert guest_reaches_host_loopback(session, where)
        finally:
            done = forwards.reapply()
        # Put back in the safe order: route_localnet off, table, route_localnet on.
        order = [
            f"route_localnet off on {where.bridge}",
            "table",
            f"route_localnet on {where.bridge}",
        ]
        assert [done.index(step) for step in order] == sorted(done.index(s) for s in order), done
        assert not guest_reaches_host_loopback(session, where)
        # The last forward on the bridge goes (kvm_nat.absent): route_localnet 0.
        forwards.apply(None, vm1, [])
        assert route_localnet(where.bridge) == "0"
        assert not guest_reaches_host_loopback(session, where)
    forwards.apply(None, vm1, [{"guest": 22, "host": SSH1}], placement=where)


def test_apply_says_when_the_hooks_are_not_active(guests, tmp_path):
    vm1 = next(iter(guests))
    hooks = [hookfiles.HOOKS_DIR / f"{d}.d" / hookfiles.HOOK_NAME for d in hookfiles.DRIVERS]
    times = [(h.stat().st_atime, h.stat().st_mtime) for h in hooks]
    later = time.time() + 60  # written after the running libvirtd started
    for hook in hooks:
        os.utime(hook, (later, later))
    try:
        out = salt_call(tmp_path, "kvm_nat.apply", vm1, f"rules=[{SSH1_RULE}, {HTTP1_RULE}]")
        assert "written after libvirtd started" in out["warning"], out
        assert "restart libvirtd" in out["warning"]
        listed = salt_call(tmp_path, "kvm_nat.list", vm1)[vm1]
        assert "written after libvirtd started" in listed["hooks"]
        (state,) = salt_call(
            tmp_path, "state.single", "kvm_nat.forwarded", vm1, f"rules=[{SSH1_RULE}]"
        ).values()
        assert "warning: the libvirt hooks were written after" in state["comment"]
        assert "warning" not in state["changes"]
    finally:
        for hook, (atime, mtime) in zip(hooks, times, strict=True):
            os.utime(hook, (atime, mtime))


def restart_libvirtd():
    pid = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout.split()
    if pid:
        os.kill(int(pid[0]), 15)
        while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
            time.sleep(0.2)
    subprocess.run(["libvirtd", "-d"], check=True)
    for _ in range(150):
        if subprocess.run(["virsh", "-c", URI, "version"], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("libvirtd did not come back")


@pytest.mark.restarts_libvirtd
def test_forwards_come_back_after_network_and_libvirtd_restarts(guests, networks, udp_responder):
    vm1, vm2 = guests
    net, xml = networks[0]
    rules = [{"guest": 22, "host": SSH1}, {"guest": 5353, "proto": "udp", "host": UDP1}]
    forwards.apply(None, vm1, rules, placement=_where(vm1))
    if not hookfiles.status()[0]:
        restart_libvirtd()  # libvirtd finds hook scripts only when it starts
    assert hookfiles.status() == (True, "active (libvirtd runs them)")
    log_before = _hook_log()
    # An empty kernel (as after a reboot) and a network restart: the network hook
    # re-attaches the guest to the new bridge and rebuilds the table.
    firewall.nft("delete", "table", "ip", nat.TABLE_NAME)
    with connection.connected(URI) as c:  # a fresh connection: libvirtd may have restarted
        c.networkLookupByName(net.name()).destroy()
        c.networkCreateXML(xml)
    assert guest_mac_via(SSH1) == guests[vm1]
    assert udp_ask(UDP1) == b"guest:ping"
    # An empty kernel and a libvirtd restart: the qemu reconnect hook rebuilds it.
    firewall.nft("delete", "table", "ip", nat.TABLE_NAME)
    subprocess.run(["iptables", "-w", "-D", "FORWARD", "-j", firewall.ACCEPT_CHAIN], check=True)
    restart_libvirtd()
    assert guest_mac_via(SSH1) == guests[vm1]
    assert guest_mac_via(SSH2) == guests[vm2]
    rules = firewall._iptables("-S", "FORWARD").stdout.splitlines()
    assert rules[1] == f"-A FORWARD -j {firewall.ACCEPT_CHAIN}"
    assert route_localnet(Store().load()[vm1].placement.bridge) == "1"
    new_lines = _hook_log()[len(log_before) :]
    assert "table" in new_lines and " ERROR " not in new_lines, new_lines


def _hook_log():
    path = hookfiles.LOG_FILE
    return path.read_text() if path.exists() else ""
