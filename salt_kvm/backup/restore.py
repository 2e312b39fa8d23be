"""Restore a backup point: as a new domain, or over a shut-off domain's disks.

The store is untrusted input (a NAS, a replica): its manifests are read
through ``manifest.parse_manifest``, and every image of the point's chain
is checked against its recorded checksum and its header (a qcow2 whose
backing file is exactly the parent point's image, no external data file)
before ``qemu-img convert`` (with explicit formats) flattens the chain.

Under the domain's own name (its domain and disks are gone: a lost host, a
takeover from a copy) the guest keeps its UUID and MAC addresses, so
MAC-keyed reservations and the guest's network config still match; under a
new name it gets new ones, since the original may still exist
(``new_identity`` overrides either). A kept identity another domain here
already has is refused by name. The disks are copied as they were: the
minion's id and keys inside the guest are never rewritten.

As a new domain, each disk becomes a standalone qcow2 volume and the
definition says qcow2. In place, each disk keeps the format and the kind its
definition names: a file is written beside the disk in that format and
renamed over it once every disk is written; a raw block device is written
into (the device node is never replaced). Anything else is refused by name
before anything is written.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
import time
from dataclasses import dataclass

import libvirt
from lxml import etree

from salt_kvm.backup import core as backup_core
from salt_kvm.backup import store as bs
from salt_kvm.backup import verify
from salt_kvm.backup.firmware_state import InPlacePlan, NvramPlan, TpmPlan
from salt_kvm.errors import ConflictError, NotFoundError, SaltKvmError, SpecError
from salt_kvm.virt import chains, graphics, names, pools, qemuimg
from salt_kvm.virt.domain import Disk, Domain
from salt_kvm.virt.identity import identity_clashes, prepare_identity, used_macs
from salt_kvm.virt.lifecycle import define
from salt_kvm.virt.pools import Pool
from salt_kvm.virt.rollback import Rollback

log = logging.getLogger(__name__)

DOMAIN_XML_MAX = 4 * 1024 * 1024
IN_PLACE_FORMATS = ("raw", "qcow2")
IN_PLACE_TYPES = ("file", "block")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# What a definition from a store may not give a new domain: access to the
# host's devices, folders, files or QEMU's command line.
HOST_DEVICES = ("hostdev", "filesystem", "shmem", "redirdev", "smartcard")
CHARDEVS = ("serial", "console", "channel", "parallel")
# Character devices a restored domain keeps: libvirt allocates a pty or socket
# of its own (prepare_identity drops a stored unix path). Others open host
# files, devices or pipes, or listen on (or reach) the host's network.
CHARDEV_TYPES = ("pty", "unix", "spicevmc", "spiceport", "null", "vc", "qemu-vdagent")
HOST_BOOT_FILES = ("kernel", "initrd", "dtb")
# Firmware (a loader, an NVRAM template) is read from these folders only: any
# other host file would become the guest's flash or its variables.
FIRMWARE_DIRS = (
    "/usr/share/OVMF",
    "/usr/share/AAVMF",
    "/usr/share/ovmf",
    "/usr/share/edk2",
    "/usr/share/edk2-ovmf",
    "/usr/share/qemu",
    "/usr/share/qemu-efi-aarch64",
    "/usr/share/seabios",
)
LOOPBACK = "127.0.0.1"
GRAPHICS_TYPES = ("vnc", "spice")  # the ones that can listen on loopback only
# Interfaces a stored definition keeps: a libvirt network or bridge. Others run
# host scripts (ethernet), take a host NIC (direct, hostdev) or host sockets.
INTERFACE_TYPES = ("network", "bridge", "user")
# What other devices are given of the host when their backend names it.
HOST_BACKENDS = (
    ("tpm/backend", "type", ("passthrough",)),
    ("input", "type", ("passthrough", "evdev")),
    ("audio", "type", ("file", "oss", "alsa")),
)
RNG_SOURCES = ("/dev/urandom", "/dev/random")


def _pool_dir(conn: libvirt.virConnect, pool: str) -> tuple[libvirt.virStoragePool, str]:
    try:
        handle = conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError as exc:
        raise NotFoundError(f"pool: no storage pool named {pool!r} on {conn.getURI()}") from exc
    path = Pool(handle.XMLDesc(0)).target_path
    if not path:
        raise SaltKvmError(f"pool: {pool!r} is not a directory pool")
    return handle, path


def checked_chain(store: bs.Store, point_ref: str) -> tuple[bs.Point, list[bs.Point]]:
    point, chain = store.chain(point_ref)
    problems = [p for link in chain for p in verify.verify_point(store, link)]
    if not problems:
        for target in sorted(point.disks):
            problems += _chain_problems(store, chain, target)
    if problems:
        raise SaltKvmError(f"backup point {point.id} cannot be restored: {'; '.join(problems)}")
    return point, chain


def _chain_problems(store: bs.Store, chain: list[bs.Point], target: str) -> list[str]:
    """The images qemu-img opens for ``target`` are exactly the chain's, newest first."""
    top = store.path(chain[-1]) / bs.image_file(target)
    wanted = [os.path.realpath(store.path(p) / bs.image_file(target)) for p in reversed(chain)]
    opened = qemuimg.info(str(top), chain=True, fmt=bs.IMAGE_FORMAT)
    got = [os.path.realpath(i.get("filename", "")) for i in opened]
    formats = {i.get("format") for i in opened}
    if got != wanted or formats != {bs.IMAGE_FORMAT}:
        return [f"{chain[-1].id}/{top.name}: its backing chain {got} is not the points' {wanted}"]
    return []


