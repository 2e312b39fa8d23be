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

from salt_kvm.cloud import (
    addresses,
    choices,
    clone,
    dhcp,
    hostcheck,
    machine,
    nics,
    seed,
    sharehost,
    sizing,
)
from salt_kvm.cloud.spec import VMSpec
from salt_kvm.disks import ops as diskops
from salt_kvm.errors import ConflictError, SaltKvmError, SpecError
from salt_kvm.images import cache as images
from salt_kvm.nat import forwards
from salt_kvm.virt import accel, chains, identity, lifecycle, names, virtiofs
from salt_kvm.virt.domain import Domain, new_domain
from salt_kvm.virt.rollback import Rollback

log = logging.getLogger(__name__)
Emit = Callable[[str, dict], None]
# A guest built on an image gets these unless the profile sizes it.
IMAGE_MEMORY_MIB = 1024
DEFAULT_NETWORK = "default"


@dataclass
class Guest:
    name: str
    domain: libvirt.virDomain
    macs: list[str]
    addresses: list[str] = field(default_factory=list)
    existed: bool = False
    seed_path: str | None = None
    seed_target: str | None = None
    virt_type_note: str | None = None  # why ``auto`` gave qemu, when it did
    started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)

    def mark(self, step: str) -> None:
        """Record when ``step`` finished, in seconds since the create began."""
        self.timings[step] = round(time.monotonic() - self.started, 2)
        log.info("%s: %s done at %.1f s", self.name, step, self.timings[step])


def _check_networks(conn: libvirt.virConnect, spec: VMSpec) -> None:
    """A NIC's network exists and runs, or the profile is refused by name."""
    wanted = [(i, nic.network) for i, nic in enumerate(spec.nics or []) if nic.network]
    if not wanted:
        return
    nets = {net.name(): net for net in conn.listAllNetworks(0)}
    active = sorted(name for name, net in nets.items() if net.isActive())
    for index, name in wanted:
        if name not in nets:
            raise SpecError(
                f"nics[{index}].network",
                f"no network named {name!r} on {conn.getURI()}",
                ", ".join(active) or "none active (virsh net-list --all)",
            )
        if not nets[name].isActive():
            raise SpecError(
                f"nics[{index}].network",
                f"network {name!r} is not active (virsh net-start {name})",
                ", ".join(active) or "none active",
            )


def _check_fixed_macs(conn: libvirt.virConnect, spec: VMSpec, taken: set[str]) -> None:
    for index, nic in enumerate(spec.nics or []):
        if nic.mac and nic.mac in taken:
            raise ConflictError(f"nics[{index}].mac: {nic.mac} is already used by another domain")
        if nic.ip and nic.network and nic.mac:  # a fixed ip comes with its mac (spec)
            dhcp.check(conn, nic.network, nic.mac, nic.ip, f"nics[{index}].ip")
        if nic.ip6 and nic.network and nic.mac:  # so does ip6
            dhcp.check(conn, nic.network, nic.mac, nic.ip6, f"nics[{index}].ip6")


def _customize(
    spec: VMSpec,
    taken: set[str],
    guest: Guest,
    machine_plan: machine.MachinePlan,
    hostdevs: list[hostcheck.Resolved] | tuple = (),
    shared: sharehost.Checked | None = None,
) -> Callable[[Domain], None]:
    def customize(xml: Domain) -> None:
        machine.apply(xml, machine_plan)
        sizing.apply(xml, spec)
        for device in hostdevs:
            xml.node.find("devices").append(device.element())
        if shared is not None:
            virtiofs.add_shares(xml, shared.shares)
        for iface in xml.interfaces:
            if not iface.mac:
                iface.mac = identity.new_mac(taken)
        if guest.seed_path:
            guest.seed_target = seed.attach(xml, guest.seed_path)

    return customize


def _reserve(conn, spec: VMSpec, rollback: Rollback) -> list[str]:
    made = []
    for nic in spec.nics or []:
        if not (nic.network and nic.mac):  # a fixed ip comes with its mac (spec)
            continue
        for ip in (nic.ip, nic.ip6):  # IPv4 by MAC, IPv6 by the MAC's DUID-LL
            if not ip:
                continue
            rollback.intend("reservation", network=nic.network, mac=nic.mac, ip=ip)
            if dhcp.reserve(conn, nic.network, nic.mac, ip, spec.name):
                rollback.add(
                    f"DHCP reservation {ip} on {nic.network}",
                    _releaser(conn, rollback, nic.network, nic.mac, ip),
                )
            made.append(f"{nic.network}|{nic.mac}|{ip}")
    return made


