"""The host's side of NAT forwards: nft transactions, the accept ahead of
libvirt's forward rejects, route_localnet, listening sockets, bridge ports.

Everything here acts on the local kernel (the hypervisor salt-kvm runs on);
nothing calls libvirt, so the libvirt hooks can use it (a hook must never
call back into libvirtd).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

from lxml import etree

from . import nat
from .errors import SaltKvmError

log = logging.getLogger(__name__)

NFT = "nft"
IPTABLES = "iptables"
ACCEPT_CHAIN = "SALT_KVM_FWD"
SYSCTL = Path("/proc/sys/net/ipv4/conf")
PROC_NET = Path("/proc/net")
QEMU_STATUS = Path("/run/libvirt/qemu")
NETWORK_STATUS = Path("/run/libvirt/network")
# Every nft run, so a caller (bench/nat) can show one call is one transaction.
NFT_RUNS: list[list[str]] = []


def _run(
    cmd: list[str], data: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise SaltKvmError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def nft(*args: str, data: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [NFT, *args]
    NFT_RUNS.append(cmd)
    return _run(cmd, data, check)


def available() -> str | None:
    """Why forwards cannot work on this host, or ``None``."""
    if shutil.which(NFT) is None:
        return "the nft command (Debian package nftables) is not installed"
    return None


def replace_table(script: str) -> None:
    """Run one nft file: the kernel commits it whole or not at all."""
    nft("-f", "-", data=script)


def table_comments() -> dict[str, list[str]]:
    """Chain → comments of the rules now in salt-kvm's table (empty: no table)."""
    proc = nft("-j", "list", "table", nat.TABLE_FAMILY, nat.TABLE_NAME, check=False)
    if proc.returncode != 0:
        return {}
    found: dict[str, list[str]] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        rule = item.get("rule")
        if rule is not None:
            found.setdefault(rule["chain"], []).append(rule.get("comment", ""))
    return found


# ---- the accept ahead of libvirt's rejects ------------------------------------


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([IPTABLES, "-w", "-t", "filter", *args], check=check)


def libvirt_uses_iptables() -> bool:
    """libvirt 9 writes its forward rejects with iptables(-nft) in ``ip filter``."""
    if shutil.which(IPTABLES) is None:
        return False
    return _iptables("-S", "LIBVIRT_FWI", check=False).returncode == 0


def ensure_forward_accept() -> bool:
    """Make ``FORWARD`` accept our marked connections before libvirt's chains.

    A packet must pass every base chain of a hook, so an accept in our own
    table cannot overrule libvirt's ``reject``; the accept has to sit in
    libvirt's own table, ahead of its jumps. iptables owns that table, so
    iptables writes it: one chain with one static rule (the conntrack mark
    our DNAT sets), jumped to first. Returns whether anything changed.
    """
    if not libvirt_uses_iptables():
        return False
    changed = False
    if _iptables("-S", ACCEPT_CHAIN, check=False).returncode != 0:
        _iptables("-N", ACCEPT_CHAIN)
        changed = True
    accept = ["-m", "connmark", "--mark", f"{nat.CT_MARK:#x}/{nat.CT_MARK:#x}", "-j", "ACCEPT"]
    if _iptables("-C", ACCEPT_CHAIN, *accept, check=False).returncode != 0:
        _iptables("-A", ACCEPT_CHAIN, *accept)
        changed = True
    rules = [r for r in _iptables("-S", "FORWARD").stdout.splitlines() if r.startswith("-A ")]
    jump = f"-A FORWARD -j {ACCEPT_CHAIN}"
    if not rules or rules[0] != jump:
        while jump in rules:
            _iptables("-D", "FORWARD", "-j", ACCEPT_CHAIN)
            rules.remove(jump)
        _iptables("-I", "FORWARD", "1", "-j", ACCEPT_CHAIN)
        changed = True
    return changed


# ---- route_localnet --------------------------------------------------------


def route_localnet(bridge: str, on: bool = True) -> bool:
    """Let (``on``) or stop DNAT from 127.0.0.1 leaving through ``bridge``;
    whether it changed.

    With it on, a guest on the bridge could reach the host's 127.0.0.0/8:
    callers set it only while salt-kvm's guard rule for the bridge is loaded
    (``forwards.sync_kernel``). A bridge is re-created by every network start,
    so this is set again then.
    """
    path = SYSCTL / bridge / "route_localnet"
    if not path.exists():
        return False  # the network is down; its start hook sets it
    value = "1" if on else "0"
    if path.read_text().strip() == value:
        return False
    path.write_text(value + "\n")
    return True