def restore(
    conn: libvirt.virConnect,
    name: str,
    dest: str,
    point: str = bs.LATEST,
    target: str | None = None,
    force: bool = False,
    pool: str = "default",
    start: bool = False,
    new_identity: bool | None = None,
) -> dict:
    """Restore ``point`` of ``name``'s backups in ``dest`` (a replica folder works too).

    ``new_identity``: ``None`` (default) keeps the UUID and MACs when ``target``
    is ``name`` and gives new ones under another name; ``True`` or ``False``
    decides. An in-place restore keeps the domain's definition as it is."""
    point = bs.check_point_ref(point)
    if new_identity is not None and not isinstance(new_identity, bool):
        raise SpecError(
            "new_identity",
            f"{new_identity!r} is not a yes or no",
            "True, False, or unset (kept under the domain's own name, new under another)",
        )
    if target is not None:
        names.check_vm_name(target, "target")
        if target == name and _exists(conn, name):
            target = None  # restoring onto itself is the in-place restore
        # else a takeover: the domain lives on under its own name on this host
    if target is None and new_identity:
        raise SpecError(
            "new_identity",
            "an in-place restore keeps the domain's definition, its identity with it",
            "target=<new name> for a copy with a new identity",
        )
    keep = (target == name) if new_identity is None else not new_identity
    store = bs.Store(dest, name)
    store.point(point)  # no such backup: fail before taking the lock (which writes)
    with store.locked("restore"):
        found, chain = checked_chain(store, point)
        started = time.monotonic()
        if target is None:
            result = _in_place(conn, store, found, force)
        else:
            result = _as_new(conn, store, found, target, pool, start, keep)
    result.update(
        point=found.id,
        kind=found.kind,
        chain=[p.id for p in chain],
        duration=round(time.monotonic() - started, 2),
    )
    return result


