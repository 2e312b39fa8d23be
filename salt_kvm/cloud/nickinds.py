"""The kinds of NIC a profile's ``nics`` can ask for, and their own keys.

``network`` (a libvirt network) and ``bridge`` (a host bridge) are named by
their key; ``type: direct`` is macvtap on a host interface (``source``, with
``mode``). A bridge NIC may be an Open vSwitch port (``virtualport:
openvswitch``) with ``vlan`` tags. ``mtu`` applies to network and bridge NICs.

Checked here without libvirt: that ``source`` is one of the host's interfaces
is checked when the VM is made (:mod:`salt_kvm.cloud.hostcheck`).
"""

from __future__ import annotations

from typing import Any

from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import boolean, text, whole_number

KIND_NETWORK = "network"
KIND_BRIDGE = "bridge"
KIND_DIRECT = "direct"
KINDS = (KIND_NETWORK, KIND_BRIDGE, KIND_DIRECT)
# macvtap modes (libvirt's <source mode=...>). ``bridge`` is the default: guests
# on the same host interface reach each other (vepa needs a hairpin switch).
DIRECT_MODES = ("bridge", "vepa", "private", "passthrough")
DEFAULT_DIRECT_MODE = "bridge"
VIRTUALPORTS = ("openvswitch",)
VLAN_MIN, VLAN_MAX = 1, 4094
MTU_MIN, MTU_MAX = 68, 65535
KIND_KEYS = ("type", "source", "mode", "virtualport", "vlan", "trunk", "mtu")
# What the host's side of a macvtap NIC means for the guest's address: the host
# cannot talk to its own macvtap guests (unless, in vepa mode, the external
# switch reflects their traffic), so neither a lease nor its neighbour table
# knows them, and a master on this host cannot reach them.
MODE_VEPA = "vepa"
UNREACHABLE = (
    "a macvtap (direct) guest cannot talk to its own host (only in vepa mode through a "
    "switch that reflects its traffic): no libvirt DHCP lease and no entry in the host's "
    "neighbour table comes, and a master on this host cannot reach the address"
)


def kind_of(item: dict, where: str) -> str:
    """The NIC's kind: ``type`` when given, else the one of network/bridge it names."""
    given = [k for k in (KIND_NETWORK, KIND_BRIDGE) if item.get(k) not in (None, "")]
    kind = item.get("type")
    if kind in (None, ""):
        if len(given) != 1:
            raise SpecError(
                where,
                "needs exactly one of network or bridge (or type: direct with source)",
                ("network", "bridge", "type: direct"),
            )
        return given[0]
    if kind not in KINDS:
        raise SpecError(f"{where}.type", f"{kind!r} is not a NIC type", KINDS)
    others = [k for k in given if k != kind]
    if kind != KIND_DIRECT and kind not in given:
        problem = f"type {kind} needs {kind}: the name of the {kind}"
        problem += f", not {others[0]}" if others else ""
    elif others:
        problem = f"type {kind} does not take {others[0]}"
    else:
        return str(kind)
    raise SpecError(
        where, problem, "network: NAME, bridge: NAME, or type: direct with source: HOST_INTERFACE"
    )


def _only(item: dict, where: str, key: str, kind: str, why: str, accepted: str) -> None:
    if item.get(key) not in (None, "", []):
        raise SpecError(f"{where}.{key}", f"does not apply to a {kind} NIC: {why}", accepted)


def _vlans(value: Any, where: str) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise SpecError(f"{where}.vlan", "is an empty list", "a tag or a list of tags 1-4094")
    tags: list[int] = []
    for index, tag in enumerate(items):
        label = f"{where}.vlan" + (f"[{index}]" if isinstance(value, list) else "")
        number = whole_number(tag, label, VLAN_MIN, VLAN_MAX)
        if number in tags:
            raise SpecError(label, f"tag {number} is given twice", "distinct tags")
        tags.append(number)
    return tags


def parse_direct(item: dict, where: str) -> tuple[str, str]:
    """(source, mode) of a macvtap NIC; refuses what it cannot carry."""
    source = text(item, "source", required=True, label=f"{where}.source")
    assert source is not None
    mode = item.get("mode") or DEFAULT_DIRECT_MODE
    if mode not in DIRECT_MODES:
        raise SpecError(f"{where}.mode", f"{mode!r} is not a macvtap mode", DIRECT_MODES)
    _only(
        item,
        where,
        "virtualport",
        KIND_DIRECT,
        "Open vSwitch ports are bridge NICs",
        "bridge: OVS_BRIDGE with virtualport: openvswitch",
    )
    _only(
        item,
        where,
        "vlan",
        KIND_DIRECT,
        "libvirt tags VLANs on Open vSwitch ports only",
        "a bridge NIC with virtualport: openvswitch, or a host VLAN interface as source",
    )
    _only(item, where, "trunk", KIND_DIRECT, "no vlan on macvtap", "leave it out")
    _only(
        item,
        where,
        "mtu",
        KIND_DIRECT,
        "libvirt refuses an MTU on macvtap (the host interface's MTU applies)",
        "leave it out, or set the host interface's MTU",
    )
    _only(
        item,
        where,
        "ip",
        KIND_DIRECT,
        UNREACHABLE + "; a guest that sets its own address there is never deployed",
        "an ip on a network or bridge NIC beside it, or cloud_init.network_config",
    )
    return source, str(mode)


def parse_port(item: dict, where: str, kind: str) -> tuple[str | None, list[int], bool]:
    """(virtualport, vlan tags, trunk) of a network or bridge NIC."""
    for key in ("source", "mode"):
        _only(item, where, key, kind, "it is a key of type: direct", f"{kind}: NAME")
    virtualport = item.get("virtualport")
    if virtualport in (None, ""):
        virtualport = None
    elif virtualport not in VIRTUALPORTS:
        raise SpecError(
            f"{where}.virtualport", f"{virtualport!r} is not a virtual port type", VIRTUALPORTS
        )
    elif kind != KIND_BRIDGE:
        raise SpecError(
            f"{where}.virtualport",
            "applies to a bridge NIC: an Open vSwitch libvirt network sets it itself",
            "bridge: OVS_BRIDGE with virtualport: openvswitch",
        )
    vlans: list[int] = []
    if item.get("vlan") not in (None, ""):
        if virtualport != "openvswitch":
            raise SpecError(
                f"{where}.vlan",
                "needs virtualport: openvswitch: a Linux bridge or libvirt network NIC "
                "would start untagged or not at all",
                "bridge: OVS_BRIDGE, virtualport: openvswitch, vlan: 1-4094 or a list",
            )
        vlans = _vlans(item["vlan"], where)
    label = f"{where}.trunk"
    trunk = boolean({label: item.get("trunk")}, label, len(vlans) > 1)
    if item.get("trunk") not in (None, "") and not vlans:
        raise SpecError(f"{where}.trunk", "needs vlan tags", "vlan: [10, 20] with trunk")
    if len(vlans) > 1 and not trunk:
        raise SpecError(
            f"{where}.trunk",
            "several vlan tags make a trunk",
            "trunk: true (or leave it out), or one tag",
        )
    return virtualport, vlans, trunk


def parse_mtu(item: dict, where: str) -> int | None:
    if item.get("mtu") in (None, ""):
        return None
    return whole_number(item["mtu"], f"{where}.mtu", MTU_MIN, MTU_MAX)
