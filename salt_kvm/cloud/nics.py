"""The profile's ``nics``: validated NICs and their planned addresses.

A fixed ``ip`` on a libvirt network becomes a DHCP host reservation there. On a
``bridge`` nobody hands out addresses: the ``ip`` (with ``prefix`` or
``netmask``, and optional ``gateway`` and ``dns``) is the guest's static plan,
written into the NoCloud seed as cloud-init network config, and the address
salt-cloud deploys to (``ip_source: plan``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from salt_kvm.cloud import choices, nickinds
from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import check_keys, object_name, one_of

NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139", "vmxnet3", "ne2k_pci", "pcnet")
NIC_KEYS = (
    "network",
    "bridge",
    "mac",
    "ip",
    "ip6",
    "prefix",
    "netmask",
    "gateway",
    "dns",
    "model",
) + nickinds.KIND_KEYS
# Keys of a bridge NIC's static plan (a libvirt network's DHCP gives them there).
PLAN_KEYS = ("prefix", "netmask", "gateway", "dns")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
DEFAULT_MODEL = "virtio"


@dataclass
class NicSpec:
    network: str | None = None
    bridge: str | None = None
    mac: str | None = None
    ip: str | None = None
    # A static IPv6 reservation on a dual-stack libvirt network (its DHCPv6).
    ip6: str | None = None
    model: str = DEFAULT_MODEL
    # A bridge NIC's static plan (None/empty on a libvirt network).
    prefix: int | None = None
    gateway: str | None = None
    dns: list[str] = field(default_factory=list)
    # The NIC's kind (nickinds.KINDS; network or bridge by the key given when
    # left out) and what only some kinds take.
    kind: str = ""
    source: str | None = None  # direct: the host interface
    mode: str | None = None  # direct: the macvtap mode
    virtualport: str | None = None  # bridge: openvswitch
    vlans: list[int] = field(default_factory=list)
    trunk: bool = False
    mtu: int | None = None

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = nickinds.KIND_BRIDGE if self.bridge else nickinds.KIND_NETWORK

    @property
    def static(self) -> bool:
        """The guest configures this address itself (no DHCP serves it)."""
        return bool(self.bridge and self.ip)


def _address(value: Any, key: str) -> ipaddress.IPv4Address:
    try:
        ip = ipaddress.ip_address(str(value))
    except ValueError:
        raise SpecError(
            key, f"{value!r} is not an IP address", "an IPv4 address such as 192.168.122.50"
        ) from None
    if ip.version != 4 or not choices.usable(str(ip)):
        raise SpecError(key, f"{ip} cannot be reserved", "a unicast IPv4 address")
    assert isinstance(ip, ipaddress.IPv4Address)
    return ip


def _prefix(item: dict, where: str, cidr: int | None) -> int:
    """A bridge address's prefix length: from ``ip: A/N``, ``prefix`` or ``netmask``."""
    accepted = "prefix: 24 (or netmask: 255.255.255.0, or ip: 192.168.1.10/24)"
    given = [k for k in ("prefix", "netmask") if item.get(k) not in (None, "")]
    if cidr is not None:
        given.insert(0, "ip")
    if len(given) > 1:
        raise SpecError(
            f"{where}.{given[1]}", f"the prefix is given twice ({' and '.join(given)})", accepted
        )
    if not given:
        raise SpecError(
            f"{where}.ip",
            "an address on a bridge needs its prefix: no DHCP server tells the guest",
            accepted,
        )
    if cidr is not None:
        return cidr
    key = given[0]
    value = item[key]
    try:
        if key == "prefix":
            if isinstance(value, bool) or not str(value).lstrip("/").isdigit():
                raise ValueError
            return ipaddress.IPv4Network(f"0.0.0.0/{str(value).lstrip('/')}").prefixlen
        return ipaddress.IPv4Network(f"0.0.0.0/{value}").prefixlen
    except ValueError:
        raise SpecError(f"{where}.{key}", f"{value!r} is not a {key}", accepted) from None


def _plan(nic: NicSpec, item: dict, where: str, cidr: int | None) -> None:
    """The static plan of a bridge NIC with an ``ip``; checked as a whole."""
    assert nic.ip is not None
    nic.prefix = _prefix(item, where, cidr)
    if not 8 <= nic.prefix <= 30:
        why = "leaves no room for a host" if nic.prefix > 30 else "is no LAN"
        given = "ip" if cidr is not None else "netmask" if item.get("netmask") else "prefix"
        raise SpecError(f"{where}.{given}", f"/{nic.prefix} {why}", "a prefix of 8 to 30")
    subnet = ipaddress.IPv4Interface(f"{nic.ip}/{nic.prefix}").network
    if nic.ip in (str(subnet.network_address), str(subnet.broadcast_address)):
        raise SpecError(
            f"{where}.ip",
            f"{nic.ip} is the {'network' if nic.ip == str(subnet.network_address) else 'broadcast'}"
            f" address of {subnet}",
            f"a host address of {subnet}",
        )
    if item.get("gateway") not in (None, ""):
        gateway = _address(item["gateway"], f"{where}.gateway")
        if gateway not in subnet or str(gateway) == nic.ip:
            why = "is the NIC's own address" if str(gateway) == nic.ip else f"is outside {subnet}"
            raise SpecError(
                f"{where}.gateway", f"{gateway} {why}", f"another host address of {subnet}"
            )
        nic.gateway = str(gateway)
    dns = item.get("dns")
    if dns not in (None, "", []):
        items = [dns] if isinstance(dns, str) else dns
        if not isinstance(items, list):
            raise SpecError(f"{where}.dns", f"{dns!r} is not a list of addresses", "DNS servers")
        nic.dns = [str(_address(d, f"{where}.dns")) for d in items]


