"""Moving a guest to another hypervisor, live or offline, with its disks
(no shared storage), its DHCP reservations and its definition.

Everything the target must offer is checked before anything moves
(``salt_kvm.cloud.migrationplan``: every cause named at once). Then:

1. a quick clone's base is copied to the target when the caller asked
   (``copy_base``), through libvirt streams;
2. the UEFI variables file (a pool volume) is copied to the target's pool
   of the same name through libvirt streams; each disk's volume is made in
   the target's pool of the same name (an overlay on the target's copy of
   the base for a quick clone);
3. the DHCP reservations are added on the target's network; a guest with
   NAT forwards (kept in this host's kernel) gets its address pinned by a
   reservation on the source's network, and the forwards' store records the
   host it goes to (they stay here and still reach it on a bridged segment);
4. libvirt migrates: a running guest live, a shut-off one started paused on
   the source and moved paused (its CPUs never run; QEMU writes the target's
   overlays with the target's own backing path), then stopped on the target;
5. only when the guest is defined (and, live, running) on the target and gone
   from the source: the source's reservations are released and its volumes
   deleted through the delete gate (never a base another guest stands on).

A failure before the guest is on the target undoes 1-3 (the source keeps
the guest as it was, running or not).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import libvirt

from salt_kvm.cloud import dhcp, placement
from salt_kvm.cloud.fleet import Fleet
from salt_kvm.cloud.migrationplan import Plan, plan
from salt_kvm.errors import ConflictError, SaltKvmError, SpecError
from salt_kvm.nat import forwards
from salt_kvm.virt import chains, lifecycle
from salt_kvm.virt import migrate as mig
from salt_kvm.virt.checks import shown
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback
from salt_kvm.virt.volumes import Volume

log = logging.getLogger(__name__)
Emit = Callable[[str, dict], None]
SECURE = libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE

__all__ = ["Plan", "across", "check_target", "plan", "run"]


# ---- the move ---------------------------------------------------------------


def _prepare_target(plan: Plan, conn, dconn, rollback: Rollback, emit: Emit) -> None:
    for base in plan.bases:
        if not base.copy:
            continue
        emit("migrate_copying_base", {"volume": base.volume, "host": plan.target})
        pool = dconn.storagePoolLookupByName(base.pool)
        made = pool.createXML(Volume.new(base.volume, base.capacity, base.fmt).to_xml(), 0)
        rollback.add(f"base copy {made.path()}", _deleter(dconn, made.path()))
        copied = mig.copy_volume(conn.storageVolLookupByPath(base.source_path), dconn, made)
        log.info("copied base %s to %s (%d bytes)", base.volume, plan.target, copied)
    if plan.nvram is not None:
        _copy_nvram(plan, conn, dconn, rollback)
    for disk in plan.disks:
        vol = Volume.new(disk.volume, disk.capacity, disk.fmt, v3=True)
        if disk.base is not None:
            vol.set_backing(disk.base.target_path, disk.base.fmt)
        pool = dconn.storagePoolLookupByName(disk.pool)
        made = pool.createXML(vol.to_xml(), 0)
        rollback.add(f"volume {made.path()}", _deleter(dconn, made.path()))
    for network, mac, ip in plan.reservations:
        if dhcp.reserve(dconn, network, mac, ip, plan.name):
            rollback.add(f"reservation {ip} on {plan.target}", _releaser(dconn, network, mac, ip))


def _keep_forwards(plan: Plan, conn, rollback: Rollback) -> None:
    """Before the move: pin the address the forwards point at, and record
    where the guest goes, so nothing here drops its forwards when the domain
    leaves this host's libvirt (the qemu release hook, kvm_nat.refresh)."""
    if plan.forwards is None:
        return
    pinned_on = None
    if plan.forwards.pin is not None:
        network, mac, ip = plan.forwards.pin
        if dhcp.reserve(conn, network, mac, ip, plan.name):
            rollback.add(f"reservation {ip} on {plan.source}", _releaser(conn, network, mac, ip))
            pinned_on = conn.getURI()
    undo = forwards.relocate(plan.name, plan.forwards.moved_to, pinned_on)
    rollback.add(f"where the NAT forwards of {plan.name} point", undo)


def _copy_nvram(plan: Plan, conn, dconn, rollback: Rollback) -> None:
    """The UEFI variables, through libvirt streams, before the guest moves:
    QEMU's stream carries the firmware's flash as it is in memory, the file
    is what the target's QEMU writes the guest's later changes into."""
    nvram = plan.nvram
    assert nvram is not None
    pool = dconn.storagePoolLookupByName(nvram.pool)
    made = pool.createXML(Volume.new(nvram.volume, nvram.capacity, Volume.FORMAT_RAW).to_xml(), 0)
    rollback.add(f"NVRAM copy {made.path()}", _deleter(dconn, made.path()))
    mig.copy_volume(conn.storageVolLookupByPath(nvram.source_path), dconn, made)


def _deleter(dconn: libvirt.virConnect, path: str) -> Callable[[], object]:
    return lambda: chains.delete_volume(dconn, path, "rollback")


def _releaser(dconn: libvirt.virConnect, network: str, mac: str, ip: str) -> Callable[[], object]:
    return lambda: dhcp.release(dconn, network, mac, ip)


def _definitions(dom: libvirt.virDomain, plan: Plan) -> tuple[str, str]:
    paths = plan.paths
    live = mig.rewrite(Domain(dom.XMLDesc(SECURE)), paths)
    persistent = mig.rewrite(Domain(dom.XMLDesc(SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE)), paths)
    return live.to_xml(), persistent.to_xml()


