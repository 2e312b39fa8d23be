"""Create a guest from a VM spec: plan and check, clone, size, reserve, boot, learn its IP.

Deployment (making it a minion) is the caller's: it needs Salt. Every step
records its undo in the caller's ``Rollback``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import libvirt

from . import addresses, clone, connection, dhcp, lifecycle, sizing
from .domxml import Domain
from .errors import ConflictError, SaltKvmError
from .rollback import Rollback
from .spec import VMSpec

log = logging.getLogger(__name__)
Emit = Callable[[str, dict], None]


@dataclass
class Guest:
    name: str
    domain: libvirt.virDomain
    macs: list[str]
    addresses: list[str] = field(default_factory=list)
    existed: bool = False
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)

    def mark(self, step: str) -> None:
        """Record when ``step`` finished, in seconds since the create began."""
        self.timings[step] = round(time.monotonic() - self.started, 2)


def _check_fixed_macs(conn: libvirt.virConnect, spec: VMSpec) -> None:
    taken = clone.used_macs(conn)
    for index, nic in enumerate(spec.nics or []):
        if nic.mac and nic.mac in taken:
            raise ConflictError(f"nics[{index}].mac: {nic.mac} is already used by another domain")
        if nic.ip and nic.network:
            dhcp.check(conn, nic.network, nic.mac, nic.ip, f"nics[{index}].ip")


def _customize(spec: VMSpec, taken: set[str]) -> Callable[[Domain], None]:
    def customize(xml: Domain) -> None:
        sizing.apply(xml, spec)
        for iface in xml.interfaces:
            if not iface.mac:
                iface.mac = clone.new_mac(taken)

    return customize


def _reserve(conn, spec: VMSpec, rollback: Rollback) -> list[str]:
    made = []
    for nic in spec.nics or []:
        if nic.ip and nic.network:
            if dhcp.reserve(conn, nic.network, nic.mac, nic.ip, spec.name):
                rollback.add(
                    f"DHCP reservation {nic.ip} on {nic.network}",
                    lambda n=nic: dhcp.release(conn, n.network, n.mac, n.ip),
                )
            made.append(f"{nic.network}|{nic.mac}|{nic.ip}")
    return made


def create(conn: libvirt.virConnect, spec: VMSpec, rollback: Rollback, emit: Emit) -> Guest:
    """Clone and boot ``spec``; return the running guest with its addresses."""
    started = time.monotonic()
    existing = _existing(conn, spec.name)
    if existing is not None:
        guest = Guest(spec.name, existing, addresses.domain_macs(existing), existed=True)
        emit("requesting", {"name": spec.name, "existing": True})
    else:
        guest = _clone(conn, spec, rollback, emit)
    guest.started = started
    guest.mark("clone")
    if not guest.domain.isActive():
        guest.domain.create()
        if not guest.existed:
            rollback.add(f"running {spec.name}", lambda: _stop(guest.domain))
    guest.mark("start")
    emit("waiting_for_ip", {"name": spec.name, "ip_source": spec.ip_source, "macs": guest.macs})
    guest.addresses = addresses.wait_for_addresses(
        guest.domain,
        spec.ip_source,
        spec.wait_for_ip_timeout,
        spec.wait_for_ip_interval,
        guest.macs,
    )
    guest.mark("ip")
    return guest


def _existing(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return None
    if lifecycle.managed_info(dom) is None:
        raise ConflictError(
            f"a domain named {name!r} already exists on {conn.getURI()} and was not created by "
            "salt-kvm; choose another name"
        )
    return dom


def _clone(conn: libvirt.virConnect, spec: VMSpec, rollback: Rollback, emit: Emit) -> Guest:
    base_type = None
    if _has(conn, spec.base_domain):
        base = conn.lookupByName(spec.base_domain)
        base_type = Domain(base.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).type
    virt_type = connection.resolve_virt_type(conn, spec.virt_type, base_type)
    plan = clone.plan_clone(
        conn, spec.base_domain, spec.name, spec.clone_strategy, virt_type, spec.disk_size
    )
    _check_fixed_macs(conn, spec)
    emit(
        "requesting",
        {
            "name": spec.name,
            "base_domain": spec.base_domain,
            "clone_strategy": spec.clone_strategy,
            "virt_type": virt_type,
        },
    )
    reservations = _reserve(conn, spec, rollback)
    dom = clone.clone_domain(
        conn,
        plan,
        rollback,
        customize=_customize(spec, clone.used_macs(conn)),
        validate=spec.validate_xml,
        info={"reservations": reservations} if reservations else None,
    )
    if spec.autostart:
        dom.setAutostart(1)
    return Guest(spec.name, dom, addresses.domain_macs(dom))


def _has(conn, name):
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError:
        return False


def _stop(dom: libvirt.virDomain) -> None:
    if dom.isActive():
        dom.destroy()


def release_reservations(conn: libvirt.virConnect, info: dict) -> list[str]:
    released = []
    for item in info.get("reservations") or []:
        network, mac, ip = item.split("|")
        try:
            dhcp.release(conn, network, mac, ip)
            released.append(item)
        except (SaltKvmError, libvirt.libvirtError) as exc:
            log.warning("reservation %s was not released: %s", item, exc)
    return released
