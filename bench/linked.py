"""Linked-clone creation time against the base's size: a 2 GiB and a 20 GiB base
(both fully allocated, so a copy would have to move every byte), five quick
clones of each, plus one full clone of the 2 GiB base for contrast."""

from __future__ import annotations

import os
import statistics
import subprocess
import time

import libvirt

from salt_kvm.cloud import clone
from salt_kvm.virt import lifecycle
from salt_kvm.virt.domain import Domain, new_domain
from salt_kvm.virt.rollback import Rollback

POOL = os.environ.get("SALT_KVM_POOL", "default")
PREFIX = "skbench-"
SIZES_GIB = (2, 20)
CLONES = 5


def _pool_dir(conn: libvirt.virConnect) -> str:
    pool = conn.storagePoolLookupByName(POOL)
    return Domain(pool.XMLDesc(0)).node.findtext("target/path")


def _make_base(conn: libvirt.virConnect, gib: int) -> str:
    name = f"{PREFIX}base-{gib}g"
    path = os.path.join(_pool_dir(conn), f"{name}.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", path, f"{gib}G"],
        check=True,
    )
    conn.storagePoolLookupByName(POOL).refresh(0)
    xml = new_domain(name, "qemu", 256, 1, path, networks=())
    conn.defineXML(xml.to_xml())
    return name


def _clone_seconds(conn: libvirt.virConnect, base: str, name: str, strategy: str) -> float:
    started = time.monotonic()
    plan = clone.plan_clone(conn, base, name, strategy)
    clone.clone_domain(conn, plan, Rollback(), validate=False)
    return time.monotonic() - started


def _remove_base(conn: libvirt.virConnect, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    paths = [d.path for d in Domain(dom.XMLDesc(0)).disks if d.path]
    lifecycle.undefine(dom)
    for path in paths:
        conn.storageVolLookupByPath(path).delete(0)


def run(conn: libvirt.virConnect) -> dict[int, float]:
    print(f"Linked clones: {CLONES} quick clones of a fully allocated base of each size")
    medians: dict[int, float] = {}
    for gib in SIZES_GIB:
        _remove_base(conn, f"{PREFIX}base-{gib}g")
        base = _make_base(conn, gib)
        try:
            times = []
            for i in range(CLONES):
                name = f"{PREFIX}linked-{gib}g-{i}"
                times.append(_clone_seconds(conn, base, name, clone.STRATEGY_QUICK))
                lifecycle.remove(conn, name)
            medians[gib] = statistics.median(times)
            print(f"  {gib:>2} GiB base: linked clone {medians[gib] * 1000:7.1f} ms (median)")
            if gib == SIZES_GIB[0]:
                name = f"{PREFIX}full-{gib}g"
                full = _clone_seconds(conn, base, name, clone.STRATEGY_FULL)
                lifecycle.remove(conn, name)
                print(f"  {gib:>2} GiB base: full clone   {full * 1000:7.1f} ms (for contrast)")
        finally:
            _remove_base(conn, base)
    small, large = (medians[g] for g in SIZES_GIB)
    ratio = large / small
    print(f"  ratio {SIZES_GIB[1]} GiB / {SIZES_GIB[0]} GiB linked: {ratio:.2f}x (flat = ~1)")
    return medians
