"""A static plan on a bridge without DHCP, through real salt-cloud: a
cluster.conf-style map gives a guest its MAC and address on a bridge the test
makes (a libvirt network with no DHCP, its bridge used as a plain ``bridge``
NIC); the guest configures the address from its seed's network-config, the
create waits for no lease, and the minion answers test.ping."""

import contextlib
import ipaddress
import random
import subprocess
import time

import libvirt
import pytest

from .cloudcheck import assert_gone, created
from .conftest import GUEST_PASSWORD, GUEST_USER, PREFIX, unique
from .guests import boot_guest, remove_guest

# The test image's own cloud-init settings disable network config (its boots
# use its DHCP file): a base made from it without that setting takes the seed's.
PREPARE_BASE = (
    "rm -f /etc/cloud/cloud.cfg.d/91-salt-kvm-network.cfg"
    " && cloud-init clean --logs"
    " && rm -f /etc/ssh/ssh_host_* && truncate -s 0 /etc/machine-id"
    " && sync && (sleep 1; systemctl poweroff) >/dev/null 2>&1 &"
)
MAP = """{%- set cluster %}
# name  MAC  IP  RAM  disk  cpus  hostgroups
NAME  MAC  IP  768  4  1  web
{%- endset %}
planned:
{%- for line in cluster.splitlines() if line.strip() and not line.startswith("#") %}
{%- set f = line.split() %}
  - {{ f[0] }}:
      memory: {{ f[3] }}
      cpus: {{ f[5] }}
      nics:
        - bridge: BRIDGE
          mac: "{{ f[1] }}"
          ip: {{ f[2] }}
          prefix: 24
          gateway: GATEWAY
      grains:
        hostgroups: {{ f[6].split(",") | tojson }}
{%- endfor %}
"""


def _free_subnet() -> ipaddress.IPv4Network:
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for third in range(230, 250):
        net = ipaddress.IPv4Network(f"192.168.{third}.0/24")
        if f"192.168.{third}." not in used:
            return net
    raise AssertionError("no free 192.168.230-249.0/24 subnet for the test bridge")


@pytest.fixture(scope="module")
def bridge(hv):
    """A bridge with no DHCP on it, made (and removed) by the test: a libvirt
    network without <dhcp> and without <forward>, so nothing leaves the host."""
    name = unique("plan")
    net = _free_subnet()
    host = next(net.hosts())
    device = f"{PREFIX[:4]}{name[-6:]}"[:15].replace("-", "")
    xml = (
        f"<network><name>{name}</name><bridge name='{device}' stp='off'/>"
        f"<ip address='{host}' prefix='24'/></network>"
    )
    network = hv.networkCreateXML(xml)  # transient: gone with the test
    try:
        yield device, net, str(host)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            network.destroy()


@pytest.fixture(scope="module")
def plan_base(hv, base_domain):
    """The test base with cloud-init allowed to configure the network."""
    name = unique("planbase")
    guest = boot_guest(hv, base_domain, name)
    try:
        guest.run(PREPARE_BASE)
        deadline = time.monotonic() + 300
        while guest.dom.isActive():
            assert time.monotonic() < deadline, f"{name} did not power off"
            time.sleep(1)
        yield name
    finally:
        remove_guest(hv, name)


def test_a_planned_address_on_a_bridge_without_dhcp_pings(
    hv, salt, plan_base, bridge, pool_volumes
):
    device, net, gateway = bridge
    name = unique("static")
    address = str(net.network_address + 11)
    mac = "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))
    salt.write_profiles(
        {
            "planned": {
                "provider": "test-kvm",
                "base_domain": plan_base,
                "clone_strategy": "quick",
                "ssh_username": GUEST_USER,
                "password": GUEST_PASSWORD,
                "script": "salt-preinstalled",
                "minion": salt.minion_settings(),
                "wait_for_ip_timeout": 300,
            }
        },
        "planned.conf",
    )
    mapfile = salt.conf / "cloud.maps.d" / "plan.map"
    text = MAP.replace("NAME  MAC  IP", f"{name}  {mac}  {address}")
    mapfile.write_text(text.replace("BRIDGE", device).replace("GATEWAY", gateway))
    before = pool_volumes()
    started = time.monotonic()
    info = created(salt.cloud("-m", str(mapfile)), name)
    took = time.monotonic() - started
    try:
        assert info["ip_address"] == address, info
        timings = info["timings"]
        # no lease is waited for: the address is the plan's at once
        assert timings["ip"] - timings["start"] < 2, timings
        assert salt.salt(name, "test.ping")[name] is True
        shown = salt.salt(name, "cmd.run", "ip -4 -o addr show dev eth0")[name]
        assert f"{address}/24" in shown, shown
        assert salt.salt(name, "grains.get", "hostgroups")[name] == ["web"]
        # the seed was ejected and deleted once the deploy reached the guest
        cdroms = [d for d in info["disks"] if d["device"] == "cdrom"]
        assert cdroms and all(d["path"] is None for d in cdroms)
        print(f"\nstatic plan create took {took:.0f} s: {timings}")
    finally:
        salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, pool_volumes)
