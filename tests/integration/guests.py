"""Boot a throwaway guest for the integration tier: a quick clone of the base
domain on the test network, with an optional small extra data disk, reachable
over SSH. Everything it makes is recorded in the salt-kvm metadata so
``lifecycle.remove`` (and the leftover sweep of conftest) deletes it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import libvirt
from lxml import etree

from salt_kvm import ssh
from salt_kvm.cloud import addresses, clone
from salt_kvm.virt import lifecycle
from salt_kvm.virt.domain import Disk, Domain
from salt_kvm.virt.rollback import Rollback

from .conftest import GUEST_PASSWORD, GUEST_USER, NETWORK

MIB = 1024**2


@dataclass
class TestGuest:
    name: str
    dom: libvirt.virDomain
    address: str
    data_path: str | None

    def session(self, timeout: float = 300) -> ssh.Session:
        return ssh.connect(self.address, GUEST_USER, GUEST_PASSWORD, timeout=timeout)

    def run(self, command: str, timeout: float = 600) -> str:
        with self.session() as session:
            return session.check(command, timeout)


def data_volume(conn, pool_name: str, name: str, size: int, fmt: str = "qcow2") -> str:
    vol = etree.Element("volume", type="file")
    etree.SubElement(vol, "name").text = name
    etree.SubElement(vol, "capacity", unit="bytes").text = str(size)
    target = etree.SubElement(vol, "target")
    etree.SubElement(target, "format", type=fmt)
    if fmt == "qcow2":
        etree.SubElement(target, "compat").text = "1.1"
    pool = conn.storagePoolLookupByName(pool_name)
    return pool.createXML(etree.tostring(vol, encoding="unicode"), 0).path()


def quick_clone(conn, base: str, name: str) -> libvirt.virDomain:
    """A quick clone of ``base`` as it is (on its networks), defined, not started."""
    rollback = Rollback()
    with rollback:
        dom = clone.clone_domain(
            conn, clone.plan_clone(conn, base, name, clone.STRATEGY_QUICK), rollback
        )
        rollback.forget()
    return dom


def define_guest(conn, base: str, name: str, data_size: int | None = None) -> tuple:
    """Define (not start) a quick clone on the test network; returns (dom, data path)."""
    plan = clone.plan_clone(conn, base, name, clone.STRATEGY_QUICK)
    pool_path = etree.fromstring(
        conn.storagePoolLookupByName(plan.disks[0].pool).XMLDesc(0).encode()
    ).findtext("target/path")
    volumes = [f"{pool_path}/{plan.disks[0].volume_name}"]
    data_path = None
    with Rollback() as rollback:
        if data_size:
            data_path = data_volume(conn, plan.disks[0].pool, f"{name}-vdb.qcow2", data_size)
            rollback.add("data volume", lambda: conn.storageVolLookupByPath(data_path).delete(0))
            volumes.append(data_path)

        def customize(xml):
            for iface in xml.interfaces:
                iface.source_network = NETWORK

        dom = clone.clone_domain(
            conn, plan, rollback, customize=customize, info={"volumes": volumes}
        )
        if data_path:
            # after the clone: clone_domain pairs the XML's disks with the base's
            xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            disk = Disk(etree.SubElement(xml.node.find("devices"), "disk", type="file"))
            disk.device = "disk"
            disk.driver_name = "qemu"
            disk.driver_type = "qcow2"
            disk.path = data_path
            disk.target_dev = "vdb"
            disk.target_bus = "virtio"
            dom = conn.defineXML(xml.to_xml())
        rollback.forget()
    return dom, data_path


def wait_booted(dom, timeout: float = 600) -> str:
    return addresses.wait_for_addresses(dom, addresses.SOURCE_LEASE, timeout)[0]


def boot_guest(conn, base: str, name: str, data_size: int | None = None) -> TestGuest:
    dom, data_path = define_guest(conn, base, name, data_size)
    try:
        dom.create()
        guest = TestGuest(name, dom, wait_booted(dom), data_path)
        guest.run("true")  # sshd is up
        return guest
    except Exception:
        with contextlib.suppress(Exception):
            lifecycle.remove(conn, name)
        raise


def remove_guest(conn, name: str) -> None:
    with contextlib.suppress(Exception):
        lifecycle.remove(conn, name)
