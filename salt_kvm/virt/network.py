"""Virtual networks: the parts of a ``<network>`` salt-kvm reads, and the DHCP
``<host>`` entries it adds and removes (``virNetwork.update``)."""

from __future__ import annotations

import ipaddress

from salt_kvm.virt.xmlmodel import XMLChildren, XMLFlag, XMLObject, XMLProperty


def duid_ll(mac: str) -> str:
    """The DUID-LL (type 3, Ethernet) of ``mac``: the key of a NIC's IPv6
    reservation (``nics[].ip6``), and the DUID its guest's DHCPv6 client is
    told to send (``DUIDType=link-layer``)."""
    return "00:03:00:01:" + mac.lower()


class DhcpHost(XMLObject):
    """One DHCP reservation: ``<host mac=... name=... ip=.../>``."""

    TAG = "host"

    mac = XMLProperty("./@mac")
    # An IPv6 reservation's key: a DUID (libvirt takes no MAC there).
    id = XMLProperty("./@id")
    name = XMLProperty("./@name")
    ip = XMLProperty("./@ip")

    @classmethod
    def new(cls, mac: str, ip: str, name: str | None = None) -> DhcpHost:
        host = cls()
        host.mac = mac
        host.name = name
        host.ip = ip
        return host

    @classmethod
    def new6(cls, duid: str, ip: str) -> DhcpHost:
        """An IPv6 reservation: ``<host id=DUID ip=.../>``."""
        host = cls()
        host.id = duid
        host.ip = ip
        return host


class NetworkIP(XMLObject):
    """An ``<ip>`` of a network: its address, prefix and DHCP reservations."""

    TAG = "ip"

    address = XMLProperty("./@address")
    prefix = XMLProperty("./@prefix", int)
    netmask = XMLProperty("./@netmask")
    family = XMLProperty("./@family")
    dhcp = XMLFlag("dhcp")
    hosts = XMLChildren(DhcpHost, "./dhcp/host")

    def subnet(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        """The network this address is in (``None`` without an address);
        a netmask is read as libvirt does, 255.255.255.0 when neither is given."""
        if self.address is None:
            return None
        prefix = self.prefix
        if prefix is None:
            mask = self.netmask or "255.255.255.0"
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
        return ipaddress.ip_network(f"{self.address}/{prefix}", strict=False)


class Network(XMLObject):
    """A network's definition, as libvirt describes it."""

    TAG = "network"

    name = XMLProperty("./name")
    uuid = XMLProperty("./uuid")
    bridge = XMLProperty("./bridge/@name")
    forward_mode = XMLProperty("./forward/@mode")
    ips = XMLChildren(NetworkIP, "./ip")

    def dhcp_hosts(self) -> list[DhcpHost]:
        """Every reservation, over all the network's addresses."""
        return [host for ip in self.ips for host in ip.hosts]
