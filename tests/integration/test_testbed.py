"""The test bed itself: a linked clone of the base domain boots, gets a DHCP
lease for its own MAC, takes an SSH login, and is removed without a trace."""

import contextlib
import os

import libvirt
import pytest

from salt_kvm import ssh
from salt_kvm.backup import snapshots
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
        # A power cut right after the first login: the host keys (and the
        # machine id) made at first boot must be on disk by then. Before, the
        # keys came back empty (ext4 had not committed them) and sshd never
        # started again (CI, 2026-12-02).
        dom.destroy()
        dom.create()
        with ssh.connect(ips[0], GUEST_USER, password=GUEST_PASSWORD, timeout=180) as session:
            assert session.check("cat /sys/class/net/eth0/address").strip() == mac
        rollback.forget()

    lifecycle.remove(hv, name)
    assert name not in [d.name() for d in hv.listAllDomains(0)]
    assert pool_volumes() == volumes_before
    try:
        hv.lookupByName(name)
        raise AssertionError(f"{name} still defined")
    except libvirt.libvirtError:
        pass


def test_the_sweep_removes_a_leftover_with_snapshots_and_only_guests_with_the_prefix(
    hv, base_domain
):
    """A guest a killed run left with an external snapshot (and a checkpoint)
    is swept: metadata only, then the volumes it owns; the base it stands on and
    guests without the prefix stay. (Before, the sweep's removal was refused
    for such a guest and the hv fixture failed for every later test.)"""
    from . import conftest, guests

    prefix = unique("sweep")  # this test's own prefix: the session's guests are not swept
    dom, _ = guests.define_guest(hv, base_domain, f"{prefix}-a")
    other = f"{prefix[:-1]}x-b"  # shares all but the prefix's last character: not swept
    guests.define_guest(hv, base_domain, other)
    try:
        snapshots.create(hv, dom.name(), "s1")
        overlays = snapshots.list_snapshots(hv, dom.name())[-1]["overlays"]
        assert overlays and all(os.path.exists(p) for p in overlays.values())
        with contextlib.suppress(libvirt.libvirtError):  # where the driver makes one offline
            dom.checkpointCreateXML("<domaincheckpoint><name>c1</name></domaincheckpoint>", 0)
        base_disks = {d.path for d in Domain(hv.lookupByName(base_domain).XMLDesc(0)).disks}
        conftest.remove_leftovers(hv, prefix)
        with pytest.raises(libvirt.libvirtError):
            hv.lookupByName(f"{prefix}-a")
        assert not [v for v in conftest.prefixed_volumes(hv) if v.startswith(prefix)]
        assert not [p for p in overlays.values() if os.path.exists(p)]
        assert all(os.path.exists(p) for p in base_disks if p)
        assert hv.lookupByName(other)  # not this prefix
    finally:
        for name in (f"{prefix}-a", other):
            with contextlib.suppress(Exception):
                lifecycle.remove(hv, name)
