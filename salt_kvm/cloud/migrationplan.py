"""What a migration will do, checked before anything moves (see
``salt_kvm.cloud.migration`` for the move itself).

Everything the target must offer is checked, and every cause is named at
once: the same host, room (memory and vCPUs, as ``location: auto`` counts
it), the guest's networks, its CPU, its disks' pools and the base of a quick
clone, a name or UUID already there, and what cannot move at all (snapshots,
checkpoints, host devices, virtiofs shares, a TPM, read-only media, the NAT
forwards of a target that serves addresses itself). The result, a ``Plan``,
lists each disk's volume on the target, the base to copy, the UEFI variables
file, the DHCP reservations to move and what becomes of the guest's NAT
forwards.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from dataclasses import dataclass, field

import libvirt
from lxml import etree

from salt_kvm.cloud import dhcp, placement
from salt_kvm.errors import ConflictError, SaltKvmError
from salt_kvm.nat.store import Store
from salt_kvm.virt import connection, firmware, lifecycle
from salt_kvm.virt import migrate as mig
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.host import network_active
from salt_kvm.virt.network import Network
from salt_kvm.virt.pools import Pool, refresh
from salt_kvm.virt.volumes import Volume

log = logging.getLogger(__name__)


@dataclass
class Base:
    """A quick clone's base volume, and where the target has (or gets) it."""

    pool: str
    volume: str
    fmt: str
    capacity: int
    source_path: str
    target_path: str
    copy: bool = False


@dataclass
class DiskMove:
    target: str  # the guest's device (vda)
    source_path: str
    pool: str
    volume: str
    fmt: str
    capacity: int
    target_path: str
    base: Base | None = None


@dataclass
class ForwardsMove:
    """The guest's NAT forwards, kept in this host's kernel and store
    (salt_kvm.nat): they stay here while the guest runs on a host bridged onto
    the segment this host serves (its address does not change)."""

    shown: str  # "tcp 10022->22, ..."
    moved_to: str  # where the store records the guest after ("": this host)
    pin: tuple[str, str, str] | None = None  # (network, mac, ip) to reserve on the source


@dataclass
class NvramMove:
    """The guest's UEFI variables file (a pool volume): copied to the pool of
    the same name on the target before the move."""

    source_path: str
    pool: str
    volume: str
    capacity: int
    target_path: str


@dataclass
class Plan:
    name: str
    source: str
    target: str
    live: bool
    request: mig.Request
    target_uri: str
    disks: list[DiskMove] = field(default_factory=list)
    reservations: list[tuple[str, str, str]] = field(default_factory=list)  # moved
    kept_reservations: list[str] = field(default_factory=list)  # on a bridged segment
    refused: list[str] = field(default_factory=list)
    forwards: ForwardsMove | None = None  # NAT forwards of this host for the guest
    nvram: NvramMove | None = None

    @property
    def bases(self) -> list[Base]:
        found: dict[str, Base] = {}
        for disk in self.disks:
            if disk.base is not None:
                found.setdefault(disk.base.target_path, disk.base)
        return list(found.values())

    @property
    def incremental(self) -> bool:
        return any(d.base is not None for d in self.disks)

    @property
    def paths(self) -> dict[str, str]:
        found = {d.source_path: d.target_path for d in self.disks}
        if self.nvram is not None:
            found[self.nvram.source_path] = self.nvram.target_path
        return found


# ---- the checks -------------------------------------------------------------


def _host_uuid(conn: libvirt.virConnect) -> str | None:
    node = etree.fromstring(conn.getCapabilities().encode()).find("host/uuid")
    return None if node is None else node.text


def _check_target_room(
    plan: Plan, dconn: libvirt.virConnect, xml: Domain, running: list[dict]
) -> None:
    room = placement.room(dconn, plan.target)
    placement.count_running([room], running, plan.name)
    room.need_memory_mib = xml.memory_mib()
    room.need_cpus = xml.vcpus or 1
    why = room.refusal()
    if why:
        plan.refused.append(f"{plan.target} {why}")


