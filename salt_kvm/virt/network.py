"""Virtual networks: the parts of a ``<network>`` salt-kvm reads, and the DHCP
``<host>`` entries it adds and removes (``virNetwork.update``)."""

from __future__ import annotations

import ipaddress

from salt_kvm.virt.xmlmodel import XMLChildren, XMLFlag, XMLObject, XMLProperty


class DhcpHost(XMLObject):
    """One DHCP reservation: ``<host mac=... name=... ip=.../>``."""

    TAG = "host"

    mac = XMLProperty("./@mac")
    name = XMLProperty("./@name")
    ip = XMLProperty("./@ip")

    @classmethod
    def new(cls, mac: str, ip: str, name: str | None = None) -> DhcpHost:
        host = cls()
        host.mac = mac
        host.name = name
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