def _ip(nic: NicSpec, item: dict, where: str) -> int | None:
    """Set ``nic.ip``; returns the prefix of an ``A/N`` form (bridges only)."""
    raw = str(item["ip"])
    address, slash, length = raw.partition("/")
    if slash and (nic.network or not length.isdigit()):
        raise SpecError(
            f"{where}.ip",
            f"{raw!r} is not an IP address"
            + (" (a libvirt network's DHCP gives the prefix)" if nic.network else ""),
            "an IPv4 address such as 192.168.122.50"
            + ("" if nic.network else ", or 192.168.1.10/24 on a bridge"),
        )
    nic.ip = str(_address(address if slash else item["ip"], f"{where}.ip"))
    if nic.mac is None:
        raise SpecError(
            f"{where}.ip",
            "a fixed ip needs a fixed mac to "
            + ("reserve it for" if nic.network else "match the guest's NIC by"),
            "mac and ip together",
        )
    return int(length) if slash else None


def _ip6(nic: NicSpec, item: dict, where: str) -> str:
    """``nic.ip6``: reserved in the network's IPv6 DHCP for the DUID-LL made
    from the NIC's MAC (libvirt keys IPv6 reservations by DUID, not MAC)."""
    accepted = "a global or unique-local IPv6 address such as fd00:160::50 (no prefix)"
    if nic.network is None:
        raise SpecError(
            f"{where}.ip6",
            "an IPv6 reservation is made in a libvirt network's DHCPv6",
            "network, mac and ip6 together (a dual-stack libvirt network)",
        )
    try:
        address = ipaddress.IPv6Address(str(item["ip6"]).strip())
    except ValueError:
        raise SpecError(
            f"{where}.ip6", f"{item['ip6']!r} is not an IPv6 address", accepted
        ) from None
    if address.is_link_local or address.is_multicast or address.is_loopback:
        raise SpecError(f"{where}.ip6", f"{address} cannot be reserved", accepted)
    if address.is_unspecified or address.ipv4_mapped is not None:
        raise SpecError(f"{where}.ip6", f"{address} cannot be reserved", accepted)
    if nic.mac is None:
        raise SpecError(
            f"{where}.ip6",
            "a fixed ip6 needs a fixed mac: the reservation's DUID is made from it",
            "mac and ip6 together",
        )
    nic.ip6 = str(address)
    return nic.ip6


def _kind_keys(nic: NicSpec, item: dict, where: str) -> None:
    """The keys that depend on the NIC's kind (nickinds)."""
    if nic.kind == nickinds.KIND_DIRECT:
        nic.source, nic.mode = nickinds.parse_direct(item, where)
    else:
        nic.virtualport, nic.vlans, nic.trunk = nickinds.parse_port(item, where, nic.kind)
    nic.mtu = nickinds.parse_mtu(item, where)


