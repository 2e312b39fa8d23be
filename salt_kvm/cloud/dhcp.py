"""DHCP host reservations on libvirt-managed networks (pre-provisioned name/MAC/IP).

IPv4 reservations are keyed by MAC; IPv6 ones (``nics[].ip6``) by the DUID-LL
made from the MAC, in the network's IPv6 ``<dhcp>``: libvirt accepts no MAC
there. The same ``network|mac|ip`` record names both (the address's family
tells them apart), so rollback and ``salt-cloud -d`` release them alike."""

from __future__ import annotations

import ipaddress

import libvirt

from salt_kvm.errors import ConflictError, NotFoundError, SpecError
from salt_kvm.virt.network import DhcpHost, Network, NetworkIP, duid_ll

LIVE_AND_CONFIG = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG


def _network(conn: libvirt.virConnect, name: str) -> libvirt.virNetwork:
    try:
        return conn.networkLookupByName(name)
    except libvirt.libvirtError as exc:
        raise NotFoundError(f"no libvirt network named {name!r}") from exc


def _config_xml(net: libvirt.virNetwork) -> Network:
    """The persistent definition (where reservations are kept), as the driver allows."""
    try:
        text = net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
            raise
        text = net.XMLDesc(0)
    return Network(text)


def _host_xml(mac: str, ip: str, name: str | None) -> str:
    return DhcpHost.new(mac, ip, name or None).to_xml()


def _flags(net: libvirt.virNetwork) -> int:
    """Live and persistent; a transient network (net-create) has no
    persistent config, an inactive one no live state."""
    if not net.isPersistent():
        return libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
    return LIVE_AND_CONFIG if net.isActive() else libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG


def _is6(ip: str) -> bool:
    return ipaddress.ip_address(ip).version == 6


def check(conn: libvirt.virConnect, network: str, mac: str, ip: str, key: str) -> None:
    """Refuse, before anything is made, a reservation the network cannot take."""
    if _is6(ip):
        return _check6(conn, network, mac, ip, key)
    net = _network(conn, network)
    xml = _config_xml(net)
    address = ipaddress.ip_address(ip)
    for ip_node in xml.ips:
        subnet = ip_node.subnet() if ip_node.dhcp else None
        if subnet is None or address not in subnet:
            continue
        if address == ipaddress.ip_address(ip_node.address):
            raise SpecError(key, f"{ip} is the network's own address", f"an address in {subnet}")
        for host in ip_node.hosts:
            if host.ip == ip and (host.mac or "").lower() != mac:
                raise ConflictError(
                    f"{key}: {ip} is already reserved on network {network!r} for {host.mac}"
                )
            if (host.mac or "").lower() == mac and host.ip != ip:
                raise ConflictError(
                    f"{key}: {mac} already has a reservation for {host.ip} on {network!r}"
                )
        return
    raise SpecError(
        key, f"{ip} is not in a DHCP subnet of network {network!r}", "an address of that network"
    )


def _ipv6_dhcp(xml: Network) -> tuple[int, NetworkIP] | None:
    """The network's IPv6 ``<ip>`` with a ``<dhcp>`` and its index among the
    ``<ip>`` elements (``net.update``'s parent index), None without one."""
    for index, ip_node in enumerate(xml.ips):
        if ip_node.family == "ipv6" and ip_node.dhcp:
            return index, ip_node
    return None


def _check6(conn: libvirt.virConnect, network: str, mac: str, ip: str, key: str) -> None:
    xml = _config_xml(_network(conn, network))
    found = _ipv6_dhcp(xml)
    if found is None:
        raise SpecError(
            key,
            f"network {network!r} has no IPv6 DHCP (an <ip family='ipv6'> with <dhcp>)",
            "a dual-stack libvirt network with a DHCPv6 range, or leave ip6 out",
        )
    _, ip_node = found
    subnet = ip_node.subnet()
    address = ipaddress.ip_address(ip)
    if subnet is None or address not in subnet:
        raise SpecError(
            key, f"{ip} is not in network {network!r}'s IPv6 subnet", f"an address in {subnet}"
        )
    if address == ipaddress.ip_address(ip_node.address):
        raise SpecError(key, f"{ip} is the network's own address", f"an address in {subnet}")
    duid = duid_ll(mac)
    for host in ip_node.hosts:
        same = host.ip is not None and ipaddress.ip_address(host.ip) == address
        if same and (host.id or "").lower() != duid:
            raise ConflictError(
                f"{key}: {ip} is already reserved on network {network!r} for {host.id or host.name}"
            )
        if (host.id or "").lower() == duid and not same:
            raise ConflictError(
                f"{key}: {mac} already has an IPv6 reservation for {host.ip} on {network!r}"
            )


def _host6(ip_node: NetworkIP, mac: str, ip: str) -> DhcpHost | None:
    """The IPv6 reservation of ``mac`` (its DUID-LL) for ``ip``, if there is one."""
    duid, address = duid_ll(mac), ipaddress.ip_address(ip)
    for host in ip_node.hosts:
        if (host.id or "").lower() == duid and ipaddress.ip_address(host.ip) == address:
            return host
    return None


def _reserve6(net: libvirt.virNetwork, mac: str, ip: str) -> bool:
    xml = _config_xml(net)
    found = _ipv6_dhcp(xml)
    if found is None:
        raise SpecError("ip6", f"network {net.name()!r} has no IPv6 DHCP", "a dual-stack network")
    index, ip_node = found
    if _host6(ip_node, mac, ip) is not None:
        return False
    net.update(
        libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
        libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
        index,
        DhcpHost.new6(duid_ll(mac), str(ipaddress.ip_address(ip))).to_xml(),
        _flags(net),
    )
    return True


def _release6(net: libvirt.virNetwork, mac: str, ip: str) -> None:
    found = _ipv6_dhcp(_config_xml(net))
    if found is None:
        return
    index, ip_node = found
    host = _host6(ip_node, mac, ip)
    if host is not None:
        net.update(
            libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE,
            libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
            index,
            host.to_xml(),
            _flags(net),
        )


def reserve(conn: libvirt.virConnect, network: str, mac: str, ip: str, name: str) -> bool:
    """Add the reservation; ``False`` when it already existed (nothing to undo).

    Reservations are keyed by MAC: a guest with two fixed-IP NICs on one
    network gets two. The host name goes on the first only (libvirt refuses
    two entries with one name, and it is the guest's one DNS name there).
    """
    net = _network(conn, network)
    if _is6(ip):
        return _reserve6(net, mac, ip)
    xml = _config_xml(net)
    named = False
    for host in xml.dhcp_hosts():
        if (host.mac or "").lower() == mac and host.ip == ip:
            return False
        named = named or host.name == name
    net.update(
        libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
        libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
        -1,
        _host_xml(mac, ip, None if named else name),
        _flags(net),
    )
    return True


def release(conn: libvirt.virConnect, network: str, mac: str, ip: str) -> None:
    net = _network(conn, network)
    if _is6(ip):
        return _release6(net, mac, ip)
    xml = _config_xml(net)
    for host in xml.dhcp_hosts():
        if (host.mac or "").lower() == mac and host.ip == ip:
            net.update(
                libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE,
                libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
                -1,
                host.to_xml(),
                _flags(net),
            )