def create(
    conn: libvirt.virConnect,
    spec: VMSpec,
    rollback: Rollback,
    emit: Emit,
    seed_iso: bytes | None = None,
    watch: Callable[[Guest], None] | None = None,
    record: dict | None = None,
) -> Guest:
    """Clone and boot ``spec``; return the running guest with its addresses.

    ``seed_iso`` (a NoCloud ISO) is attached to a new clone's first boot.
    ``record`` adds fields to a new clone's salt-kvm metadata (the minion id).
    ``watch`` is called now and then while the guest has no address yet; it
    raises when the guest reports that it cannot come up.
    """
    started = time.monotonic()
    if spec.nat_rules:
        forwards.check_local(conn)
        forwards.check_free(spec.name, spec.nat_rules)
    existing = _existing(conn, spec.name)
    if existing is not None:
        guest = Guest(spec.name, existing, addresses.domain_macs(existing), existed=True)
        emit("requesting", {"name": spec.name, "existing": True})
    else:
        guest = _clone(conn, spec, rollback, emit, seed_iso, record)
    guest.started = started
    guest.mark("clone")
    if not guest.domain.isActive():
        guest.domain.create()
        if not guest.existed:
            uuid = guest.domain.UUIDString()
            rollback.add(
                f"running {spec.name}",
                lambda: _stop(rollback.live(conn).lookupByUUIDString(uuid)),
            )
    guest.mark("start")
    emit("waiting_for_ip", {"name": spec.name, "ip_source": spec.ip_source, "macs": guest.macs})
    if spec.ip_source == choices.SOURCE_PLAN:  # the guest sets them itself (nics[].ip)
        guest.addresses = nics.planned(spec.nics)
    else:
        guest.addresses = addresses.wait_for_addresses(
            guest.domain,
            spec.ip_source,
            spec.wait_for_ip_timeout,
            spec.wait_for_ip_interval,
            guest.macs,
            check=None if watch is None else lambda: watch(guest),
            # A dual-stack network may lease IPv6 first: forwards need IPv4.
            accept=addresses.has_ipv4 if spec.nat_rules else None,
        )
    guest.mark("ip")
    if spec.nat_rules:
        rollback.intend("nat", name=spec.name)
        # The undo first: a write that fails half-way is undone too.
        rollback.add(f"NAT forwards of {spec.name}", forwards.undo_for(spec.name))
        forwards.apply(conn, spec.name, spec.nat_rules, max(len(spec.nat_rules), 1))
        guest.mark("nat")
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


def _releaser(
    conn: libvirt.virConnect, rollback: Rollback, network: str, mac: str, ip: str
) -> Callable[[], object]:
    return lambda: dhcp.release(rollback.live(conn), network, mac, ip)


def _plan_image(
    conn: libvirt.virConnect, spec: VMSpec, image: images.ImageSpec, emit: Emit
) -> tuple[clone.ClonePlan, accel.VirtChoice]:
    """Fetch (or find cached) the profile's image and plan a guest on it. The
    domain is new: no base to copy the definition from."""
    clone.check_name_free(conn, spec.name)

    def progress(data: dict) -> None:
        emit("downloading", {"name": spec.name, "image": image.shown, **data})

    cached = images.ensure(conn, image, progress)
    choice = accel.choose_virt_type(conn, spec.virt_type, None, (cached.path, cached.format))
    networks = tuple(n.network for n in spec.nics or [] if n.network) or (DEFAULT_NETWORK,)
    xml = new_domain(
        spec.name,
        choice.virt_type,
        spec.memory_mib or IMAGE_MEMORY_MIB,
        spec.cpus or 1,
        cached.path,
        cached.format,
        networks=networks,
    )
    plan = clone.plan_image(conn, cached, xml, spec.clone_strategy, spec.disk_size)
    plan.image_info = {"image": cached.name, "image_source": image.shown}
    return plan, choice