def parse_nics(value: Any, key: str = "nics") -> list[NicSpec]:
    accepted = (
        "a list of network names or mappings with network|bridge (or type: direct with "
        "source, mode), mac, ip, ip6 (a dual-stack network), model, mtu, virtualport, vlan, "
        "trunk "
        "(and prefix|netmask, gateway, dns with an ip on a bridge)"
    )
    if not isinstance(value, list) or not value:
        raise SpecError(key, f"{value!r} is not a list of NICs", accepted)
    nics: list[NicSpec] = []
    macs: set[str] = set()
    fixed: dict[str, int] = {}
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        if isinstance(item, str):
            item = {"network": item}
        if not isinstance(item, dict):
            raise SpecError(where, f"{item!r} is not a NIC", accepted)
        check_keys(item, NIC_KEYS, where)
        nic = NicSpec(
            kind=nickinds.kind_of(item, where),
            network=object_name(item, "network", label=f"{where}.network"),
            bridge=object_name(item, "bridge", label=f"{where}.bridge"),
            model=one_of(item, "model", NIC_MODELS, DEFAULT_MODEL, f"{where}.model"),
        )
        _kind_keys(nic, item, where)
        if item.get("mac") is not None:
            mac = str(item["mac"]).lower()
            if not MAC_RE.fullmatch(mac) or int(mac[:2], 16) & 1:
                raise SpecError(
                    f"{where}.mac",
                    f"{item['mac']!r} is not a unicast MAC address",
                    "six colon-separated hex bytes, e.g. 52:54:00:12:34:56",
                )
            if mac in macs:
                raise SpecError(f"{where}.mac", f"{mac} is used twice", "distinct MACs")
            macs.add(mac)
            nic.mac = mac
        cidr = _ip(nic, item, where) if item.get("ip") is not None else None
        if item.get("ip6") not in (None, ""):
            ip6 = _ip6(nic, item, where)
            if ip6 in fixed:
                raise SpecError(
                    f"{where}.ip6",
                    f"{ip6} is used twice (nics[{fixed[ip6]}] has it)",
                    "distinct IPs",
                )
            fixed[ip6] = index
        for plan_key in PLAN_KEYS:
            if item.get(plan_key) not in (None, "", []) and not nic.static:
                raise SpecError(
                    f"{where}.{plan_key}",
                    "only applies with an ip on a bridge"
                    + (" (a libvirt network's DHCP gives it)" if nic.network else ""),
                    "bridge, mac and ip with it, or leave it out",
                )
        if nic.static:
            _plan(nic, item, where, cidr)
        if nic.ip is not None:
            if nic.ip in fixed:
                raise SpecError(
                    f"{where}.ip",
                    f"{nic.ip} is used twice (nics[{fixed[nic.ip]}] has it)",
                    "distinct IPs",
                )
            fixed[nic.ip] = index
        nics.append(nic)
    return nics


def planned(nics: list[NicSpec] | None) -> list[str]:
    """The addresses of the static plan, in NIC order (``ip_source: plan``)."""
    return [n.ip for n in nics or [] if n.static and n.ip]


def check_plan(nics: list[NicSpec] | None, ip_source: str, source_given: bool) -> str:
    """The VM's address source with its NICs' plan: ``plan`` when a bridge NIC
    has an ip (no lease ever comes on a bridge), refused when it contradicts."""
    static = [i for i, n in enumerate(nics or []) if n.static]
    if not static:
        if ip_source == choices.SOURCE_PLAN:
            raise SpecError(
                "ip_source",
                "plan needs an ip on a bridge NIC (nics[].bridge with mac, ip, prefix)",
                "nics[].ip on a bridge, or another source: "
                + ", ".join(s for s in choices.SOURCES if s != choices.SOURCE_PLAN),
            )
        _check_direct_source(nics, ip_source, source_given)
        if nics and not any(n.network for n in nics) and ip_source == choices.SOURCE_LEASE:
            raise SpecError(
                "ip_source",
                f"{'ip-learning (the default)' if not source_given else repr(ip_source)} reads "
                "libvirt's DHCP leases, which exist only on libvirt networks, and every NIC "
                "is on a bridge or macvtap: no address would ever come",
                f"{choices.SOURCE_AGENT} (the image runs the guest agent), {choices.SOURCE_ARP} "
                f"(the host's neighbour table), {choices.SOURCE_AUTO}, or nics[].ip with "
                "prefix on a bridge NIC (a static plan)",
            )
        return ip_source
    if source_given and ip_source != choices.SOURCE_PLAN:
        raise SpecError(
            "ip_source",
            f"{ip_source!r} contradicts the static address of nics[{static[0]}]: the guest "
            "configures it itself and salt-cloud uses it as planned (no lease comes on a bridge)",
            f"{choices.SOURCE_PLAN} (or leave ip_source out)",
        )
    for index, nic in enumerate(nics or []):
        if nic.mac is None:
            raise SpecError(
                f"nics[{index}].mac",
                f"is needed: nics[{static[0]}].ip gives the guest a network config, which names "
                "every NIC by its MAC",
                "a mac on every NIC of a VM with a static ip",
            )
    return choices.SOURCE_PLAN


def unreachable(nics: list[NicSpec] | None) -> bool:
    """Every NIC is macvtap outside vepa: the host cannot reach the guest."""
    return bool(nics) and all(
        n.kind == nickinds.KIND_DIRECT and n.mode != nickinds.MODE_VEPA for n in nics or []
    )


def _check_direct_source(nics: list[NicSpec] | None, ip_source: str, source_given: bool) -> None:
    """Only the guest agent finds a guest whose every NIC is macvtap (the
    neighbour table too in vepa mode, through a reflecting switch)."""
    if not nics or any(n.kind != nickinds.KIND_DIRECT for n in nics):
        return
    refused = (choices.SOURCE_LEASE,) + ((choices.SOURCE_ARP,) if unreachable(nics) else ())
    if ip_source in refused:
        shown = "ip-learning (the default)" if not source_given else repr(ip_source)
        raise SpecError(
            "ip_source",
            f"{shown} cannot find a guest whose every NIC is type direct: {nickinds.UNREACHABLE}",
            f"{choices.SOURCE_AGENT} (the image runs the guest agent), or a second NIC on a "
            "libvirt network or bridge for the host to reach the guest by",
        )
