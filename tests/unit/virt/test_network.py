"""The network document's DHCP parts."""

import ipaddress

from salt_kvm.virt.network import DhcpHost, Network
from tests.xmlcompare import assert_same_xml

LIBVIRT_NETWORK = """
<network>
  <name>default</name>
  <uuid>dd8fe884-6c02-601e-7551-cca97df1c5df</uuid>
  <forward mode='nat'/>
  <bridge name='virbr0' stp='on' delay='0'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='192.168.122.2' end='192.168.122.254'/>
      <host mac='52:54:00:00:00:01' name='a' ip='192.168.122.10'/>
      <host mac='52:54:00:00:00:02' ip='192.168.122.11'/>
    </dhcp>
  </ip>
  <ip family='ipv6' address='fd00::1' prefix='64'/>
</network>
"""


def test_dhcp_host_with_and_without_a_name():
    assert_same_xml(
        DhcpHost.new("52:54:00:00:00:01", "10.0.0.5", "web").to_xml(),
        "<host mac='52:54:00:00:00:01' name='web' ip='10.0.0.5'/>",
    )
    assert_same_xml(
        DhcpHost.new("52:54:00:00:00:01", "10.0.0.5").to_xml(),
        "<host mac='52:54:00:00:00:01' ip='10.0.0.5'/>",
    )


def test_reads_libvirts_network():
    net = Network(LIBVIRT_NETWORK)
    assert (net.name, net.bridge, net.forward_mode) == ("default", "virbr0", "nat")
    v4, v6 = net.ips
    assert v4.dhcp and not v6.dhcp
    assert v4.subnet() == ipaddress.ip_network("192.168.122.0/24")
    assert v6.subnet() == ipaddress.ip_network("fd00::/64")
    assert [(h.mac, h.name, h.ip) for h in net.dhcp_hosts()] == [
        ("52:54:00:00:00:01", "a", "192.168.122.10"),
        ("52:54:00:00:00:02", None, "192.168.122.11"),
    ]
    assert_same_xml(Network(net.to_xml()).to_xml(), LIBVIRT_NETWORK)


def test_a_reservation_read_from_the_network_is_sent_back_alone():
    host = Network(LIBVIRT_NETWORK).dhcp_hosts()[1]
    assert_same_xml(host.to_xml(), "<host mac='52:54:00:00:00:02' ip='192.168.122.11'/>")


def test_subnet_defaults_to_a_24_without_netmask_or_prefix():
    net = Network("<network><ip address='10.1.2.3'><dhcp/></ip><ip/></network>")
    assert net.ips[0].subnet() == ipaddress.ip_network("10.1.2.0/24")
    assert net.ips[1].subnet() is None
