"""External disks on a libvirt connection: list, attach, detach, resize.

Every request is checked before anything is made (``diskcheck``): against the
domain (name, index and target free), the storage pools and allowed
directories, and every other domain on the connection (a path in use elsewhere
is refused unless both sides are shareable or both read-only; a writable disk
is refused on a file that backs another volume). Volumes salt-kvm creates are recorded in the
domain's ``<metadata>`` (``urn:salt-kvm:disks:1``) so ``list`` can tell them
apart and ``salt-cloud -d`` can decide whether to delete them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import libvirt
from lxml import etree

from salt_kvm.disks.check import (
    CONFIG,
    LIVE,
    affect_flags,
    choose_target,
    created_records,
    domain_xmls,
    find_disk,
    path_uses,
    source_of,
)
from salt_kvm.disks.spec import DiskSpec, ProfileDisks, Source, disk_element, target_index
from salt_kvm.errors import ConflictError, NotFoundError, SaltKvmError, SpecError, TimeoutError_
from salt_kvm.virt import chains, names
from salt_kvm.virt.domain import (
    DISKS_NS,
    DISKS_PREFIX,
    Disk,
    Domain,
    disks_metadata_element,
)
from salt_kvm.virt.rollback import Rollback
from salt_kvm.virt.units import human_size
from salt_kvm.virt.volumes import Volume

log = logging.getLogger(__name__)


@dataclass
class AttachPlan:
    spec: DiskSpec
    target: str
    flags: int
    source: Source | None  # None: a new volume, made at attach time


def plan(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    spec: DiskSpec,
    allowed_dirs: tuple[str, ...] = (),
    live: bool = True,
    persistent: bool = True,
) -> AttachPlan:
    """Check ``spec`` against the domain and the hypervisor; change nothing."""
    flags = affect_flags(dom, live, persistent)
    xmls = domain_xmls(dom)
    target = choose_target(spec, dom.name(), xmls)
    source = source_of(
        conn, dom.name(), spec, allowed_dirs, path_uses(conn), created_records(*xmls)
    )
    return AttachPlan(spec, target, flags, source)


def precheck(conn: libvirt.virConnect, domain: str, profile: ProfileDisks) -> None:
    """A profile's disks, checked before its guest is cloned."""
    if not profile.disks:
        return
    uses = path_uses(conn)
    for spec in profile.disks:
        source_of(conn, domain, spec, profile.allowed_dirs, uses, {})


# ---- changes ----------------------------------------------------------------------


def _update_records(
    dom: libvirt.virDomain, flags: int, change: Callable[[dict[str, dict]], None]
) -> None:
    config, live = domain_xmls(dom)
    for flag, xml in ((LIVE, live), (CONFIG, config)):
        if not flags & flag or xml is None:
            continue
        records = xml.created_disks()
        change(records)
        element = disks_metadata_element(records, namespaced=False) if records else None
        text = etree.tostring(element, encoding="unicode") if element is not None else None
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, text, DISKS_PREFIX, DISKS_NS, flag)


def _create_volume(conn: libvirt.virConnect, domain: str, spec: DiskSpec):
    if spec.size is None:
        raise SpecError(spec.name, "has no size: salt-kvm creates no volume for it", "size")
    name = names.extra_volume_name(domain, spec.name, spec.volume_format)
    vol = Volume.new(name, spec.size, spec.volume_format, v3=True)
    vol.allocation = spec.size if spec.preallocation == "full" else 0
    metadata = spec.preallocation == "metadata"
    flags = libvirt.VIR_STORAGE_VOL_CREATE_PREALLOC_METADATA if metadata else 0
    return conn.storagePoolLookupByName(spec.pool).createXML(vol.to_xml(), flags)


def attach(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    spec: DiskSpec,
    allowed_dirs: tuple[str, ...] = (),
    live: bool = True,
    persistent: bool = True,
    rollback: Rollback | None = None,
    delete_with_domain: bool = False,
) -> dict:
    """Attach ``spec`` (creating its volume when it has a size); returns the
    disk as ``describe`` shows it. Undo steps go to ``rollback`` if given, else
    a failure half-way undoes them at once."""
    attach_plan = plan(conn, dom, spec, allowed_dirs, live, persistent)
    own = rollback is None
    rollback = rollback or Rollback()
    try:
        source = attach_plan.source
        if source is None:
            volume_name = names.extra_volume_name(dom.name(), spec.name, spec.volume_format)
            rollback.intend("volume", pool=spec.pool, name=volume_name)
            path = _create_volume(conn, dom.name(), spec).path()
            chains.delete_on_rollback(rollback, conn, path)
            source = Source(path=path, format=spec.volume_format)
        xml = disk_element(spec, attach_plan.target, source).to_xml()
        try:
            dom.attachDeviceFlags(xml, attach_plan.flags)
        except libvirt.libvirtError as exc:
            raise SaltKvmError(f"libvirt refused disk {spec.name!r}: {exc}") from exc
        uuid = dom.UUIDString()
        rollback.add(
            f"disk {spec.name} of {dom.name()}",
            lambda: (
                rollback.live(conn)
                .lookupByUUIDString(uuid)
                .detachDeviceFlags(xml, attach_plan.flags)
            ),
        )
        if attach_plan.source is None:
            record = {"name": spec.name, "delete_with_domain": delete_with_domain}
            _update_records(dom, attach_plan.flags, lambda r: r.update({source.path: record}))
        result = describe(conn, dom)[spec.name]
    except BaseException:
        if own:
            rollback.run()
        raise
    return result


