"""Clone a base domain: linked (qcow2 overlay) or full copies of its disks.

``plan_clone`` reads the base and checks everything before anything is made;
``clone_domain`` then creates volumes and defines the new domain, recording an
undo step for each so a failure leaves nothing behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import libvirt

from salt_kvm.cloud.choices import STRATEGIES, STRATEGY_FULL, STRATEGY_QUICK  # noqa: F401
from salt_kvm.errors import ConflictError, NotFoundError, SaltKvmError, SpecError
from salt_kvm.images.cache import CachedImage
from salt_kvm.virt import chains, names
from salt_kvm.virt.domain import Disk, Domain
from salt_kvm.virt.identity import prepare_identity, used_macs
from salt_kvm.virt.lifecycle import define
from salt_kvm.virt.rollback import Rollback
from salt_kvm.virt.volumes import Volume, volume_format

log = logging.getLogger(__name__)


@dataclass
class DiskPlan:
    target: str
    base_path: str
    base_format: str
    base_capacity: int
    pool: str
    volume_name: str
    capacity: int
    format: str


@dataclass
class ClonePlan:
    name: str
    base: str
    strategy: str
    virt_type: str
    xml: Domain
    disks: list[DiskPlan] = field(default_factory=list)
    # Extra fields of the salt-kvm metadata tag (the image a guest is built on).
    image_info: dict = field(default_factory=dict)


def _lookup_volume(conn: libvirt.virConnect, disk: Disk) -> libvirt.virStorageVol:
    try:
        if disk.source_pool and disk.source_volume:
            return conn.storagePoolLookupByName(disk.source_pool).storageVolLookupByName(
                disk.source_volume
            )
        return conn.storageVolLookupByPath(disk.path)
    except libvirt.libvirtError as exc:
        raise SaltKvmError(
            f"the base disk {disk.path or disk.source_volume!r} ({disk.target_dev}) is not a "
            "volume of a libvirt storage pool; put its directory in a pool "
            "(virsh pool-define-as NAME dir --target DIR) so salt-kvm can clone it"
        ) from exc


def _is_clonable(disk: Disk) -> bool:
    flags = {child.tag for child in disk.node}
    return disk.device == Disk.DEVICE_DISK and not ({"readonly", "shareable"} & flags)


def check_name_free(conn: libvirt.virConnect, name: str) -> None:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    raise ConflictError(f"a domain named {name!r} already exists on {conn.getURI()}")


def _disk_plan(
    pool: libvirt.virStoragePool,
    target: str,
    base: tuple[str, str, int],
    volume_name: str,
    fmt: str,
    root_size: int | None,
) -> DiskPlan:
    """One disk of the clone; ``base`` is the source's (path, format, capacity)."""
    base_path, base_format, capacity = base
    wanted = capacity
    if root_size is not None:
        if root_size < capacity:
            raise SpecError(
                "disk_size",
                f"{root_size} bytes is smaller than the base disk ({capacity} bytes); "
                "disks can only grow",
                f"at least {capacity} bytes",
            )
        wanted = root_size
    if volume_name in pool.listVolumes():
        raise ConflictError(
            f"volume {volume_name!r} already exists in pool {pool.name()!r}; "
            "salt-kvm will not overwrite it"
        )
    return DiskPlan(target, base_path, base_format, capacity, pool.name(), volume_name, wanted, fmt)


def _check_request(name: str, strategy: str) -> None:
    names.check_vm_name(name)
    if strategy not in STRATEGIES:
        raise SpecError("clone_strategy", f"{strategy!r} is not a clone strategy", STRATEGIES)


def plan_image(
    conn: libvirt.virConnect,
    image: CachedImage,
    xml: Domain,
    strategy: str = STRATEGY_QUICK,
    root_size: int | None = None,
) -> ClonePlan:
    """Like ``plan_clone`` for a guest built on a cached image: ``xml`` is its
    new definition (one disk, vda); the image is the backing volume (quick) or
    is copied (full)."""
    _check_request(xml.name, strategy)
    check_name_free(conn, xml.name)
    pool = conn.storagePoolLookupByName(image.pool)
    fmt = "qcow2" if strategy == STRATEGY_QUICK else image.format
    disk = _disk_plan(
        pool,
        "vda",
        (image.path, image.format, image.capacity),
        names.root_volume_name(xml.name, fmt),
        fmt,
        root_size,
    )
    return ClonePlan(xml.name, image.name, strategy, xml.type, xml, [disk])


