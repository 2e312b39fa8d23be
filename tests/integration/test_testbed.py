"""The test bed itself: a linked clone of the base domain boots, gets a DHCP
lease for its own MAC, takes an SSH login, and is removed without a trace."""

import libvirt

from salt_kvm import ssh
from salt_kvm.cloud import addresses, clone
from salt_kvm.virt import lifecycle
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback

from .conftest import GUEST_PASSWORD, GUEST_USER, NETWORK, unique


def test_linked_clone_boots_gets_its_lease_and_takes_ssh(hv, base_domain, pool_volumes):
    name = unique("bed")
    volumes_before = pool_volumes()
    rollback = Rollback()
    with rollback:
        dom = clone.clone_domain(hv, clone.plan_clone(hv, base_domain, name, "quick"), rollback)
        dom.create()
        mac = Domain(dom.XMLDesc(0)).interfaces[0].mac
        ips = addresses.wait_for_addresses(dom, addresses.SOURCE_LEASE, timeout=240, macs=[mac])
        leases = hv.networkLookupByName(NETWORK).DHCPLeases()
        assert {"mac": mac, "ip": ips[0]} in [{"mac": x["mac"], "ip": x["ipaddr"]} for x in leases]
        with ssh.connect(ips[0], GUEST_USER, password=GUEST_PASSWORD, timeout=180) as session:
            assert session.check("cat /sys/class/net/eth0/address").strip() == mac
            assert session.check("cat /etc/machine-id").strip()  # made at first boot
        rollback.forget()

    lifecycle.remove(hv, name)
    assert name not in [d.name() for d in hv.listAllDomains(0)]
    assert pool_volumes() == volumes_before
    try:
        hv.lookupByName(name)
        raise AssertionError(f"{name} still defined")
    except libvirt.libvirtError:
        pass
