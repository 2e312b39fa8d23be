"""The host's side of NAT forwards: nft transactions, the accept ahead of
libvirt's forward rejects, route_localnet, listening sockets, bridge ports.

Everything here acts on the local kernel (the hypervisor salt-kvm runs on);
nothing calls libvirt, so the libvirt hooks can use it (a hook must never
call back into libvirtd).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
from pathlib import Path

from lxml import etree

from salt_kvm.errors import ForwardsBlocked, SaltKvmError
from salt_kvm.nat import rules as nat

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


def table_comments(family: str = nat.TABLE_FAMILY) -> dict[str, list[str]]:
    """Chain → comments of the rules now in salt-kvm's table of ``family``
    (``ip``, or ``ip6``; empty: no table)."""
    proc = nft("-j", "list", "table", family, nat.TABLE_NAME, check=False)
    if proc.returncode != 0:
        return {}
    found: dict[str, list[str]] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        rule = item.get("rule")
        if rule is not None:
            found.setdefault(rule["chain"], []).append(rule.get("comment", ""))
    return found


# ---- the accept ahead of libvirt's rejects ------------------------------------
#
# libvirt rejects new connections into a NAT network in its forward rules. A
# packet must pass every base chain of a hook, so an accept in salt-kvm's own
# table cannot overrule such a reject: the accept for our marked connections
# has to sit in libvirt's own rules, ahead of its rejects. Where those rules
# are depends on libvirt's firewall backend:
#
# - iptables (libvirt < 10.4, and >= 10.4 with firewall_backend = "iptables"):
#   chains LIBVIRT_FWI/FWO/FWX jumped to from FORWARD of iptables' filter table.
# - nftables (libvirt >= 10.4 with firewall_backend = "nftables"): table
#   ``ip libvirt_network``, base chain ``forward`` jumping to guest_output,
#   guest_input and guest_cross, which hold the rejects.

NETWORK_CONF = Path("/etc/libvirt/network.conf")
BACKENDS = ("iptables", "nftables")
LIBVIRT_NFT = ("ip", "libvirt_network")
LIBVIRT_NFT_CHAIN = "forward"
# The comment that finds salt-kvm's accept again in libvirt's nftables chain.
ACCEPT_TAG = "salt-kvm-forward-accept"
FIREWALLD = ("inet", "firewalld")
PROC = Path("/proc")


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([IPTABLES, "-w", "-t", "filter", *args], check=check)


def libvirt_uses_iptables() -> bool:
    """libvirt's iptables backend: its forward chains are in iptables' filter table."""
    if shutil.which(IPTABLES) is None:
        return False
    return _iptables("-S", "LIBVIRT_FWI", check=False).returncode == 0


def libvirt_uses_nftables() -> bool:
    """libvirt's nftables backend (>= 10.4): its table ``ip libvirt_network`` exists."""
    if shutil.which(NFT) is None:
        return False
    return nft("list", "chain", *LIBVIRT_NFT, LIBVIRT_NFT_CHAIN, check=False).returncode == 0


def configured_backend(path: Path | str | None = None) -> str | None:
    """``firewall_backend`` of libvirt's network.conf, or None when not set there."""
    try:
        text = Path(path or NETWORK_CONF).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.split("#", 1)[0].partition("=")
        if sep and key.strip() == "firewall_backend":
            return value.strip().strip("\"'")
    return None


def firewalld_running() -> bool:
    """firewalld's table in the kernel, or a firewalld process."""
    if shutil.which(NFT) and nft("list", "table", *FIREWALLD, check=False).returncode == 0:
        return True
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "firewalld":
                    return True
            except OSError:
                continue
    return False


def firewall() -> dict:
    """Where libvirt's forward rules are and whether salt-kvm's forwards can pass them.

    ``backends``: the backends whose rules the kernel holds now (both when a
    backend change left the other's rules behind); ``configured``: network.conf's
    choice; ``problem``: why forwards cannot work here, or None.
    """
    configured = configured_backend()
    found = [
        name
        for name, present in (
            ("iptables", libvirt_uses_iptables()),
            ("nftables", libvirt_uses_nftables()),
        )
        if present
    ]
    problem = available()
    if problem is None and firewalld_running():
        problem = (
            "firewalld is running: libvirt then hands its networks to firewalld zones, "
            "whose forward rules salt-kvm does not manage (not supported: forwards "
            "could be rejected there); stop firewalld or use libvirt's iptables or "
            "nftables backend without it"
        )
    if problem is None and configured is not None and configured not in BACKENDS:
        problem = (
            f"libvirt's firewall_backend {configured!r} ({NETWORK_CONF}) is not one "
            f"salt-kvm can pass: accepted {', '.join(BACKENDS)}"
        )
    wants_iptables = "iptables" in found or (not found and configured == "iptables")
    if problem is None and wants_iptables and shutil.which(IPTABLES) is None:
        problem = (
            "libvirt uses its iptables firewall backend but the iptables command is "
            "missing: salt-kvm cannot put its accept ahead of libvirt's rejects"
        )
    return {
        "backends": found,
        "configured": configured,
        "problem": problem,
        "accept": accept_in_place(found),
    }