def _exists(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError:
        return False


def _as_new(
    conn: libvirt.virConnect,
    store: bs.Store,
    point: bs.Point,
    target: str,
    pool: str,
    start: bool,
    keep: bool,
) -> dict:
    with contextlib.suppress(libvirt.libvirtError):
        conn.lookupByName(target)
        raise ConflictError(f"target: a domain named {target!r} already exists")
    pool_handle, pool_dir = _pool_dir(conn, pool)
    xml = Domain(bs.read_no_follow(store.path(point) / bs.DOMAIN_XML, DOMAIN_XML_MAX))
    _refuse_host_access(point, xml)
    prepare_identity(xml, target, xml.type or "kvm", used_macs(conn), keep=keep)
    clashes = identity_clashes(conn, xml) if keep else []
    if clashes:
        raise ConflictError(
            f"target: {target} keeps its identity, which another domain here has "
            f"({'; '.join(clashes)}): refused, nothing written (new_identity=True gives "
            "new MACs and a new UUID)"
        )
    _graphics_on_loopback(xml)
    devices = xml.node.find("devices")
    plan: list[tuple[Disk, bs.DiskImage, str]] = []
    for disk in xml.disks:
        if disk.device == Disk.DEVICE_CDROM:
            continue  # ejected by prepare_identity
        image = point.disks.get(disk.target_dev) if disk.device == Disk.DEVICE_DISK else None
        if image is None:  # not in the backup: never share the original's disk
            devices.remove(disk.node)
            continue
        vol = (
            names.root_volume_name(target, "qcow2")
            if not plan
            else names.extra_volume_name(target, disk.target_dev, "qcow2")
        )
        path = os.path.join(pool_dir, vol)
        if os.path.exists(path):
            raise ConflictError(f"volume {vol!r} already exists in pool {pool!r}")
        plan.append((disk, image, path))
    nvram = NvramPlan.make(conn, point, xml, pool_dir, target)
    tpm = TpmPlan.make(point, xml, keep)
    with Rollback() as rollback:
        for disk, image, path in plan:
            rollback.add(f"volume {path}", functools.partial(_remove, conn, path))
            qemuimg.convert(str(store.path(point) / image.file), path, "qcow2")
            os.chmod(path, 0o600)
            disk.path = path  # a file now, whatever it was
            disk.driver_name = "qemu"
            disk.driver_type = "qcow2"
        nvram.write(conn, store, point, xml, rollback)
        tpm.write(store, point, rollback)
        pools.refresh(pool_handle)
        volumes = [path for _, _, path in plan]
        info: dict[str, str | list[str]] = {
            "restored_from": point.domain,
            "point": point.id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "volumes": volumes,
        }
        if nvram.path:  # the domain's own: removed with it (lifecycle.remove)
            info["nvram"] = nvram.path
        xml.set_managed_info(info)
        dom = define(conn, xml, rollback)
        if start:
            dom.create()
        rollback.forget()
    return {
        "domain": target,
        "volumes": volumes,
        "started": bool(start),
        "identity": "kept" if keep else "new",
        "uuid": dom.UUIDString(),
        "macs": [iface.mac for iface in xml.interfaces],
        "nvram": nvram.note,
        "tpm_state": tpm.note,
    }


def _refuse_host_access(point: bs.Point, xml: Domain) -> None:
    """The store's ``domain.xml`` is untrusted: refuse, by name, what would give
    the new domain the host's devices, folders or files, or QEMU arguments."""
    found = [f"{e.tag} device" for tag in HOST_DEVICES for e in xml.node.iter(tag)]
    found += [
        f"{e.tag} of type {e.get('type')!r} (accepted: {', '.join(CHARDEV_TYPES)})"
        for tag in CHARDEVS
        for e in xml.node.iter(tag)
        if (e.get("type") or "pty") not in CHARDEV_TYPES
    ]
    found += [f"os/{tag}" for tag in HOST_BOOT_FILES if xml.node.find(f"os/{tag}") is not None]
    found += _firmware_problems(xml)
    found += [
        f"graphics of type {e.get('type')!r} (accepted: {', '.join(GRAPHICS_TYPES)})"
        for e in xml.node.iter("graphics")
        if e.get("type") not in GRAPHICS_TYPES
    ]
    found += [
        f"interface of type {e.get('type')!r} (accepted: {', '.join(INTERFACE_TYPES)})"
        for e in xml.node.iter("interface")
        if e.get("type") not in INTERFACE_TYPES
    ]
    found += [f"interface script {e.get('path')!r}" for e in xml.node.iter("script")]
    devices = xml.node.find("devices")
    for path, attr, hostile in HOST_BACKENDS if devices is not None else ():
        found += [
            f"{path} of {attr} {e.get(attr)!r}"
            for e in devices.findall(path)
            if e.get(attr) in hostile
        ]
    found += [
        f"rng backend {(e.text or '').strip()!r} (accepted: {', '.join(RNG_SOURCES)})"
        for e in xml.node.iter("backend")
        if e.getparent().tag == "rng"
        and e.get("model") == "random"
        and (e.text or "").strip() not in ("", *RNG_SOURCES)
    ]
    found += sorted(
        {
            f"qemu:{etree.QName(e).localname}"
            for e in xml.node.iter(f"{{{QEMU_NS}}}*")
            if e.getparent() is None or etree.QName(e.getparent()).namespace != QEMU_NS
        }
    )
    if found:
        raise SaltKvmError(
            f"backup point {point.id}: {bs.DOMAIN_XML} asks for {', '.join(found)}, which a "
            "restored domain is not given (refused: the store is untrusted; define it by hand)"
        )


def _in_firmware_dirs(path: str) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, folder]) == folder for folder in FIRMWARE_DIRS)