def plan_clone(
    conn: libvirt.virConnect,
    base_name: str,
    name: str,
    strategy: str = STRATEGY_QUICK,
    virt_type: str | None = None,
    root_size: int | None = None,
) -> ClonePlan:
    """Check the request against the hypervisor; create nothing."""
    _check_request(name, strategy)
    try:
        base = conn.lookupByName(base_name)
    except libvirt.libvirtError as exc:
        raise NotFoundError(
            f"base_domain: no domain named {base_name!r} on {conn.getURI()}"
        ) from exc
    check_name_free(conn, name)
    if strategy == STRATEGY_QUICK and base.isActive():
        raise ConflictError(
            f"base domain {base_name!r} is running: a quick (linked) clone needs it shut off, "
            "since the running guest holds the write lock on its disk and would change the "
            "backing image under the clone. Shut it down or use clone_strategy: full"
        )
    xml = Domain(base.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    plan = ClonePlan(name, base_name, strategy, virt_type or xml.type or "kvm", xml)
    clonable = [d for d in xml.disks if _is_clonable(d)]
    if not clonable:
        raise SaltKvmError(f"base domain {base_name!r} has no disk to clone")
    for index, disk in enumerate(clonable):
        vol = _lookup_volume(conn, disk)
        pool = vol.storagePoolLookupByVolume()
        base_format = volume_format(vol)
        fmt = "qcow2" if strategy == STRATEGY_QUICK else base_format
        _, capacity, _ = vol.info()
        volume_name = (
            names.root_volume_name(name, fmt)
            if index == 0
            else names.extra_volume_name(name, disk.target_dev, fmt)
        )
        plan.disks.append(
            _disk_plan(
                pool,
                disk.target_dev,
                (vol.path(), base_format, capacity),
                volume_name,
                fmt,
                root_size if index == 0 else None,
            )
        )
    return plan


def _volume_xml(disk: DiskPlan, with_backing: bool) -> str:
    capacity = disk.capacity if with_backing else disk.base_capacity
    vol = Volume.new(disk.volume_name, capacity, disk.format, v3=True)
    if with_backing:
        vol.set_backing(disk.base_path, disk.base_format)
    return vol.to_xml()


def create_volume(
    conn: libvirt.virConnect, plan: ClonePlan, disk: DiskPlan
) -> libvirt.virStorageVol:
    pool = conn.storagePoolLookupByName(disk.pool)
    if plan.strategy == STRATEGY_QUICK:
        return pool.createXML(_volume_xml(disk, with_backing=True), 0)
    base_vol = conn.storageVolLookupByPath(disk.base_path)
    vol = pool.createXMLFrom(_volume_xml(disk, with_backing=False), base_vol, 0)
    if disk.capacity > disk.base_capacity:
        vol.resize(disk.capacity, 0)
    return vol


def clone_domain(
    conn: libvirt.virConnect,
    plan: ClonePlan,
    rollback: Rollback,
    customize: Callable[[Domain], None] | None = None,
    validate: bool = True,
    info: dict | None = None,
    taken: set[str] | None = None,
) -> libvirt.virDomain:
    """Create the planned volumes and define the clone; undo steps go to ``rollback``.

    ``customize`` edits the clone's XML (sizing, NICs) before it is defined;
    ``info`` adds fields to the salt-kvm metadata tag; ``taken`` is the host's
    MACs if the caller already listed them (new ones are added to it).
    """
    taken = used_macs(conn) if taken is None else taken
    xml = prepare_identity(plan.xml, plan.name, plan.virt_type, taken)
    if customize is not None:
        customize(xml)
    clonable = [d for d in xml.disks if _is_clonable(d)]
    created = []
    for disk_xml, disk in zip(clonable, plan.disks, strict=True):
        rollback.intend("volume", pool=disk.pool, name=disk.volume_name)
        path = create_volume(conn, plan, disk).path()
        chains.delete_on_rollback(rollback, conn, path)
        created.append(path)
        disk_xml.path = path
        disk_xml.driver_type = disk.format
    xml.set_managed_info(
        {
            "base": plan.base,
            "strategy": plan.strategy,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "volumes": created,
            **(info or {}),
        }
    )
    return define(conn, xml, rollback, validate)
