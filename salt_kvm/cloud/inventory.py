"""What salt-cloud -Q/-F/-S, show_instance and --list-images report.

Built from bulk calls (one domain listing, one lease table per network) so a
listing does not grow in libvirt round trips with every guest's agent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import libvirt

from salt_kvm import redact
from salt_kvm.cloud import addresses, sharehost
from salt_kvm.virt import nodedev
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.units import human_size

STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "stopping",
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def state_of(dom: libvirt.virDomain) -> str:
    return STATES.get(dom.state()[0], "unknown")


def lease_table(conn: libvirt.virConnect) -> dict[str, list[str]]:
    """MAC → usable leased addresses, over every active libvirt network."""
    table: dict[str, list[str]] = {}
    for net in conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE):
        try:
            leases = net.DHCPLeases()
        except libvirt.libvirtError:
            continue
        for lease in leases:
            if addresses.usable(lease["ipaddr"]):
                table.setdefault(lease["mac"].lower(), []).append(lease["ipaddr"])
    return table


@dataclass
class Facts:
    """What bulk calls tell about many domains at once, keyed by UUID."""

    domains: list[libvirt.virDomain] = field(default_factory=list)
    stats: dict[str, dict] = field(default_factory=dict)
    autostart: set[str] = field(default_factory=set)
    leases: dict[str, list[str]] = field(default_factory=dict)


_STATS = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BLOCK


def gather(conn: libvirt.virConnect, doms: list[libvirt.virDomain] | None = None) -> Facts:
    """State, disk capacities and autostart of ``doms`` (default: every domain) and
    the lease table, in a fixed number of calls however many domains there are."""
    if doms is None:
        records = conn.getAllDomainStats(_STATS, 0)
    else:
        records = conn.domainListGetStats(doms, _STATS, 0)
    autostart = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)
    return Facts(
        domains=[dom for dom, _ in records],
        stats={dom.UUIDString(): stats for dom, stats in records},
        autostart={dom.UUIDString() for dom in autostart},
        leases=lease_table(conn),
    )


def _disk_sizes(xml: Domain, stats: dict) -> list[dict]:
    capacity = {
        stats.get(f"block.{i}.path"): stats.get(f"block.{i}.capacity")
        for i in range(stats.get("block.count", 0))
    }
    disks = []
    for disk in xml.disks:
        entry = {"target": disk.target_dev, "device": disk.device, "path": disk.path}
        if disk.path and disk.device == "disk" and capacity.get(disk.path) is not None:
            entry["capacity"] = capacity[disk.path]
        disks.append(entry)
    return disks


def _reserved(info: dict) -> dict[tuple[str, int], str]:
    """(MAC, IP version) → the address reserved for it (``network|mac|ip``
    records of the create: nics[].ip, nics[].ip6)."""
    found: dict[tuple[str, int], str] = {}
    for item in info.get("reservations") or []:
        _, mac, ip = item.split("|")
        found[(mac.lower(), ipaddress.ip_address(ip).version)] = ip
    return found


def _nics(xml: Domain, info: dict | None = None) -> list[dict]:
    """Each NIC's kind (network, bridge, direct...), what it is on and its
    DHCP reservations (``ip``, ``ip6``)."""
    shown = []
    reserved = _reserved(info or {})
    for iface in xml.interfaces:
        entry = {"type": iface.type, "source": iface.source, "mac": iface.mac, "model": iface.model}
        mac = (iface.mac or "").lower()
        extra = {
            "ip": reserved.get((mac, 4)),
            "ip6": reserved.get((mac, 6)),
            "mode": iface.source_mode if iface.type == "direct" else None,
            "virtualport": iface.virtualport,
            "vlan": iface.vlans or None,
            "trunk": iface.vlan_trunk,
            "mtu": iface.mtu,
        }
        entry.update({k: v for k, v in extra.items() if v is not None})
        shown.append(entry)
    return shown


def _hostdevs(xml: Domain) -> list[str]:
    shown = []
    for dev in xml.hostdevs:
        if dev.vendor is not None:
            ids = nodedev.number(dev.vendor) or 0, nodedev.number(dev.product) or 0
            shown.append(f"{dev.type} {ids[0]:04x}:{ids[1]:04x}")
        elif dev.type == "pci":
            d, b, s, f = nodedev.pci_address(dev)
            shown.append(f"pci {d:04x}:{b:02x}:{s:02x}.{f:x}")
        else:
            shown.append(f"{dev.type} bus {dev.address_bus} device {dev.address_device}")
    return shown


def _shown(source: str | list[str] | None) -> str | list[str] | None:
    return redact.url(source) if isinstance(source, str) else source


def describe(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    facts: Facts | None = None,
    xml: Domain | None = None,
) -> dict:
    """One domain as salt-cloud shows it; ``facts`` from :func:`gather` when
    describing many, so the only call per domain is its XML."""
    facts = gather(conn, [dom]) if facts is None else facts
    xml = Domain(dom.XMLDesc(0)) if xml is None else xml
    stats = facts.stats.get(dom.UUIDString(), {})
    info = xml.managed_info() or {}
    state = STATES.get(stats.get("state.state", libvirt.VIR_DOMAIN_NOSTATE), "unknown")
    macs = [i.mac.lower() for i in xml.interfaces if i.mac]
    ips = [ip for mac in macs for ip in facts.leases.get(mac, [])] if state == "running" else []
    if state == "running" and not ips:
        # Not on a libvirt network with DHCP (a bridge): the host's ARP table,
        # one call for this domain only.
        ips = addresses.lookup(dom, addresses.SOURCE_ARP, macs)
    vcpu = xml.node.find("vcpu")
    vcpus = int(vcpu.get("current", vcpu.text)) if vcpu is not None else None
    disks = _disk_sizes(xml, stats)
    root = next((d.get("capacity") for d in disks if d.get("capacity")), None)
    memory_mib = xml.memory_mib()
    size = f"{vcpus} vCPU, {memory_mib} MiB" + (f", {human_size(root)} disk" if root else "")
    return {
        "id": xml.name,
        "name": xml.name,
        "uuid": dom.UUIDString(),
        "state": state,
        "public_ips": [ip for ip in ips if not ipaddress.ip_address(ip).is_private],
        "private_ips": [ip for ip in ips if ipaddress.ip_address(ip).is_private],
        "size": size,
        # older salt-kvm stored the URL as given: never show its credentials
        "image": _shown(info.get("image_source") or info.get("base")),
        "base_domain": None if info.get("image") else info.get("base"),
        "clone_strategy": info.get("strategy"),
        "created": info.get("created"),
        "virt_type": xml.type,
        "vcpus": vcpus,
        "memory_mib": memory_mib,
        "macs": macs,
        "nics": _nics(xml, info),
        "hostdevs": _hostdevs(xml),
        "disks": disks,
        "shares": sharehost.describe(xml),
        "autostart": dom.UUIDString() in facts.autostart,
        "description": xml.description,
    }


def managed(conn: libvirt.virConnect) -> dict[str, dict]:
    """Every guest salt-kvm created: bulk calls for state, disks, autostart and
    leases, plus each domain's XML (libvirt has no bulk call for definitions,
    and the XML is where the salt-kvm marker lives)."""
    facts = gather(conn)
    result = {}
    for dom in facts.domains:
        try:
            xml = Domain(dom.XMLDesc(0))
        except libvirt.libvirtError:
            continue  # undefined since the listing
        if xml.managed_info() is not None:
            result[xml.name] = describe(conn, dom, facts, xml)
    return result


def managed_min(conn: libvirt.virConnect) -> dict[str, dict]:
    """Every guest salt-kvm created, by name, with only its id and state."""
    result = {}
    for dom in conn.listAllDomains(0):
        try:
            xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            state = state_of(dom)
        except libvirt.libvirtError:
            continue  # undefined since the listing
        if xml.managed_info() is not None:
            result[xml.name] = {"id": xml.name, "state": state}
    return result


def base_domains(conn: libvirt.virConnect) -> dict[str, dict]:
    result = {}
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_SHUTOFF):
        xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        if xml.managed_info() is None and any(d.device == "disk" for d in xml.disks):
            result[xml.name] = {
                "name": xml.name,
                "virt_type": xml.type,
                "vcpus": xml.vcpus,
                "memory_mib": xml.memory_mib(),
                "disks": [d.path for d in xml.disks if d.device == "disk"],
                "description": xml.description,
            }
    return result
