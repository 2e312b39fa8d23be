#!/usr/bin/env python3
"""Import the cached test image into the pool and define it as a shut-off base domain.

Usage: define-test-base.py IMAGE KEY

On the hypervisor ``$SALT_KVM_URI`` names (default ``qemu:///system``;
scripts/second-hypervisor passes its own): the pool's folder must be a path
this process can write, as it is for the test bed's second hypervisor.

Idempotent: a base domain already made from the image with KEY is kept. The
domain type is probed: ``kvm`` when a guest really boots with it (reaches its
DHCP lease), else ``qemu`` (TCG). A host where QEMU cannot open /dev/kvm, or
where a KVM guest stops at once, is told in seconds by the driver's own check
(salt_kvm.virt.accel), before any full boot. Prints the base domain's name.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import libvirt
from lxml import etree

from salt_kvm.cloud import addresses
from salt_kvm.virt import accel, chains, connection, identity, lifecycle
from salt_kvm.virt.domain import Domain, new_domain
from salt_kvm.virt.rollback import Rollback

POOL = os.environ.get("SALT_KVM_POOL", "default")
NETWORK = os.environ.get("SALT_KVM_TEST_NET", "salt-kvm-test")
BASE = os.environ.get("SALT_KVM_BASE_DOMAIN", "salt-kvm-base-debian12")
URI = os.environ.get("SALT_KVM_URI", connection.DEFAULT_URI)
PROBE_TIMEOUT = 180
MARK = "salt-kvm test base, image "


def log(msg: str) -> None:
    print(f"[salt-kvm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machines(conn: libvirt.virConnect) -> set[str]:
    """The machine types (names and aliases) this host's QEMU offers."""
    caps = etree.fromstring(conn.getCapabilities().encode())
    found = set()
    for machine in caps.iter("machine"):
        found.add((machine.text or "").strip())
        if machine.get("canonical"):
            found.add(machine.get("canonical"))
    return found


def existing_base(conn: libvirt.virConnect, key: str) -> bool:
    try:
        dom = conn.lookupByName(BASE)
    except libvirt.libvirtError:
        return False
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    if xml.description == MARK + key and all(os.path.exists(d.path or "") for d in xml.disks):
        machine = xml.node.find("os/type").get("machine", "")
        if machine in machines(conn):
            return True
        # setup-host switched QEMU to an older one that lacks the versioned
        # machine type the base was defined with: define it again, same disk.
        log(f"redefining base domain {BASE}: this QEMU has no machine type {machine}")
        lifecycle.undefine(dom)
        return False
    log(f"replacing base domain {BASE} (made from another image)")
    old_paths = [d.path for d in xml.disks if d.path]
    lifecycle.undefine(dom)
    # A quick clone of the old base (another checkout's guest, a run beside
    # this one) still reads the old disk: it stays until nothing needs it.
    delete_unread(conn, old_paths)
    return False


def delete_unread(conn: libvirt.virConnect, paths: list[str]) -> None:
    """Delete the volumes of ``paths`` that no domain reads (``chains.deletable``);
    log why each other one stays."""
    doomed, kept = chains.dependents(conn).deletable(paths)
    for path, needs in kept.items():
        log(f"kept {path}: {chains.describe({path: needs})}")
    for path in doomed:
        log(f"deleting {path}: an earlier base's disk nothing reads")
        try:
            conn.storageVolLookupByPath(path).delete(0)
        except libvirt.libvirtError:
            pass


def sweep_old_disks(conn: libvirt.virConnect, current: str | None) -> None:
    """Delete the disks of earlier bases (``BASE-<key>.qcow2`` in the pool)
    that nothing reads any more: kept when a base was replaced while a quick
    clone still read them, they would otherwise stay for good."""
    pool = conn.storagePoolLookupByName(POOL)
    pool.refresh(0)
    old = [
        vol.path()
        for vol in pool.listAllVolumes(0)
        if vol.name().startswith(f"{BASE}-")
        and vol.name().endswith(".qcow2")
        and vol.path() != current
    ]
    if old:
        delete_unread(conn, old)


def current_disk(conn: libvirt.virConnect) -> str | None:
    dom = conn.lookupByName(BASE)
    return next((d.path for d in Domain(dom.XMLDesc(0)).disks if d.path), None)


def import_volume(conn: libvirt.virConnect, image: str, key: str) -> str:
    pool = conn.storagePoolLookupByName(POOL)
    target_dir = Domain(pool.XMLDesc(0)).node.findtext("target/path")
    path = os.path.join(target_dir, f"{BASE}-{key}.qcow2")
    if not os.path.exists(path):
        shutil.copyfile(image, path + ".tmp")
        os.replace(path + ".tmp", path)
    pool.refresh(0)
    return path


def boots_with(conn: libvirt.virConnect, virt_type: str, disk: str) -> bool:
    """Boot a throwaway guest (transient disk) and wait for its DHCP lease."""
    xml = new_domain(f"{BASE}-probe", virt_type, 512, 1, disk, networks=(NETWORK,))
    mac = identity.new_mac(identity.used_macs(conn))
    xml.interfaces[0].mac = mac
    etree.SubElement(xml.disks[0].node, "transient")  # writes go to a throwaway overlay
    try:
        dom = conn.createXML(xml.to_xml(), 0)
    except libvirt.libvirtError as exc:
        log(f"{virt_type}: guest does not start: {exc}")
        return False
    try:
        deadline = time.monotonic() + PROBE_TIMEOUT
        while time.monotonic() < deadline:
            state, reason = dom.state()
            if state != libvirt.VIR_DOMAIN_RUNNING:
                log(f"{virt_type}: guest stopped running (state {state}, reason {reason})")
                return False
            if addresses.addresses_from(dom, addresses.SOURCE_LEASE, [mac]):
                return True
            time.sleep(0.5)
        log(f"{virt_type}: no DHCP lease within {PROBE_TIMEOUT}s")
        return False
    finally:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass


def main() -> int:
    image, key = sys.argv[1], sys.argv[2]
    with connection.connected(URI) as conn:
        if existing_base(conn, key):
            log(f"base domain {BASE} is up to date")
            sweep_old_disks(conn, current_disk(conn))
            print(BASE)
            return 0
        path = import_volume(conn, image, key)
        # Fast first: /dev/kvm access (no guest at all), then a few seconds' probe.
        verdict = accel.kvm_works(conn, (path, "qcow2"))
        log(f"kvm: {verdict.detail}" + (" (cached)" if verdict.cached else ""))
        candidates = [connection.VIRT_KVM] if verdict.works else []
        virt_type = connection.VIRT_QEMU
        for candidate in candidates:
            log(f"probing whether a guest boots with type {candidate}")
            if boots_with(conn, candidate, path):
                virt_type = candidate
                break
        log(f"base domain {BASE}: type {virt_type}")
        xml = new_domain(BASE, virt_type, 1024, 1, path, networks=(NETWORK,))
        xml.description = MARK + key
        lifecycle.define(conn, xml, Rollback())
        sweep_old_disks(conn, path)
    print(BASE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