def _check_networks(plan: Plan, dconn: libvirt.virConnect, xml: Domain) -> None:
    for iface in xml.interfaces:
        network = iface.source_network
        if iface.type == "network" and network and not network_active(dconn, network):
            plan.refused.append(f"{plan.target} has no active network {network}")


def _check_cpu(plan: Plan, conn: libvirt.virConnect, dconn: libvirt.virConnect, xml: Domain):
    """The guest's CPU against the target's: host-passthrough needs the same
    host CPU (or a newer one); a named model, the target's hypervisor's support."""
    cpu = xml.node.find("cpu")
    if cpu is None:
        return
    mode = cpu.get("mode") or "custom"
    try:
        if mode in ("host-passthrough", "maximum"):
            host_cpu = etree.fromstring(conn.getCapabilities().encode()).find("host/cpu")
            if host_cpu is None:
                return
            result = dconn.compareCPU(etree.tostring(host_cpu).decode(), 0)
        elif cpu.find("model") is not None:
            os_type = xml.node.find("os/type")
            arch = os_type.get("arch") if os_type is not None else None
            machine = os_type.get("machine") if os_type is not None else None
            result = dconn.compareHypervisorCPU(
                None, arch, machine, xml.type, etree.tostring(cpu).decode(), 0
            )
        else:
            return
    except libvirt.libvirtError as exc:  # the migration's own check says it then
        log.info("CPU comparison with %s not available: %s", plan.target, exc)
        return
    if result == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
        plan.refused.append(f"{plan.target}'s CPU cannot run the guest's CPU ({mode})")


