"""What salt-cloud -Q/-F/-S, show_instance and --list-images report.

Built from bulk calls (one domain listing, one lease table per network) so a
listing does not grow in libvirt round trips with every guest's agent.
"""

from __future__ import annotations

import ipaddress

import libvirt

from . import addresses
from .domxml import Domain
from .units import human_size

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


def _disk_sizes(conn: libvirt.virConnect, xml: Domain) -> list[dict]:
    disks = []
    for disk in xml.disks:
        entry = {"target": disk.target_dev, "device": disk.device, "path": disk.path}
        if disk.path and disk.device == "disk":
            try:
                entry["capacity"] = conn.storageVolLookupByPath(disk.path).info()[1]
            except libvirt.libvirtError:
                pass
        disks.append(entry)
    return disks


def describe(conn: libvirt.virConnect, dom: libvirt.virDomain, leases: dict | None = None) -> dict:
    xml = Domain(dom.XMLDesc(0))
    info = xml.managed_info() or {}
    state = state_of(dom)
    leases = lease_table(conn) if leases is None else leases
    macs = [i.mac.lower() for i in xml.interfaces if i.mac]
    ips = [ip for mac in macs for ip in leases.get(mac, [])] if state == "running" else []
    if state == "running" and not ips:
        ips = addresses.lookup(dom, addresses.SOURCE_ARP, macs)
    vcpu = xml.node.find("vcpu")
    vcpus = int(vcpu.get("current", vcpu.text)) if vcpu is not None else None
    disks = _disk_sizes(conn, xml)
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
        "image": info.get("base"),
        "base_domain": info.get("base"),
        "clone_strategy": info.get("strategy"),
        "created": info.get("created"),
        "virt_type": xml.type,
        "vcpus": vcpus,
        "memory_mib": memory_mib,
        "macs": macs,
        "disks": disks,
        "autostart": bool(dom.autostart()),
        "description": xml.description,
    }


def managed(conn: libvirt.virConnect) -> dict[str, dict]:
    leases = lease_table(conn)
    result = {}
    for dom in conn.listAllDomains(0):
        if Domain(dom.XMLDesc(0)).managed_info() is not None:
            result[dom.name()] = describe(conn, dom, leases)
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