def _boot_disk(plan: clone.ClonePlan) -> tuple[str, str] | None:
    """The base's first disk as a file (path, format), for a KVM probe to boot."""
    disks = [d for d in plan.xml.disks if d.device == "disk"]
    if not disks or not disks[0].path:
        return None
    return disks[0].path, disks[0].driver_type or "raw"


def _clone(
    conn: libvirt.virConnect,
    spec: VMSpec,
    rollback: Rollback,
    emit: Emit,
    seed_iso: bytes | None,
    record: dict | None = None,
) -> Guest:
    _check_networks(conn, spec)
    hostcheck.check_direct(conn, spec)
    hostdevs = hostcheck.resolve_hostdevs(conn, spec.hostdevs, spec.hostdev_allowed)
    taken = identity.used_macs(conn)
    _check_fixed_macs(conn, spec, taken)
    diskops.precheck(conn, spec.name, spec.disks)
    shared = sharehost.check(conn, spec.shares, spec.share_allowed_dirs)
    if spec.image is not None:
        plan, choice = _plan_image(conn, spec, spec.image, emit)
    else:
        assert spec.base_domain is not None  # build_spec: base_domain or image
        plan = clone.plan_clone(
            conn, spec.base_domain, spec.name, spec.clone_strategy, None, spec.disk_size
        )
        # plan.xml is still the base's definition here: its type is the base's.
        choice = accel.choose_virt_type(conn, spec.virt_type, plan.xml.type, _boot_disk(plan))
        plan.virt_type = choice.virt_type
    machine_plan = machine.plan(
        conn, spec.features, spec.name, plan.xml, choice.virt_type, plan.disks[0].pool
    )
    requesting = {
        "name": spec.name,
        "base_domain": spec.base_domain,
        "image": spec.image.shown if spec.image else None,
        "clone_strategy": spec.clone_strategy,
        "virt_type": choice.virt_type,
    }
    if choice.note:
        requesting["virt_type_note"] = choice.note
    if shared.unchecked:
        requesting["shares_unchecked"] = shared.unchecked
    emit("requesting", requesting)
    reservations = _reserve(conn, spec, rollback)
    guest = Guest(spec.name, None, [])
    guest.virt_type_note = choice.note
    info: dict = {"reservations": reservations} if reservations else {}
    info.update(plan.image_info)
    info.update(record or {})
    info.update(sharehost.mounts_info(spec.shares))
    if seed_iso is not None:
        seed_name = names.seed_volume_name(spec.name)
        rollback.intend("volume", pool=plan.disks[0].pool, name=seed_name)
        vol = seed.upload(conn, plan.disks[0].pool, seed_name, seed_iso)
        seed_path = vol.path()
        chains.delete_on_rollback(rollback, conn, seed_path, "seed volume")
        guest.seed_path = info["seed"] = seed_path
    machine.make(conn, machine_plan, rollback)
    if machine_plan.nvram:
        info["nvram"] = machine_plan.nvram
    guest.domain = clone.clone_domain(
        conn,
        plan,
        rollback,
        customize=_customize(spec, taken, guest, machine_plan, hostdevs, shared),
        validate=spec.validate_xml,
        info=info or None,
        taken=taken,
    )
    diskops.attach_profile(conn, guest.domain, spec.disks, rollback)
    if spec.autostart:
        guest.domain.setAutostart(1)
    guest.macs = addresses.domain_macs(guest.domain)
    return guest


def detach_seed(conn: libvirt.virConnect, guest: Guest) -> None:
    """The guest has read its seed: eject it and delete the volume (keys in it)."""
    if not guest.seed_path or guest.seed_target is None:  # attached: it has a target
        return
    seed.eject(guest.domain, guest.seed_target)
    chains.delete_volume(conn, guest.seed_path, "seed deletion")
    # Secure: the definition is written back whole, with its console's password.
    secure = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    xml = Domain(guest.domain.XMLDesc(secure))
    info = xml.managed_info() or {}
    info.pop("seed", None)
    xml.set_managed_info(info)
    conn.defineXML(xml.to_xml())
    guest.seed_path = guest.seed_target = None


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