def _check_identity(plan: Plan, dconn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
    for what, lookup in (
        (f"a domain named {plan.name}", lambda: dconn.lookupByName(plan.name)),
        (
            f"a domain with UUID {dom.UUIDString()}",
            lambda: dconn.lookupByUUIDString(dom.UUIDString()),
        ),
    ):
        try:
            lookup()
        except libvirt.libvirtError:
            continue
        plan.refused.append(f"{plan.target} already has {what}")


def _target_pool(plan: Plan, dconn: libvirt.virConnect, name: str):
    try:
        pool = dconn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        plan.refused.append(f"{plan.target} has no storage pool {name}")
        return None
    if not pool.isActive():
        plan.refused.append(f"{plan.target}'s storage pool {name} is not running")
        return None
    refresh(pool)
    return pool


def _volume_of(conn: libvirt.virConnect, path: str):
    try:
        vol = conn.storageVolLookupByPath(path)
    except libvirt.libvirtError:
        return None, None
    return vol, vol.storagePoolLookupByVolume().name()


def _plan_base(plan: Plan, conn, dconn, disk: DiskMove, backing: str) -> Base | None:
    vol, pool_name = _volume_of(conn, backing)
    if vol is None or pool_name is None:
        plan.refused.append(
            f"the base {backing} of disk {disk.target} is in no storage pool of {plan.source}"
        )
        return None
    facts = Volume(vol.XMLDesc(0))
    base = Base(
        pool_name, vol.name(), facts.format or "raw", facts.capacity or 0, backing, "", False
    )
    pool = _target_pool(plan, dconn, pool_name)
    if pool is None:
        return None
    try:
        there = pool.storageVolLookupByName(vol.name())
    except libvirt.libvirtError:
        there = None
    if there is not None:
        have = Volume(there.XMLDesc(0))
        if (have.format or "raw", have.capacity) != (base.fmt, base.capacity):
            plan.refused.append(
                f"the base {vol.name()} of disk {disk.target} differs on {plan.target} "
                f"({have.format}, {have.capacity} bytes; here {base.fmt}, {base.capacity} bytes)"
            )
            return None
        base.target_path = there.path()
        return base
    if not plan.request.copy_base:
        plan.refused.append(
            f"the base {vol.name()} of disk {disk.target} (a quick clone) is not on "
            f"{plan.target} in pool {pool_name}: copy_base=true copies it there"
        )
        return None
    if facts.backing_path:
        plan.refused.append(
            f"the base {vol.name()} is itself an overlay: copy_base copies no chain"
        )
        return None
    base.target_path = f"{Pool(pool.XMLDesc(0)).target_path}/{vol.name()}"
    base.copy = True
    return base


def _plan_disks(plan: Plan, conn, dconn, xml: Domain) -> None:
    for disk in xml.disks:
        if disk.device != disk.DEVICE_DISK or not disk.path or disk.readonly:
            continue  # refused by mig.refusals (or an empty drive: nothing to move)
        vol, pool_name = _volume_of(conn, disk.path)
        label = disk.target_dev or "?"
        if vol is None or pool_name is None:
            plan.refused.append(
                f"disk {label} ({disk.path}) is in no storage pool of {plan.source}"
            )
            continue
        facts = Volume(vol.XMLDesc(0))
        pool = _target_pool(plan, dconn, pool_name)
        if pool is None:
            continue
        with contextlib.suppress(libvirt.libvirtError):
            pool.storageVolLookupByName(vol.name())
            plan.refused.append(
                f"{plan.target}'s pool {pool_name} already has a volume {vol.name()}"
            )
            continue
        move = DiskMove(
            label,
            disk.path,
            pool_name,
            vol.name(),
            facts.format or "raw",
            facts.capacity or 0,
            f"{Pool(pool.XMLDesc(0)).target_path}/{vol.name()}",
        )
        if facts.backing_path:
            move.base = _plan_base(plan, conn, dconn, move, facts.backing_path)
        plan.disks.append(move)


def _plan_nvram(plan: Plan, conn, dconn, xml: Domain) -> None:
    """UEFI variables of its own move as a volume of the same name in the
    target's pool of the same name (the domain's ``<nvram>`` then names it)."""
    path = firmware.nvram_path(xml)
    if not path:
        return
    vol, pool_name = _volume_of(conn, path)
    if vol is None or pool_name is None:
        plan.refused.append(
            f"its UEFI variables (NVRAM) {path} are in no storage pool of {plan.source}"
        )
        return
    pool = _target_pool(plan, dconn, pool_name)
    if pool is None:
        return
    with contextlib.suppress(libvirt.libvirtError):
        pool.storageVolLookupByName(vol.name())
        plan.refused.append(f"{plan.target}'s pool {pool_name} already has a volume {vol.name()}")
        return
    target = f"{Pool(pool.XMLDesc(0)).target_path}/{vol.name()}"
    plan.nvram = NvramMove(path, pool_name, vol.name(), vol.info()[1], target)


def _plan_reservations(plan: Plan, dconn, info: dict) -> None:
    """A reservation moves to the target's network of the same name when it
    serves DHCP for the address; a network there without addresses (bridged
    onto the segment another host serves) leaves it where it is."""
    for item in info.get("reservations") or []:
        network, mac, ip = item.split("|")
        try:
            net = Network(dconn.networkLookupByName(network).XMLDesc(0))
        except libvirt.libvirtError:
            continue  # named by _check_networks
        if not net.ips:
            plan.kept_reservations.append(item)
            continue
        address = ipaddress.ip_address(ip)
        serving = [i for i in net.ips if i.dhcp and i.subnet() and address in i.subnet()]
        if not serving:
            plan.refused.append(
                f"the reservation {ip} ({mac}) on network {network}: {plan.target}'s "
                f"{network} serves no DHCP for {ip}"
            )
            continue
        try:
            dhcp.check(dconn, network, mac, ip, "reservations")
        except SaltKvmError as exc:
            plan.refused.append(f"{plan.target}: {exc}")
            continue
        plan.reservations.append((network, mac, ip))


def _target_network(dconn: libvirt.virConnect, name: str) -> Network | None:
    try:
        return Network(dconn.networkLookupByName(name).XMLDesc(0))
    except libvirt.libvirtError:
        return None


def _reserved(conn: libvirt.virConnect, network: str, mac: str, ip: str) -> bool:
    try:
        net = Network(conn.networkLookupByName(network).XMLDesc(0))
    except libvirt.libvirtError:
        return False
    return any((h.mac or "").lower() == mac and h.ip == ip for h in net.dhcp_hosts())


def _plan_forwards(plan: Plan, conn: libvirt.virConnect, dconn: libvirt.virConnect) -> None:
    """NAT forwards live in the kernel and ``/var/lib/salt-kvm/nat.json`` of
    the host this process runs on. A guest that leaves it (or moves on from
    the host it went to) keeps them when the target's network of that name is
    bridged onto the segment this host serves (no addresses of its own): the
    guest keeps its address, this host's DNAT still reaches it. Its address
    is pinned by a reservation on the source's network (made if it had none).
    Back on this host, they are its own again. A target network that serves
    addresses itself is another kernel's: refused by name."""
    entry = Store().load().get(plan.name)
    if entry is None or not entry.rules:
        return
    here = connection.remote_host(conn) is None
    if not entry.moved_to and not here:
        return  # another machine's guest of that name: its forwards are not in this store
    where = entry.placement
    shown = ", ".join(f"{r.proto} {r.host}->{r.guest}" for r in entry.rules)
    net = _target_network(dconn, where.network)
    if net is None:
        return  # named by _check_networks
    if net.ips:
        home = net.bridge == where.bridge and connection.remote_host(dconn) is None
        if entry.moved_to and home:
            plan.forwards = ForwardsMove(shown, "")  # back on the host that has them
            return
        plan.refused.append(
            f"it has NAT forwards on {entry.moved_to or plan.source} ({shown}) and "
            f"{plan.target}'s network {where.network} serves addresses itself: the "
            "forwards could not follow (another host's kernel); remove them first "
            f"(kvm_nat) and add them on {plan.target} after"
        )
        return
    found = ForwardsMove(shown, plan.target)
    if not entry.moved_to and not _reserved(conn, where.network, where.mac, where.address):
        try:
            dhcp.check(conn, where.network, where.mac, where.address, "nat_rules")
        except SaltKvmError as exc:
            plan.refused.append(
                f"its NAT forwards need its address {where.address} pinned on {plan.source}: {exc}"
            )
            return
        found.pin = (where.network, where.mac, where.address)
    plan.forwards = found


def plan(
    conn: libvirt.virConnect,
    dconn: libvirt.virConnect,
    name: str,
    hosts: tuple[str, str],
    target_uri: str,
    request: mig.Request,
    running: list[dict] | None = None,
) -> Plan:
    """Everything the migration of ``name`` from ``hosts[0]`` to ``hosts[1]``
    will do; refused (ConflictError naming every cause) before anything moves."""
    dom = lifecycle.lookup(conn, name)
    state = dom.state()[0]
    source, target = hosts
    live = state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED)
    found = Plan(name, source, target, live, request, target_uri)
    if not live and state != libvirt.VIR_DOMAIN_SHUTOFF:
        found.refused.append("it is neither running nor shut off")
    uuid = _host_uuid(conn)
    if uuid is not None and uuid == _host_uuid(dconn):
        found.refused.append(f"{target} is the host it is on ({source})")
        _raise(found)
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    found.refused += mig.refusals(dom, Domain(dom.XMLDesc(0)))
    _check_identity(found, dconn, dom)
    _check_target_room(found, dconn, xml, running or [])
    _check_networks(found, dconn, xml)
    _check_cpu(found, conn, dconn, xml)
    _plan_disks(found, conn, dconn, xml)
    _plan_nvram(found, conn, dconn, xml)
    _plan_reservations(found, dconn, xml.managed_info() or {})
    _plan_forwards(found, conn, dconn)
    _raise(found)
    return found


def _raise(found: Plan) -> None:
    if found.refused:
        raise ConflictError(
            f"migration of {found.name} to {found.target} refused, nothing moved: "
            + "; ".join(found.refused)
        )
