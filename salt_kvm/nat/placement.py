"""Where a guest of a NAT forward is reached: its network, bridge, subnet and address.

Only the host's records count (the network's DHCP reservation, else dnsmasq's
lease, matched by MAC): never what the guest says about itself.
"""

from __future__ import annotations

import ipaddress

import libvirt
from lxml import etree

from salt_kvm.errors import ConflictError, NotFoundError, SpecError
from salt_kvm.nat.store import Placement
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.network import duid_ll


def _networks(conn: libvirt.virConnect) -> dict[str, libvirt.virNetwork]:
    return {n.name(): n for n in conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE)}


def _subnet(root: etree._Element) -> ipaddress.IPv4Network | None:
    for ip in root.findall("ip"):
        if ip.get("family", "ipv4") != "ipv4" or ip.get("address") is None:
            continue
        mask = ip.get("prefix") or ip.get("netmask") or "24"
        network = ipaddress.IPv4Network(f"{ip.get('address')}/{mask}", strict=False)
        return network
    return None


def _subnet6(root: etree._Element) -> ipaddress.IPv6Network | None:
    """The network's IPv6 subnet (a dual-stack network), None without one."""
    for ip in root.findall("ip"):
        if ip.get("family") == "ipv6" and ip.get("address") is not None:
            prefix = ip.get("prefix") or "64"
            return ipaddress.IPv6Network(f"{ip.get('address')}/{prefix}", strict=False)
    return None


def _address6(
    root: etree._Element, mac: str, leased: list[str], known: str
) -> tuple[ipaddress.IPv6Network | None, str]:
    """The guest's IPv6 address on a dual-stack network: dnsmasq's DHCPv6
    lease for the NIC's MAC (libvirt records the MAC with it), the one
    salt-kvm reserved for that MAC's DUID-LL first (``nics[].ip6``; an
    earlier lease under the guest's first DUID may still be listed), else the
    one last recorded for that MAC (``known``). Never a SLAAC address the
    guest made itself, nor a reservation alone: a DUID is the guest's word,
    the lease for the MAC is the host's record."""
    subnet = _subnet6(root)
    if subnet is None:
        return None, ""
    duid = duid_ll(mac)
    reserved = {
        str(ipaddress.ip_address(host.get("ip")))
        for host in root.findall("ip[@family='ipv6']/dhcp/host")
        if (host.get("id") or "").lower() == duid and host.get("ip")
    }
    leased = sorted(leased, key=lambda a: str(ipaddress.ip_address(a)) not in reserved)
    for address in [*leased, known]:
        if address and ipaddress.ip_address(address) in subnet:
            return subnet, address
    return subnet, ""


def _reserved(root: etree._Element, mac: str) -> list[str]:
    """The network's DHCP reservation for ``mac`` (a reservation by host name
    only is the guest's word: any guest can send that name)."""
    return [
        host.get("ip")
        for host in root.findall("ip/dhcp/host")
        if (host.get("mac") or "").lower() == mac and host.get("ip")
    ]


def _leased(net: libvirt.virNetwork, mac: str) -> list[str]:
    """dnsmasq's leases of ``mac`` on the network (the host's record)."""
    try:
        leases = net.DHCPLeases(mac) or []
    except libvirt.libvirtError:
        return []
    return [
        lease["ipaddr"]
        for lease in leases
        if lease.get("ipaddr") and (lease.get("mac") or "").lower() == mac
    ]


def locate(conn: libvirt.virConnect, name: str, known: Placement | None = None) -> Placement:
    """Where a domain salt-kvm manages is reached: its NIC's DHCP reservation,
    else its lease, matched to the NIC's MAC.

    Never the guest agent: what a guest reports about itself is the guest's
    word, and a forward must not follow it (a guest could aim the host's
    port at another guest). ``known``: where the host last recorded this
    domain (the state file), used for the same MAC on the same network when
    the network lost its leases (a ``net-destroy``/``net-start``) and the
    guest has not renewed yet.
    """
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        raise NotFoundError(f"no domain named {name!r} on {conn.getURI()}") from exc
    if Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).managed_info() is None:
        raise SpecError(
            "domain",
            f"{name} was not created by salt-kvm (no salt-kvm metadata)",
            "a domain salt-kvm manages (made by its cloud driver)",
        )
    networks = _networks(conn)
    by_bridge = {n.bridgeName(): n for n in networks.values()}
    on_network = False
    for iface in Domain(dom.XMLDesc(0)).interfaces:
        net = networks.get(iface.source_network or "") or by_bridge.get(iface.source_bridge or "")
        if net is None or not iface.mac:
            continue
        on_network = True
        mac = iface.mac.lower()
        root = etree.fromstring(net.XMLDesc(0).encode())
        subnet = _subnet(root)
        if subnet is None:
            continue
        leased = _leased(net, mac)
        candidates = _reserved(root, mac) + leased
        recorded = known if known and known.mac == mac and known.network == net.name() else None
        if recorded is not None:
            candidates.append(recorded.address)
        for address in candidates:
            if ipaddress.ip_address(address) in subnet:
                subnet6, address6 = _address6(
                    root, mac, leased, recorded.address6 if recorded else ""
                )
                return Placement(
                    net.name(),
                    net.bridgeName(),
                    str(subnet),
                    address,
                    mac,
                    address6,
                    str(subnet6) if address6 else "",
                )
    if not on_network:
        raise SpecError(
            "domain",
            f"{name} has no interface on an active libvirt-managed network",
            "a domain with a NIC on a libvirt network (e.g. nics: [default])",
        )
    raise ConflictError(
        f"{name} has no DHCP reservation or lease for its MAC on its libvirt network yet "
        "(the guest agent's word is not used); start it or reserve an address"
    )


def managed_domains(conn: libvirt.virConnect) -> set[str]:
    """The names of the domains salt-kvm manages on ``conn``."""
    names = set()
    for dom in conn.listAllDomains(0):
        try:
            if Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).managed_info() is not None:
                names.add(dom.name())
        except libvirt.libvirtError:
            continue  # undefined meanwhile
    return names