def _firmware_problems(xml: Domain) -> list[str]:
    found = []
    loader = xml.node.find("os/loader")
    if loader is not None and (loader.text or "").strip():
        if not _in_firmware_dirs(loader.text.strip()):
            found.append(f"os/loader {loader.text.strip()}")
    nvram = xml.node.find("os/nvram")
    if nvram is not None and nvram.get("template"):
        if not _in_firmware_dirs(nvram.get("template")):
            found.append(f"os/nvram template {nvram.get('template')}")
    if found:
        found[-1] += f" (accepted: files below {', '.join(FIRMWARE_DIRS)})"
    return found


def _graphics_on_loopback(xml: Domain) -> None:
    """A console of the restored domain is reachable from this host only, as
    salt-kvm's own guests' are: no address or port of the store's choosing, no
    socket path (qemu would unlink what is there), no host render node; and a
    password of its own (the stored one is the original's, which may still
    run). Other graphics types are refused before (``_refuse_host_access``)."""
    graphics.set_consoles(xml, None, LOOPBACK)


def _remove(conn: libvirt.virConnect, path: str) -> None:
    """Delete a file this restore wrote, unless something came to need it."""
    with contextlib.suppress(FileNotFoundError):
        chains.delete_file(conn, path, "restore cleanup")


@dataclass
class _Target:
    """Where one disk of the point goes in an in-place restore."""

    target: str
    image: bs.DiskImage
    path: str  # the real file or device (symbolic links resolved)
    format: str
    block: bool

    @property
    def temp(self) -> str:
        return f"{self.path}.restore-tmp"


def _plan_in_place(name: str, xml: Domain, point: bs.Point) -> list[_Target]:
    """Each disk of the point, checked against the definition before anything is
    written; refusals name the disk and what is accepted."""
    disks = {d.target_dev: d for d in xml.disks if d.target_dev}
    plan, refused = [], []
    for target, image in sorted(point.disks.items()):
        disk = disks.get(target)
        if disk is None or disk.device != Disk.DEVICE_DISK:
            refused.append(f"{target}: {name} has no disk {target} to restore onto")
            continue
        kind = disk.type or "file"
        if kind not in IN_PLACE_TYPES:
            refused.append(
                f"{target}: a disk of type {kind!r} is not restored in place "
                f"(accepted: {', '.join(IN_PLACE_TYPES)})"
            )
            continue
        fmt = disk.driver_type or "raw"
        if fmt not in IN_PLACE_FORMATS:
            refused.append(
                f"{target}: its format {fmt!r} is not restored in place "
                f"(accepted: {', '.join(IN_PLACE_FORMATS)})"
            )
            continue
        if not disk.path:
            refused.append(f"{target}: its definition names no {kind} to restore onto")
            continue
        real = os.path.realpath(disk.path)
        if kind == "block":
            problem = _block_problem(real, fmt, image)
            if problem:
                refused.append(f"{target}: {disk.path} {problem}")
                continue
        else:
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(os.stat(real).st_mode):
                    refused.append(
                        f"{target}: {disk.path} is not a regular file, though the definition "
                        "says type='file'"
                    )
                    continue
        plan.append(_Target(target, image, real, fmt, kind == "block"))
    if refused:
        raise SaltKvmError(f"{name} cannot be restored in place: {'; '.join(refused)}")
    return plan


