"""Clone a base domain: linked (qcow2 overlay) or full copies of its disks.

``plan_clone`` reads the base and checks everything before anything is made;
``clone_domain`` then creates volumes and defines the new domain, recording an
undo step for each so a failure leaves nothing behind.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import libvirt
from lxml import etree

from . import chains, names
from .domxml import Disk, Domain
from .errors import ConflictError, NotFoundError, SaltKvmError, SpecError
from .images import CachedImage
from .rollback import Rollback

log = logging.getLogger(__name__)

STRATEGY_QUICK = "quick"
STRATEGY_FULL = "full"
STRATEGIES = (STRATEGY_QUICK, STRATEGY_FULL)
MAC_PREFIX = "52:54:00"  # QEMU's locally administered range, as libvirt uses


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


def _volume_format(vol: libvirt.virStorageVol) -> str:
    fmt = etree.fromstring(vol.XMLDesc(0).encode()).find("target/format")
    return (fmt.get("type") if fmt is not None else None) or "raw"


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


def used_macs(conn: libvirt.virConnect) -> set[str]:
    macs = set()
    for dom in conn.listAllDomains(0):
        try:
            xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        except libvirt.libvirtError:
            continue  # undefined since the listing
        for iface in xml.interfaces:
            if iface.mac:
                macs.add(iface.mac.lower())
    return macs


def new_mac(taken: set[str], rng: random.Random | None = None) -> str:
    rng = rng or random.SystemRandom()
    for _ in range(1000):
        mac = MAC_PREFIX + "".join(f":{rng.randrange(256):02x}" for _ in range(3))
        if mac not in taken:
            taken.add(mac)
            return mac
    raise SaltKvmError("could not find a free MAC address in 52:54:00:xx:xx:xx")


def prepare_identity(xml: Domain, name: str, virt_type: str, taken_macs: set[str]) -> Domain:
    """Give the copy of the base definition its own identity (pure XML work)."""
    xml.node.attrib.pop("id", None)
    xml.type = virt_type
    xml.name = name
    xml.uuid = None  # libvirt makes a new one
    metadata = xml.node.find("metadata")
    if metadata is not None:
        xml.node.remove(metadata)
    for iface in xml.interfaces:
        iface.mac = new_mac(taken_macs)
        iface.target_dev = None
    _own_nvram(xml)
    devices = xml.node.find("devices")
    if devices is None:
        return xml
    for graphics in devices.findall("graphics"):
        for attr in ("port", "tlsPort", "websocket"):
            graphics.attrib.pop(attr, None)
        graphics.set("autoport", "yes")
    for chardev in (
        devices.findall("serial") + devices.findall("console") + devices.findall("channel")
    ):
        source = chardev.find("source")
        if source is not None and chardev.get("type") in ("pty", "unix"):
            # libvirt allocates a new pty / agent socket path per domain.
            source.attrib.pop("path", None)
            if not source.attrib:
                chardev.remove(source)
    for disk in xml.disks:
        if disk.device == Disk.DEVICE_CDROM:
            source = disk.node.find("source")
            if source is not None:
                disk.node.remove(source)  # eject: a base's ISO is not the clone's
    return xml


def _own_nvram(xml: Domain) -> None:
    """A copy never shares its origin's UEFI variables: the origin's NVRAM file
    (path or ``<source>``) is dropped, so libvirt makes the copy its own from
    the template; undefining the copy (which deletes its NVRAM) then leaves the
    origin's alone."""
    nvram = xml.node.find("os/nvram")
    if nvram is None:
        return
    keep = {k: v for k, v in nvram.attrib.items() if k in ("template", "templateFormat")}
    if not keep:
        nvram.getparent().remove(nvram)
        return
    nvram.getparent().replace(nvram, nvram.makeelement("nvram", keep))


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
    names.check_vm_name(xml.name)
    if strategy not in STRATEGIES:
        raise SpecError("clone_strategy", f"{strategy!r} is not a clone strategy", STRATEGIES)
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
    names.check_vm_name(name)
    if strategy not in STRATEGIES:
        raise SpecError("clone_strategy", f"{strategy!r} is not a clone strategy", STRATEGIES)
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
        base_format = _volume_format(vol)
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
    vol = etree.Element("volume", type="file")
    etree.SubElement(vol, "name").text = disk.volume_name
    etree.SubElement(vol, "capacity", unit="bytes").text = str(
        disk.capacity if with_backing else disk.base_capacity
    )
    target = etree.SubElement(vol, "target")
    etree.SubElement(target, "format", type=disk.format)
    if disk.format == "qcow2":
        # libvirt writes qcow2 v2 unless told; v3 holds the persistent dirty
        # bitmaps that incremental backups (checkpoints) need.
        etree.SubElement(target, "compat").text = "1.1"
    perms = etree.SubElement(target, "permissions")
    etree.SubElement(perms, "mode").text = "0600"
    if with_backing:
        backing = etree.SubElement(vol, "backingStore")
        etree.SubElement(backing, "path").text = disk.base_path
        etree.SubElement(backing, "format", type=disk.base_format)
    return etree.tostring(vol, encoding="unicode")


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


def delete_volume(conn: libvirt.virConnect, path: str) -> None:
    """Delete the volume at ``path`` (one already gone is fine), never while
    anything on the host needs it (see ``chains``)."""
    chains.delete_volume(conn, path, "rollback")


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
        rollback.add(f"volume {path}", lambda p=path: delete_volume(rollback.live(conn), p))
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


def define(
    conn: libvirt.virConnect, xml: Domain, rollback: Rollback, validate: bool = False
) -> libvirt.virDomain:
    """Define ``xml``; with ``validate``, libvirt checks it against its schema first."""
    flags = libvirt.VIR_DOMAIN_DEFINE_VALIDATE if validate else 0
    rollback.intend("domain", name=xml.name)
    try:
        dom = conn.defineXMLFlags(xml.to_xml(), flags)
    except libvirt.libvirtError as exc:
        raise SaltKvmError(f"libvirt refused the definition of {xml.name!r}: {exc}") from exc
    uuid = dom.UUIDString()
    rollback.add(
        f"domain {xml.name}", lambda: undefine(rollback.live(conn).lookupByUUIDString(uuid))
    )
    return dom


def undefine(dom: libvirt.virDomain) -> None:
    """Stop and undefine, taking libvirt's per-domain state (managed save,
    snapshot and checkpoint metadata, NVRAM) with it, as far as the driver can."""
    if dom.isActive():
        dom.destroy()
    base = (
        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    for flags in (base | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA, base):
        try:
            dom.undefineFlags(flags)
            return
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                raise
    dom.undefine()