def attach_profile(
    conn: libvirt.virConnect, dom: libvirt.virDomain, profile: ProfileDisks, rollback: Rollback
) -> list[dict]:
    """A new guest's profile disks, into its definition (it is not running yet)."""
    return [
        attach(conn, dom, spec, profile.allowed_dirs, True, True, rollback, profile.delete)
        for spec in profile.disks
    ]


def _detach_live(dom: libvirt.virDomain, disk: Disk, timeout: float, interval: float) -> None:
    """Unplug from the running guest and wait until the guest has let it go."""
    dom.detachDeviceFlags(disk.to_xml(), LIVE)
    deadline = time.monotonic() + timeout
    while dom.isActive() and find_disk(Domain(dom.XMLDesc(0)), disk.name or "") is not None:
        if time.monotonic() >= deadline:
            raise TimeoutError_(
                f"the guest did not release disk {disk.name!r} within {timeout:g}s; "
                "it is still attached"
            )
        time.sleep(interval)


def detach(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    name: str,
    delete: bool = False,
    live: bool = True,
    persistent: bool = True,
    timeout: float = 120,
    interval: float = 0.5,
    force: bool = False,
    check_only: bool = False,
) -> dict:
    """Detach disk ``name``; with ``delete``, also delete its volume, which must
    be one salt-kvm created and nobody else uses. The boot disk only with
    ``force``: without it the guest does not start again. ``check_only``: every
    refusal of the real call, and what it would return, with nothing changed
    (a state's ``test=True`` predicts the real run)."""
    config, live_xml = domain_xmls(dom)
    in_config, in_live = find_disk(config, name), find_disk(live_xml, name)
    if in_config is None and in_live is None:
        raise NotFoundError(f"{dom.name()} has no disk named {name!r}")
    boot = [xml for xml in (config, live_xml) if xml is not None and is_boot_disk(xml, name)]
    if boot and not force:
        raise SpecError(
            "force",
            f"disk {name!r} is the boot disk of {dom.name()}; detached, the guest no longer starts",
            "force=True to detach it anyway",
        )
    disk = in_live or in_config
    assert disk is not None  # refused above
    path = disk.path
    if delete:
        target = disk.target_dev
        created = created_records(config, live_xml)
        _check_deletable(conn, dom, name, path, target, created, live, persistent)
    if not ((in_live is not None and live) or (in_config is not None and persistent)):
        raise SpecError("live", f"disk {name!r} is not where live/persistent point", "true")
    before = describe(conn, dom)[name]
    if check_only:
        return {"old": before, "new": None, "deleted": path if delete else None}
    flags = 0
    if in_live is not None and live:
        _detach_live(dom, in_live, timeout, interval)
        flags |= LIVE
    if in_config is not None and persistent:
        dom.detachDeviceFlags(in_config.to_xml(), CONFIG)
        flags |= CONFIG
    if not flags:
        raise SpecError("live", f"disk {name!r} is not where live/persistent point", "true")
    if delete and path is not None:
        # Kept otherwise: attaching the disk again reuses the volume.
        _update_records(dom, flags & (CONFIG | (LIVE if dom.isActive() else 0)), _drop(path))
        chains.delete_volume(conn, path, f"delete of disk {name!r}", missing_ok=False)
    return {"old": before, "new": None, "deleted": path if delete else None}


def is_boot_disk(xml: Domain, name: str) -> bool:
    """The disk the firmware boots: the one with boot order 1, or with no
    per-device order, the first hard disk of the definition (``<boot dev='hd'/>``)."""
    disks = [d for d in xml.disks if d.device in (None, Disk.DEVICE_DISK)]
    ordered = [d for d in xml.disks if d.node.find("boot") is not None]
    if ordered:
        first = min(ordered, key=lambda d: int(d.node.find("boot").get("order") or 0))
        return first.name == name
    return bool(disks) and disks[0].name == name


def _drop(path: str) -> Callable[[dict], None]:
    return lambda records: records.pop(path, None)


def _check_deletable(conn, dom, name, path, target, created, live, persistent) -> None:
    if path not in created:
        raise SpecError(
            "delete", f"salt-kvm did not create {path} (disk {name!r}); it is kept", "false"
        )
    if not (live and persistent):
        raise SpecError("delete", "needs live and persistent true (detach everywhere)", "false")
    others = [u for u in path_uses(conn).of(path) if u.domain != dom.name()]
    if others:
        raise ConflictError(f"delete: {path} is also used by {others[0].domain!r}; it is kept")
    chains.check_deletable(conn, [path], f"delete of disk {name!r}", disks=((dom.name(), target),))