def _block_problem(path: str, fmt: str, image: bs.DiskImage) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot be opened: {exc.strerror}"
    if not stat.S_ISBLK(mode):
        return "is not a block device, though the definition says type='block'"
    if fmt != "raw":
        return f"holds {fmt}: a block device is restored in place only as raw (accepted: raw)"
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size < image.virtual_size:
        return f"has {size} bytes, less than the {image.virtual_size} of the backup"
    return None


def _write_file(conn: libvirt.virConnect, source: str, each: _Target) -> None:
    """The disk's content in its own format beside it, with its owner and mode."""
    _remove(conn, each.temp)
    qemuimg.convert(source, each.temp, each.format)
    try:
        old = os.stat(each.path)
        os.chown(each.temp, old.st_uid, old.st_gid)
        os.chmod(each.temp, stat.S_IMODE(old.st_mode))
    except FileNotFoundError:
        os.chmod(each.temp, 0o600)


def _in_place(conn: libvirt.virConnect, store: bs.Store, point: bs.Point, force: bool) -> dict:
    try:
        dom = conn.lookupByName(point.domain)
    except libvirt.libvirtError as exc:
        raise NotFoundError(
            f"{point.domain} does not exist here; restore it with target=<new name>"
        ) from exc
    if dom.isActive():
        raise ConflictError(f"{point.domain} is running: shut it off before an in-place restore")
    if not force:
        raise ConflictError(
            f"an in-place restore overwrites the disks of {point.domain}; pass force=True"
        )
    # The lock snapshot operations and backup runs of the domain hold: a
    # snapshot or a run's overlay made while the disks are rewritten would
    # stand on images this restore replaces.
    with bs.domain_locked(
        dom.UUIDString(), point.domain, None, what=f"in-place restore of {point.domain}"
    ):
        if dom.isActive():
            raise ConflictError(
                f"{point.domain} is running: shut it off before an in-place restore"
            )
        return _in_place_locked(conn, store, point, dom)


def _in_place_locked(
    conn: libvirt.virConnect, store: bs.Store, point: bs.Point, dom: libvirt.virDomain
) -> dict:
    if dom.snapshotNum(0):
        raise ConflictError(f"{point.domain} has snapshots; delete them before restoring in place")
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    plan = _plan_in_place(point.domain, xml, point)
    files = [t for t in plan if not t.block]
    state = InPlacePlan.make(store, point, dom, xml)
    # The old images are replaced or written into: a quick clone standing on one
    # would be corrupted.
    chains.check_deletable(
        conn,
        [t.path for t in plan],
        f"in-place restore of {point.domain}",
        disks=tuple((point.domain, t.target) for t in plan),
    )
    try:
        # files first, beside the disks: until the renames nothing visible changed
        for each in files:
            _write_file(conn, str(store.path(point) / each.image.file), each)
        state.write()
        for each in plan:
            if each.block:  # into the device: its node (an LV's link) stays
                qemuimg.convert(
                    str(store.path(point) / each.image.file), each.path, "raw", into=True
                )
    except BaseException:
        for each in files:
            _remove(conn, each.temp)
        state.discard()
        raise
    for each in files:
        os.replace(each.temp, each.path)
    state.commit()
    # The images are new: the old checkpoints' bitmaps went with the old files.
    for name in backup_core.our_checkpoints(dom):
        dom.checkpointLookupByName(name, 0).delete(
            libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
        )
    return {
        "domain": point.domain,
        "volumes": [each.path for each in plan],
        "formats": {each.target: each.format for each in plan},
        "in_place": True,
        **state.notes,
    }
