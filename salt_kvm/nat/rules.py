"""NAT port forwards (host port → guest port): rule parsing and the nftables ruleset.

Pure logic: no libvirt, no subprocess. ``forwards`` resolves guest addresses,
keeps the desired state and runs ``nft``; this module decides what the rules
are and renders them as ONE nftables script that replaces salt-kvm's table in
a single transaction.

The mapping guest port p → host port 10000 + p (SlapOS's ``nat-rules``) is
defined here once: ``host_port_for``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass
from typing import Any

from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import check_keys, whole_number

HOST_PORT_OFFSET = 10000
SLAPOS_DEFAULT_PORTS = (22, 80, 443)
PROTOCOLS = ("tcp", "udp")
DEFAULT_PROTOCOL = "tcp"
DEFAULT_MAX_RULES = 64
RULE_KEYS = ("guest", "host", "proto", "host_address")

TABLE_FAMILY = "ip"
TABLE_NAME = "salt_kvm"
# The IPv6 forwards: a second table of the same name, replaced in the same
# transaction (a table holds one family; ``inet`` would move the IPv4 rules).
TABLE6_FAMILY = "ip6"
# The conntrack mark bit our DNAT sets, so one static rule ahead of libvirt's
# forward rejects (see ``nft_glue``) accepts exactly our forwarded connections.
CT_MARK = 0x00100000
LOOPBACK = "127.0.0.0/8"
LOOPBACK6 = "::1"
# host_address: not given = the host's loopback and its guests' bridges (the
# documented, safe default); EVERY (or "*") = every address of the host, the
# public ones too: the operator must say so.
EVERY = "0.0.0.0"
# ``::``: every IPv6 address of the host (the IPv6 side only; 0.0.0.0 is the IPv4 one).
EVERY6 = "::"
HOST_ADDRESSES = (
    "not given (loopback and the guests' bridges), 0.0.0.0 or * (every IPv4 address of "
    "this host), :: (every IPv6 address of this host), or one IPv4 or IPv6 address this "
    "host has"
)
PORTS = "a whole number from 1 to 65535"
ACCEPTED_RULES = (
    "true (ports 22 80 443), a port, a list of ports, a space-separated string of ports, "
    "or mappings with guest, host, proto (tcp|udp), host_address"
)


def host_port_for(guest_port: int) -> int:
    """The host port a guest port is forwarded from unless one is given."""
    return HOST_PORT_OFFSET + guest_port


@dataclass(frozen=True, order=True)
class Rule:
    """One forward of a domain: ``host_address:host`` on the host → ``guest`` in the guest."""

    guest: int
    host: int
    proto: str = DEFAULT_PROTOCOL
    host_address: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        """What must be unique on the host."""
        return (self.proto, self.host_address or "", self.host)

    def clashes(self, other: Rule) -> bool:
        """Same protocol and port on the same (or on a wider) host address."""
        wide = (None, EVERY, EVERY6)
        return (
            self.proto == other.proto
            and self.host == other.host
            and (
                self.host_address in wide
                or other.host_address in wide
                or self.host_address == other.host_address
            )
        )

    @property
    def ipv6_only(self) -> bool:
        """Whether it listens on IPv6 only (an IPv6 host_address, or ``::``):
        nothing for it in the IPv4 table."""
        return self.host_address is not None and ":" in self.host_address

    @property
    def reaches_loopback(self) -> bool:
        """Whether it listens on 127.0.0.1: DNAT from there needs route_localnet."""
        address = self.host_address
        if address in (None, EVERY):
            return True
        return not self.ipv6_only and ipaddress.IPv4Address(address).is_loopback

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        address = self.host_address
        where = f"[{address}]:" if self.ipv6_only else f"{address}:" if address else ""
        return f"{where}{self.host}/{self.proto} -> {self.guest}"


def parse_port(value: Any, key: str) -> int:
    return whole_number(value.strip() if isinstance(value, str) else value, key, 1, 65535)


def _host_address(value: Any, key: str) -> str | None:
    if value in (None, ""):
        return None
    if value in (EVERY, "*"):
        return EVERY
    try:
        address = ipaddress.ip_address(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise SpecError(key, f"{value!r} is not an IP address", HOST_ADDRESSES) from None
    return str(address)  # compressed, lower case: ``::`` is EVERY6


def parse_rule(item: Any, key: str) -> Rule:
    """A port (forwarded from 10000+port over TCP) or a mapping."""
    if not isinstance(item, dict):
        guest = parse_port(item, key)
        return Rule(guest=guest, host=_default_host(guest, key))
    check_keys(item, RULE_KEYS, key)
    if item.get("guest") is None:
        raise SpecError(f"{key}.guest", "is required", PORTS)
    guest = parse_port(item["guest"], f"{key}.guest")
    host = item.get("host")
    host = _default_host(guest, f"{key}.host") if host is None else parse_port(host, f"{key}.host")
    proto = parse_proto(item.get("proto"), f"{key}.proto")
    address = _host_address(item.get("host_address"), f"{key}.host_address")
    return Rule(guest=guest, host=host, proto=proto, host_address=address)


def parse_proto(value: Any, key: str = "proto") -> str:
    """``tcp``/``udp`` in any case; anything else is refused."""
    if value is None or value == "":
        return DEFAULT_PROTOCOL
    proto = value.strip().lower() if isinstance(value, str) else None
    if proto not in PROTOCOLS:
        raise SpecError(key, f"{value!r} is not a protocol", PROTOCOLS)
    return proto


def _default_host(guest: int, key: str) -> int:
    host = host_port_for(guest)
    if host > 65535:
        raise SpecError(
            key,
            f"guest port {guest} has no default host port ({host} > 65535)",
            "an explicit host port from 1 to 65535",
        )
    return host


def parse_rules(
    value: Any, key: str = "nat_rules", max_rules: int = DEFAULT_MAX_RULES
) -> list[Rule]:
    """Validate a rule set: the profile's ``nat_rules`` or ``kvm_nat.apply``'s ``rules``."""
    if value is True:
        value = list(SLAPOS_DEFAULT_PORTS)
    elif value in (None, False, "", []):
        return []
    if isinstance(value, str):
        value = [v for v in re.split(r"[\s,]+", value.strip()) if v]
    elif isinstance(value, int | dict):
        value = [value]
    if not isinstance(value, list | tuple):
        raise SpecError(key, f"{value!r} is not a set of rules", ACCEPTED_RULES)
    if len(value) > max_rules:
        raise SpecError(
            key, f"{len(value)} rules are more than the maximum", f"at most {max_rules}"
        )
    rules: list[Rule] = []
    for index, item in enumerate(value):
        rule = parse_rule(item, f"{key}[{index}]")
        for earlier in rules:
            if rule.clashes(earlier):
                raise SpecError(
                    f"{key}[{index}]",
                    f"host port {rule.host}/{rule.proto} is used twice",
                    "distinct host ports",
                )
        rules.append(rule)
    return sorted(rules)


NO_RULES = (
    "a list of ports or {guest, host, proto, host_address} mappings, True for 22 80 443; "
    "remove_all=True (the kvm_nat.absent state) to remove every forward"
)


def check_rule_set(rules: Any, remove_all: bool = False) -> Any:
    """``rules`` as ``kvm_nat.apply`` and the ``forwarded`` state take them: a
    set that is empty or absent (``[]``, ``''``, ``0``: a pillar lookup that
    found nothing) would remove every forward, which only ``remove_all`` asks."""
    empty = rules is None or rules is False or (isinstance(rules, str) and not rules.strip())
    empty = empty or (isinstance(rules, list | tuple | dict | int) and not rules)
    if remove_all:
        if not empty:
            raise SpecError(
                "remove_all", "removes every forward: it takes no rules", "rules or remove_all"
            )
        return []
    if rules is None:
        raise SpecError(
            "rules", "required: without it every forward of the domain would be removed", NO_RULES
        )
    if empty:
        raise SpecError(
            "rules",
            f"{rules!r} would remove every forward of the domain (refused, nothing changed)",
            NO_RULES,
        )
    return rules


def rule_from_dict(data: dict) -> Rule:
    return Rule(**{k: data[k] for k in RULE_KEYS if k in data})


# ---- the ruleset -----------------------------------------------------------


@dataclass(frozen=True, order=True)
class Forward:
    """A rule bound to where the guest is now: its address and network."""

    domain: str
    rule: Rule
    address: str
    bridge: str
    subnet: str
    address6: str = ""  # the guest's IPv6 address on a dual-stack network
    subnet6: str = ""

    @property
    def answers_ipv4(self) -> bool:
        """Whether the IPv4 table has it (not for an IPv6 host_address or ``::``)."""
        return not self.rule.ipv6_only

    @property
    def answers_ipv6(self) -> bool:
        """Whether the IPv6 table DNATs it: the guest has an IPv6 address (the
        host's record) and the rule listens by default, on ``::`` or on one
        IPv6 address of the host other than ``::1`` (never DNATed: a relay)."""
        address = self.rule.host_address
        listens6 = address is None or (self.rule.ipv6_only and address != LOOPBACK6)
        return bool(self.address6) and listens6

    @property
    def comment(self) -> str:
        """Names the forward in the kernel's table (read back by ``list``)."""
        return comment_for(self.domain, self.rule)


def comment_for(domain: str, rule: Rule) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", domain)
    return f"{safe}|{rule.proto}|{rule.host_address or ''}|{rule.host}"


GUARD = "guard|"
CHAINS = {
    # name: (type, hook, priority)
    "guard": ("filter", "prerouting", "-300"),
    "prerouting": ("nat", "prerouting", "-100"),
    "output": ("nat", "output", "-100"),
    "postrouting": ("nat", "postrouting", "100"),
}


def _dnat(forward: Forward, arriving: str | None = None) -> str:
    """The DNAT of ``forward``; ``arriving``: the bridges a default forward is
    reachable from in ``prerouting`` (None: the host's own traffic, ``output``)."""
    rule = forward.rule
    if rule.host_address is None:
        match = "fib daddr type local"
        if arriving is not None:
            match = f"iifname {arriving} {match}"
    elif rule.host_address == EVERY:
        match = "fib daddr type local"
    else:
        match = f"ip daddr {rule.host_address}"
    return _dnat_to(match, forward, forward.address)


def _dnat_to(match: str, forward: Forward, target: str) -> str:
    """The DNAT rule of ``forward`` for packets ``match`` selects, to ``target``
    (an address as nft writes it: ``10.0.0.5`` or ``[fd00::5]``), marked for
    the masquerade rules."""
    rule = forward.rule
    return (
        f"{match} {rule.proto} dport {rule.host} "
        f"ct mark set ct mark or {CT_MARK:#x} "
        f"dnat to {target}:{rule.guest} "
        f'comment "{forward.comment}"'
    )


def ruleset(forwards: list[Forward]) -> dict[str, list[str]]:
    """Chain name → rules (nft syntax), in order. Empty when there is nothing to forward."""
    forwards = sorted(f for f in forwards if f.answers_ipv4)
    if not forwards:
        return {}
    bridges = sorted({f.bridge for f in forwards})
    subnets = sorted({(f.bridge, f.subnet) for f in forwards})
    marked = f"ct mark and {CT_MARK:#x} == {CT_MARK:#x}"
    bridge_set = "{ " + ", ".join(f'"{b}"' for b in bridges) + " }"
    return {
        # route_localnet may be on for these bridges (so 127.0.0.1:port works
        # from the host): nothing arriving from a guest may reach 127/8 through
        # it. One rule per bridge, named, so the kernel can be asked which
        # bridges are guarded before route_localnet is set on them.
        "guard": [f'iifname "{b}" ip daddr {LOOPBACK} drop comment "{GUARD}{b}"' for b in bridges],
        "prerouting": [_dnat(f, bridge_set) for f in forwards],
        "output": [_dnat(f) for f in forwards],
        "postrouting": [
            # From the host's loopback: the guest must answer the bridge address.
            f"{marked} ip saddr {LOOPBACK} masquerade",
            # Hairpin: a guest reaching a forward on its own network.
            *(f'{marked} oifname "{b}" ip saddr {s} masquerade' for b, s in subnets),
        ],
    }


def _dnat6(forward: Forward, arriving: str | None = None) -> str:
    """The IPv6 DNAT of a forward: a default one to the host's own IPv6
    addresses, from the host itself (``output``) or from the guests' bridges;
    ``::`` to every IPv6 address of the host, from anywhere; one address:
    that one. Never ``::1``: the kernel drops a packet with a loopback source
    that would leave ``lo``, and IPv6 has no route_localnet (``relays``
    carries ``[::1]`` in userspace)."""
    address = forward.rule.host_address
    if address not in (None, EVERY6):
        match = f"ip6 daddr {address}"
    else:
        match = f"fib daddr type local ip6 daddr != {LOOPBACK6}"
        if address is None and arriving is not None:
            match = f"iifname {arriving} {match}"
    return _dnat_to(match, forward, f"[{forward.address6}]")


def ruleset6(forwards: list[Forward]) -> dict[str, list[str]]:
    """The IPv6 table's chains: the forwards whose guest has an IPv6 address."""
    forwards = sorted(f for f in forwards if f.answers_ipv6)
    if not forwards:
        return {}
    bridge_set = "{ " + ", ".join(f'"{b}"' for b in sorted({f.bridge for f in forwards})) + " }"
    marked = f"ct mark and {CT_MARK:#x} == {CT_MARK:#x}"
    subnets = sorted({(f.bridge, f.subnet6) for f in forwards})
    # The host's own connections to a forward on one of its other IPv6
    # addresses (a host_address, ``::``) come from that address: the guest may
    # have no route back to it (an isolated network's RAs give no default
    # route), so they leave with the bridge's address.
    own = sorted({f.bridge for f in forwards if f.rule.host_address is not None})
    return {
        "prerouting": [_dnat6(f, bridge_set) for f in forwards],
        "output": [_dnat6(f) for f in forwards],
        "postrouting": [
            # Hairpin: a guest reaching a forward on its own network.
            *(f'{marked} oifname "{b}" ip6 saddr {s} masquerade' for b, s in subnets),
            *(f'{marked} oifname "{b}" fib saddr type local masquerade' for b in own),
        ],
    }


def localnet_bridges(forwards: list[Forward]) -> list[str]:
    """The bridges that need route_localnet: those of forwards listening on 127.0.0.1."""
    return sorted({f.bridge for f in forwards if f.rule.reaches_loopback})


def _table_body(chains: dict[str, list[str]], family: str = TABLE_FAMILY) -> list[str]:
    lines = [f"table {family} {TABLE_NAME} {{"]
    for name, rules in chains.items():
        kind, hook, priority = CHAINS[name]
        lines.append(f"  chain {name} {{")
        lines.append(f"    type {kind} hook {hook} priority {priority}; policy accept;")
        lines.extend(f"    {rule}" for rule in rules)
        lines.append("  }")
    lines.append("}")
    return lines


def script(forwards: list[Forward]) -> str:
    """One ``nft -f`` transaction that replaces the tables (IPv4, IPv6) with
    exactly ``forwards``.

    ``add`` then ``delete`` makes the delete valid whether or not the table
    exists; the kernel applies the whole file atomically or not at all.
    """
    lines = [
        f"add table {TABLE_FAMILY} {TABLE_NAME}",
        f"delete table {TABLE_FAMILY} {TABLE_NAME}",
    ]
    chains = ruleset(forwards)
    if chains:
        lines.extend(_table_body(chains))
    lines.append(f"add table {TABLE6_FAMILY} {TABLE_NAME}")
    lines.append(f"delete table {TABLE6_FAMILY} {TABLE_NAME}")
    chains6 = ruleset6(forwards)
    if chains6:
        lines.extend(_table_body(chains6, TABLE6_FAMILY))
    return "\n".join(lines) + "\n"