def forward_problem() -> str | None:
    """Why forwards would be dead on this host (refuse them), or None."""
    return firewall()["problem"]


def passable(state: dict | None = None) -> tuple[bool, str]:
    """(whether marked connections pass libvirt's forward rules now, why in words)."""
    state = state or firewall()
    if state["problem"]:
        return False, state["problem"]
    if not state["backends"]:
        return True, "no libvirt forward rules in the kernel (no NAT network started)"
    missing = [b for b in state["backends"] if not state["accept"].get(b)]
    if missing:
        return False, (
            f"salt-kvm's accept is not first ahead of libvirt's {'/'.join(missing)} rules: "
            "connections from outside the host are rejected; run kvm_nat.reapply"
        )
    return True, f"accept first ahead of libvirt's {'/'.join(state['backends'])} rules"


def _nft_accept() -> str:
    mark = f"{nat.CT_MARK:#x}"
    return f'ct mark and {mark} == {mark} counter accept comment "{ACCEPT_TAG}"'


def nft_accept_rules() -> list[dict]:
    """The rules of libvirt's nftables ``forward`` chain, in order (nft's JSON)."""
    proc = nft("-j", "-a", "list", "chain", *LIBVIRT_NFT, LIBVIRT_NFT_CHAIN, check=False)
    if proc.returncode != 0:
        return []
    return [item["rule"] for item in json.loads(proc.stdout).get("nftables", []) if "rule" in item]


def _ensure_nft_accept() -> bool:
    """Our accept first in libvirt's nftables ``forward`` chain, once; whether it changed.

    One ``nft -f`` transaction deletes any stray copies (found by their
    comment) and inserts the rule at the head of the chain.
    """
    rules = nft_accept_rules()
    ours = [r for r in rules if r.get("comment") == ACCEPT_TAG]
    if rules and rules[0].get("comment") == ACCEPT_TAG and len(ours) == 1:
        return False
    family, table = LIBVIRT_NFT
    lines = [f"delete rule {family} {table} {LIBVIRT_NFT_CHAIN} handle {r['handle']}" for r in ours]
    lines.append(f"insert rule {family} {table} {LIBVIRT_NFT_CHAIN} {_nft_accept()}")
    nft("-f", "-", data="\n".join(lines) + "\n")
    return True


def _ensure_iptables_accept() -> bool:
    """iptables owns libvirt's table in this backend, so iptables writes the accept:
    one chain with one static rule (the conntrack mark our DNAT sets), jumped to
    first from FORWARD. Whether anything changed."""
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


def accept_in_place(backends: list[str]) -> dict[str, bool]:
    """Backend → whether salt-kvm's accept is first ahead of that backend's rules now."""
    state = {}
    if "iptables" in backends:
        forward = _iptables("-S", "FORWARD", check=False).stdout.splitlines()
        rules = [r for r in forward if r.startswith("-A ")]
        state["iptables"] = bool(rules) and rules[0] == f"-A FORWARD -j {ACCEPT_CHAIN}"
    if "nftables" in backends:
        rules = nft_accept_rules()
        state["nftables"] = bool(rules) and rules[0].get("comment") == ACCEPT_TAG
    return state


def ensure_forward_accept() -> bool:
    """Make every libvirt forward chain the kernel holds accept our marked
    connections first. Returns whether anything changed.

    Raises when forwards cannot pass libvirt's rules here (``forward_problem``):
    a forward must never be silently dead. With no libvirt rules in the kernel
    yet (no NAT network started), there is nothing to pass; the network
    ``started`` hook puts the accept in when libvirt writes them.
    """
    state = firewall()
    if state["problem"] is not None:
        raise ForwardsBlocked(state["problem"])
    changed = False
    if "iptables" in state["backends"]:
        changed |= _ensure_iptables_accept()
    if "nftables" in state["backends"]:
        changed |= _ensure_nft_accept()
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
    """The IPv4 and IPv6 addresses of this host's interfaces (IPv6 as
    ``ipaddress`` writes them, the form a parsed host_address has)."""
    proc = _run(["ip", "-j", "addr", "show"])
    return {
        str(ipaddress.ip_address(info["local"]))
        for link in json.loads(proc.stdout or "[]")
        for info in link.get("addr_info", [])
        if info.get("local")
    }


def bridge_addresses6(bridges: set[str]) -> dict[str, list[str]]:
    """Bridge → its global IPv6 addresses (a dual-stack libvirt network's host
    address); bridges without any are left out."""
    if not bridges:
        return {}
    proc = _run(["ip", "-j", "-6", "addr", "show", "scope", "global"], check=False)
    found: dict[str, list[str]] = {}
    for link in json.loads(proc.stdout or "[]"):
        if link.get("ifname") not in bridges:
            continue
        for info in link.get("addr_info", []):
            if info.get("local") and not info.get("tentative"):
                found.setdefault(link["ifname"], []).append(info["local"])
    return {bridge: sorted(found[bridge]) for bridge in sorted(found)}


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
