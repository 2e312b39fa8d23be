"""What a freshly provisioned guest spent its first boot on, read from inside it.

After a variant of ``bench/provision`` answered its first ``test.ping``, the
guest's journal (monotonic timestamps: seconds since its kernel started) gives
the instants below, and systemd's accounting the CPU the minion used. This is
what shows where the time after the DHCP lease goes, and what no driver can
take away: a minion's own start on the guest's vCPU.
"""

from __future__ import annotations

import re
import time

import libvirt
import paramiko

# (key, journal text); the first matching line wins.
MARKERS = (
    ("lease", "DHCPv4 address"),
    # Where a deploy can begin: sshd listening (SSH), cloud-init's bootcmd
    # queueing salt-kvm's start unit (cloud-init).
    ("sshd_ready", "Server listening on 0.0.0.0 port 22"),
    ("bootcmd", "Running as unit: salt-kvm-minion-start"),
    ("cloud_init", "Starting cloud-init.service"),
    ("minion_started", "Started salt-minion.service"),
    ("minion_setup", "Setting up the Salt Minion"),
    ("minion_ready", "Minion is ready to receive requests"),
    ("first_job_done", "execution finished, return_data: True"),
)
_LINE = re.compile(r"^\[\s*(\d+\.\d+)\]")


def guest_address(conn: libvirt.virConnect, name: str) -> str:
    dom = conn.lookupByName(name)
    ifaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
    for iface in ifaces.values():
        for addr in iface.get("addrs") or []:
            if addr["type"] == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                return addr["addr"]
    raise RuntimeError(f"{name} has no DHCP lease")


def _ssh(address: str, password: str, wait: float) -> paramiko.SSHClient:
    """sshd may come late on a first boot (host keys are made then)."""
    deadline = time.monotonic() + wait
    while True:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # a throwaway guest
        try:
            client.connect(address, username="root", password=password, timeout=10)
            return client
        except (OSError, paramiko.SSHException):
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def _run(client: paramiko.SSHClient, command: str) -> str:
    _, out, _ = client.exec_command(command)
    return out.read().decode(errors="replace")


def parse(journal: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in journal.splitlines():
        stamp = _LINE.match(line)
        if not stamp:
            continue
        for key, text in MARKERS:
            if key not in found and text in line:
                found[key] = float(stamp.group(1))
    return found


def read(conn: libvirt.virConnect, name: str, password: str, wait: float = 240) -> dict:
    """The guest's first-boot instants (s since its kernel started) and the minion's CPU (s)."""
    client = _ssh(guest_address(conn, name), password, wait)
    try:
        figures: dict = parse(_run(client, "journalctl -b -o short-monotonic --no-pager"))
        cpu = _run(client, "systemctl show -p CPUUsageNSec --value salt-minion").strip()
        if cpu.isdigit():
            figures["minion_cpu"] = int(cpu) / 1e9
    finally:
        client.close()
    return figures


def spans(figures: dict) -> dict[str, float]:
    """The spans that matter, from the instants ``read`` returned."""
    out = {}
    pairs = (
        ("lease_to_minion_started", "lease", "minion_started"),
        ("minion_start_to_ready", "minion_started", "minion_ready"),
        ("ready_to_first_job_done", "minion_ready", "first_job_done"),
        ("lease_to_first_job_done", "lease", "first_job_done"),
    )
    for key, start, end in pairs:
        if start in figures and end in figures:
            out[key] = round(figures[end] - figures[start], 1)
    # The guest's own wait after its lease before a deploy can begin (none when
    # sshd listened first).
    if "lease" in figures and "sshd_ready" in figures:
        out["lease_to_sshd"] = round(max(0.0, figures["sshd_ready"] - figures["lease"]), 1)
    if "lease" in figures and "bootcmd" in figures:
        out["lease_to_bootcmd"] = round(figures["bootcmd"] - figures["lease"], 1)
    if "minion_cpu" in figures:
        out["minion_cpu"] = round(figures["minion_cpu"], 1)
    return out