def resize(conn: libvirt.virConnect, dom: libvirt.virDomain, name: str, size: int) -> dict:
    """Grow disk ``name`` to ``size`` bytes: live with blockResize when the guest
    runs, else the volume itself. ``{}`` when it already has that size."""
    config, live_xml = domain_xmls(dom)
    disk = find_disk(live_xml, name) or find_disk(config, name)
    if disk is None:
        raise NotFoundError(f"{dom.name()} has no disk named {name!r}")
    current = describe(conn, dom)[name]["size"]
    if current is None:
        raise SaltKvmError(f"the size of disk {name!r} cannot be read")
    if size < current:
        raise SpecError(
            "size",
            f"{human_size(size)} is smaller than the current {human_size(current)}; "
            "disks only grow",
            f"at least {current} bytes ({human_size(current)})",
        )
    if size == current:
        return {}
    if disk.readonly or disk.type == "block":
        what = "read-only" if disk.readonly else "a block device (grow the device itself)"
        raise ConflictError(f"disk {name!r} is {what}; it is not resized")
    others = [u for u in path_uses(conn).of(disk.path or "") if u.domain != dom.name()]
    if others:
        raise ConflictError(f"disk {name!r} is also used by {others[0].domain!r}; not resized")
    if find_disk(live_xml, name) is not None:
        dom.blockResize(disk.target_dev, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    else:
        try:
            vol = conn.storageVolLookupByPath(disk.path)
        except libvirt.libvirtError:
            raise SaltKvmError(
                f"{disk.path} is not a pool volume: start {dom.name()} to grow it live"
            ) from None
        vol.resize(size, 0)
    return {"old": current, "new": size}


# ---- reading --------------------------------------------------------------------


def _sizes(conn, dom, disk: Disk, in_live: bool) -> tuple[int | None, int | None]:
    """A pool volume's own numbers, else what the domain's block layer says."""
    if disk.path is None:
        return None, None
    try:
        _, capacity, allocation = conn.storageVolLookupByPath(disk.path).info()
        return capacity, allocation
    except libvirt.libvirtError:
        pass
    if in_live or not dom.isActive():
        try:
            capacity, allocation, _ = dom.blockInfo(disk.target_dev, 0)
            return capacity, allocation
        except libvirt.libvirtError:
            pass
    return None, None


def describe(conn: libvirt.virConnect, dom: libvirt.virDomain) -> dict[str, dict]:
    """Every disk of the domain by name (the running state's, then disks only
    in the definition), with size, allocation and whether salt-kvm created it."""
    config, live = domain_xmls(dom)
    created = created_records(config, live)
    in_config = {d.target_dev for d in config.disks} if config else set()
    in_live = {d.target_dev for d in live.disks} if live else set()
    shown = live or config
    assert shown is not None  # a domain always has its definition
    current = shown.disks
    current += [d for d in (config.disks if config and live else []) if d.target_dev not in in_live]
    result: dict[str, dict] = {}
    for disk in current:
        size, allocation = _sizes(conn, dom, disk, disk.target_dev in in_live)
        record = created.get(disk.path or "")
        result[disk.name or ""] = {
            "name": disk.name,
            "target": disk.target_dev,
            "bus": disk.target_bus,
            "device": disk.device,
            "source": disk.path,
            "format": disk.driver_type,
            "cache": disk.driver_cache,
            "index": target_index(disk.target_dev),
            "readonly": disk.readonly,
            "shareable": disk.shareable,
            "size": size,
            "allocation": allocation,
            "created": record is not None,
            "delete_with_domain": bool(record and record["delete_with_domain"]),
            "live": disk.target_dev in in_live,
            "persistent": disk.target_dev in in_config,
        }
    return result


# ---- salt-cloud -d -----------------------------------------------------------------


def split_for_destroy(dom: libvirt.virDomain, delete: bool) -> tuple[list[str], list[str]]:
    """(volumes to delete with the domain, volumes to keep): only volumes
    salt-kvm created; the profile's ``delete_disks`` or ``delete`` decides."""
    created = created_records(*domain_xmls(dom))
    doomed = sorted(p for p, r in created.items() if delete or r["delete_with_domain"])
    return doomed, sorted(p for p in created if p not in doomed)


def delete_volumes(conn: libvirt.virConnect, paths: list[str]) -> list[str]:
    """Delete volumes nothing on the host needs any more (no domain uses them,
    no volume or disk has them in its backing chain); returns those deleted."""
    doomed, kept = chains.dependents(conn).deletable(paths)
    for path, needs in kept.items():
        log.warning("volume %s is still needed by %s; kept", path, needs[0])
    deleted = []
    for path in doomed:
        try:
            conn.storageVolLookupByPath(path).delete(0)
            deleted.append(path)
        except libvirt.libvirtError as exc:
            log.warning("volume %s was not deleted: %s", path, exc)
    return deleted