def route_localnet_on(bridges: set[str]) -> set[str]:
    """Which of ``bridges`` have route_localnet set now."""
    found = set()
    for bridge in bridges:
        path = SYSCTL / bridge / "route_localnet"
        try:
            if path.read_text().strip() != "0":
                found.add(bridge)
        except OSError:
            continue
    return found


def libvirt_bridges() -> set[str]:
    """The bridges of libvirt's active networks, from its status files (no libvirt call)."""
    found = set()
    for path in NETWORK_STATUS.glob("*.xml"):
        try:
            root = etree.parse(str(path)).getroot()
        except (etree.XMLSyntaxError, OSError):
            continue
        for bridge in root.iter("bridge"):
            if bridge.get("name"):
                found.add(bridge.get("name"))
    return found


def guarded_bridges() -> set[str]:
    """Bridges whose guard rule (drop guests' traffic to 127.0.0.0/8) is loaded now."""
    comments = table_comments().get("guard", [])
    return {c[len(nat.GUARD) :] for c in comments if c.startswith(nat.GUARD)}


# ---- the host's addresses ------------------------------------------------------


def local_addresses() -> set[str]:
    """The IPv4 addresses of this host's interfaces."""
    proc = _run(["ip", "-j", "-4", "addr", "show"])
    return {
        info["local"]
        for link in json.loads(proc.stdout or "[]")
        for info in link.get("addr_info", [])
        if info.get("local")
    }


# ---- sockets already on a port --------------------------------------------


def _local_ports(proto: str) -> set[tuple[str, int]]:
    """(hex address, port) of TCP listeners or bound UDP sockets, IPv4 and IPv6."""
    found = set()
    for name in (proto, f"{proto}6"):
        path = PROC_NET / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, _, port = fields[1].rpartition(":")
            if proto == "tcp" and fields[3] != "0A":  # LISTEN
                continue
            found.add((address, int(port, 16)))
    return found


def local_ports() -> set[tuple[str, int]]:
    """(proto, port) taken by host processes (any address): a forward would hide them."""
    return {(proto, port) for proto in nat.PROTOCOLS for _, port in _local_ports(proto)}


# ---- guests' bridge ports ----------------------------------------------------


def running_taps(network: str, domains: set[str]) -> list[tuple[str, str]]:
    """(tap, bridge) of running ``domains``' interfaces on ``network``.

    Read from libvirt's status files, not its API (hooks must not call libvirt).
    """
    taps = []
    for name in sorted(domains):
        path = QEMU_STATUS / f"{name}.xml"
        if not path.exists():
            continue
        try:
            root = etree.parse(str(path)).getroot()
        except etree.XMLSyntaxError:
            continue
        for iface in root.iter("interface"):
            source = iface.find("source")
            target = iface.find("target")
            bridge = iface.find("actual/source")
            if source is None or target is None or source.get("network") != network:
                continue
            if bridge is not None and bridge.get("bridge") and target.get("dev"):
                taps.append((target.get("dev"), bridge.get("bridge")))
    return taps


def reattach(tap: str, bridge: str) -> bool:
    """Put a guest's tap back on its network's (new) bridge; whether it was off."""
    master = Path(f"/sys/class/net/{tap}/master")
    if not Path(f"/sys/class/net/{tap}").exists() or not Path(f"/sys/class/net/{bridge}").exists():
        return False
    if master.exists() and master.resolve().name == bridge:
        return False
    _run(["ip", "link", "set", "dev", tap, "master", bridge])
    _run(["ip", "link", "set", "dev", tap, "up"])
    return True


def hairpin(tap: str) -> bool:
    """Let a guest reach its own forward; whether it changed.

    With br_netfilter (bridge-nf-call-iptables=1, as here), DNAT back onto the
    same bridge is bridged, not routed: the frame must leave through the port
    it came in on, which a bridge port only does in hairpin mode.
    """
    path = Path(f"/sys/class/net/{tap}/brport/hairpin_mode")
    if not path.exists() or path.read_text().strip() == "1":
        return False
    path.write_text("1\n")
    return True
