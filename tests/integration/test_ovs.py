"""One booted guest on an Open vSwitch bridge, through real salt-cloud.

The bridge is the test's own (OVS's userspace datapath, ``datapath_type=netdev``:
the bed's kernel has no openvswitch module, see docs/testbed.rst). A veth pair
joins it to the test network's L2: its OVS end is an access port with the
guest's VLAN tag, its other end a port of the test network's Linux bridge. The
guest so gets its DHCP lease from the test network's dnsmasq and reaches the
test master, and nothing else (network rule: test networks and loopback).

The userspace datapath reads and writes kernel devices (the guest's tap, the
veth) through packet sockets and leaves TCP/UDP checksums that a sender
offloaded (CHECKSUM_PARTIAL) unfinished: the receiver drops them (seen here:
the guest's DHCP lease came, SSH never answered, InCsumErrors rose on both
sides). Both senders so compute checksums themselves: the veth's host end
(host to guest) and the guest's NIC (guest to host, by a cloud-init runcmd;
salt-cloud's SSH deploy retries until then). The kernel datapath of a real
host does not need this.

Skipped, with the reason, where Open vSwitch is not installed or its daemons
do not run (``SALT_KVM_GUEST_FEATURES=1 scripts/setup-host`` provides both).
"""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from salt_kvm.virt.domain import Domain

from .cloudcheck import assert_gone, created, sized_profile
from .conftest import NETWORK, PREFIX, unique

TAG = 42
IFNAMSIZ = 15  # the kernel's longest interface name
# Turn transmit checksum offload off (ethtool -K DEV tx off, without ethtool:
# neither the bed nor the guest image has it) on the named interfaces, or on
# every one but lo. Run on the host and, through cloud-init, in the guest.
TX_CSUM_OFF = """
import fcntl, os, socket, struct, sys, ctypes
SIOCETHTOOL, ETHTOOL_STXCSUM = 0x8946, 0x17
devs = sys.argv[1:] or [d for d in os.listdir("/sys/class/net") if d != "lo"]
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    for dev in devs:
        value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0))
        ifreq = struct.pack("16sP", dev.encode(), ctypes.addressof(value)) + bytes(16)
        fcntl.ioctl(sock, SIOCETHTOOL, ifreq)
"""


def run(*cmd: str, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def vsctl(*args: str, check: bool = True) -> str:
    # --timeout: without ovs-vswitchd, a change waits for it forever.
    return run("ovs-vsctl", "--timeout=20", *args, check=check)


def ovs_missing() -> str | None:
    """Why Open vSwitch cannot carry a guest here, or None."""
    if shutil.which("ovs-vsctl") is None:
        return "ovs-vsctl is not installed (Debian: openvswitch-switch)"
    db = subprocess.run(
        ["ovs-vsctl", "--timeout=5", "show"], capture_output=True, text=True, check=False
    )
    if db.returncode != 0:
        return f"ovsdb-server does not answer: ovs-vsctl show: {db.stderr.strip()}"
    switch = subprocess.run(
        ["ovs-appctl", "--timeout=5", "-t", "ovs-vswitchd", "version"],
        capture_output=True,
        text=True,
        check=False,
    )
    if switch.returncode != 0:
        return f"ovs-vswitchd does not run: ovs-appctl version: {switch.stderr.strip()}"
    return None


def ovs_bridges() -> list[str]:
    return vsctl("list-br").split()


def remove_ovs_leftovers() -> None:
    """What an interrupted earlier run of this module left: its bridges and veths."""
    for bridge in ovs_bridges():
        if bridge.startswith(f"{PREFIX}ovs"):
            vsctl("--if-exists", "del-br", bridge)
    links = run("ip", "-o", "link", "show").splitlines()
    for line in links:
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}ov") and name.endswith("h"):
            run("ip", "link", "del", name, check=False)


@pytest.fixture(scope="module")
def ovs_bridge(hv):
    """An OVS bridge (netdev datapath) whose VLAN ``TAG`` is the test network's L2."""
    reason = ovs_missing()
    if reason:
        pytest.skip(reason)
    remove_ovs_leftovers()
    suffix = uuid.uuid4().hex[:4]
    bridge, host_end, ovs_end = (
        f"{PREFIX}ovs{suffix}",
        f"{PREFIX}ov{suffix}h",
        f"{PREFIX}ov{suffix}o",
    )
    assert max(map(len, (bridge, host_end, ovs_end))) <= IFNAMSIZ, (bridge, host_end, ovs_end)
    test_bridge = hv.networkLookupByName(NETWORK).bridgeName()
    try:
        vsctl("add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=netdev")
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ovs_end)
        for end in (host_end, ovs_end):
            run("ip", "link", "set", end, "up")
        vsctl("add-port", bridge, ovs_end, f"tag={TAG}")
        run("python3", "-c", TX_CSUM_OFF, host_end)
        run("ip", "link", "set", host_end, "master", test_bridge)
        yield bridge, ovs_end
    finally:
        vsctl("--if-exists", "del-br", bridge, check=False)
        run("ip", "link", "del", host_end, check=False)  # takes its peer with it
    assert bridge not in ovs_bridges()


def guest_port(hv, name: str) -> str:
    (iface,) = Domain(hv.lookupByName(name).XMLDesc(0)).node.findall("devices/interface")
    return iface.find("target").get("dev")


def test_a_guest_on_an_ovs_access_port_pings_and_its_port_goes_with_it(
    hv, salt, base_domain, pool_volumes, ovs_bridge
):
    bridge, ovs_end = ovs_bridge
    name = unique("ovs")
    before = pool_volumes()
    nics = [{"bridge": bridge, "virtualport": "openvswitch", "vlan": TAG}]
    cloud_init = {
        "files": {"/root/tx-csum-off.py": TX_CSUM_OFF},
        "runcmd": ["python3 /root/tx-csum-off.py"],
    }
    profile = sized_profile(
        base_domain, salt, nics=nics, ip_source="qemu-agent", cloud_init=cloud_init
    )
    salt.write_profiles({"ovs": profile}, "ovs.conf")
    try:
        info = created(salt.cloud("-p", "ovs", name), name)
        (nic,) = info["nics"]
        assert (nic["type"], nic["source"], nic["virtualport"], nic["vlan"]) == (
            "bridge",
            bridge,
            "openvswitch",
            [TAG],
        ), nic
        assert salt.salt(name, "test.ping") == {name: True}
        port = guest_port(hv, name)
        assert sorted(vsctl("list-ports", bridge).split()) == sorted([ovs_end, port])
        assert vsctl("get", "port", port, "tag") == str(TAG)
        assert vsctl("get", "port", port, "trunks") == "[]"
        mac = vsctl("get", "interface", port, "external_ids:attached-mac").strip('"')
        assert mac == nic["mac"]
        salt.cloud("-d", name)
    finally:
        if name in {d.name() for d in hv.listAllDomains(0)}:
            salt.cloud("-d", name, check=False)
    assert_gone(hv, salt, name, before, pool_volumes)
    assert vsctl("list-ports", bridge).split() == [ovs_end]