def _start_paused(dom: libvirt.virDomain, rollback: Rollback) -> None:
    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    rollback.add("the paused start on the source", lambda: dom.isActive() and dom.destroy())


def _verify(plan: Plan, conn, dconn) -> libvirt.virDomain:
    moved = dconn.lookupByName(plan.name)
    if not moved.isPersistent():
        raise SaltKvmError(f"{plan.name} runs on {plan.target} but is not defined there")
    if plan.live and not moved.isActive():
        raise SaltKvmError(f"{plan.name} is defined on {plan.target} but does not run")
    with contextlib.suppress(libvirt.libvirtError):
        conn.lookupByName(plan.name)
        raise SaltKvmError(f"{plan.name} is still defined on {plan.source}")
    return moved


def _clean_source(plan: Plan, conn) -> dict:
    released, kept, deleted = [], [], []
    for network, mac, ip in plan.reservations:
        try:
            dhcp.release(conn, network, mac, ip)
            released.append(f"{network}|{mac}|{ip}")
        except (SaltKvmError, libvirt.libvirtError) as exc:
            log.warning("reservation %s on %s was not released: %s", ip, plan.source, exc)
    moved = [d.source_path for d in plan.disks]
    if plan.nvram is not None:
        moved.append(plan.nvram.source_path)
    for path in moved:
        try:
            if chains.delete_volume(conn, path, f"migration of {plan.name}"):
                deleted.append(path)
        except (ConflictError, libvirt.libvirtError) as exc:
            log.warning("volume %s on %s is kept: %s", path, plan.source, exc)
            kept.append(path)
    return {"released": released, "deleted_volumes": deleted, "kept_volumes": kept}


def run(
    conn: libvirt.virConnect, dconn: libvirt.virConnect, plan: Plan, emit: Emit | None = None
) -> dict:
    """Carry ``plan`` out; returns what moved. On failure before the guest is
    on the target, what was made there is removed and the source is as before."""
    emit = emit or (lambda _step, _data: None)
    started = time.monotonic()
    dom = lifecycle.lookup(conn, plan.name)
    rollback = Rollback()
    base = {"name": plan.name, "from": plan.source, "to": plan.target, "live": plan.live}
    emit("migrating", base)
    with rollback:
        _prepare_target(plan, conn, dconn, rollback, emit)
        _keep_forwards(plan, conn, rollback)
        if not plan.live:
            _start_paused(dom, rollback)
        live_xml, persistent_xml = _definitions(dom, plan)
        address = mig.stream_address(plan.target_uri, plan.request)
        parameters = mig.params(
            live_xml,
            persistent_xml,
            mig.migration_uri(address, plan.request.port),
            address,
            [d.target for d in plan.disks],
            plan.request.port,
        )
        emit("migrate_copying", {**base, "disks": [d.target for d in plan.disks]})
        mig.migrate(dom, dconn, parameters, mig.flags(plan.live, plan.incremental))
        rollback.forget()  # the guest is on the target: nothing there is undone now
    moved = dconn.lookupByName(plan.name)
    if not plan.live and moved.isActive():
        moved.destroy()  # moved paused: it was off
    _verify(plan, conn, dconn)
    cleaned = _clean_source(plan, conn)
    result = {
        **base,
        "disks": {d.target: d.target_path for d in plan.disks},
        "copied_bases": [b.target_path for b in plan.bases if b.copy],
        "nvram": plan.nvram.target_path if plan.nvram is not None else None,
        "reservations": {
            "moved": [f"{n}|{m}|{i}" for n, m, i in plan.reservations],
            "kept_on_source": plan.kept_reservations,
        },
        "source": cleaned,
        "nat": _forwards_shown(plan),
        "seconds": round(time.monotonic() - started, 2),
    }
    emit("migrated", result)
    return result


def _forwards_shown(plan: Plan) -> dict:
    if plan.forwards is None:
        return {}
    moved = plan.forwards
    pin = "|".join(moved.pin) if moved.pin else None
    return {"forwards": moved.shown, "on_host": moved.moved_to or "this host", "pinned": pin}


# ---- the driver's request ------------------------------------------------------


def check_target(value: object, hosts: dict[str, str] | None, source: str | None = None) -> str:
    """``location``: the host (of the provider's ``hosts``) to move the guest to."""
    if hosts is None:
        raise SpecError(
            "location",
            "this provider has one hypervisor (url): there is no other host to migrate to",
            "give the provider hosts: (name -> URI)",
        )
    accepted = ", ".join(sorted(hosts))
    if value in (None, ""):
        raise SpecError("location", "is required (the host to migrate to)", accepted)
    if not isinstance(value, str) or value not in hosts:
        raise SpecError(
            "location", f"{shown('location', value)} is not one of this provider's hosts", accepted
        )
    if value == source:
        raise SpecError("location", f"the guest is already on {value}", accepted)
    return value


def across(
    hosts: Fleet, name: str, location: object, request: mig.Request, cachedir: str, emit: Emit
) -> dict:
    """The driver's ``-a migrate``: ``name`` from whichever host it is on to
    the host ``location`` names, its room counted with the creates still
    running (under the master's placement lock, as ``auto`` counts it)."""
    with hosts.guest(name) as (source, conn):
        target = check_target(location, hosts.hosts, source)
        dconn = hosts.connect(hosts.hosts[target])
        try:
            placements = placement.Placements(cachedir)
            with placements.locked():
                planned = plan(
                    conn,
                    dconn,
                    name,
                    (source, target),
                    hosts.hosts[target],
                    request,
                    placements.running(),
                )
            return run(conn, dconn, planned, emit)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                dconn.close()
