"""Checks for an external disk request against the domain and every other
domain on the connection; nothing here changes anything."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import libvirt

from salt_kvm.disks.spec import DiskSpec, Source, max_index, target_name, within
from salt_kvm.errors import ConflictError, NotFoundError, SpecError
from salt_kvm.virt import connection, names
from salt_kvm.virt import pools as storage_pools
from salt_kvm.virt.domain import Disk, Domain
from salt_kvm.virt.pools import Pool
from salt_kvm.virt.volumes import Volume, volume_format

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG


@dataclass(frozen=True)
class Use:
    """One domain's use of a file or device."""

    domain: str
    target: str
    readonly: bool
    shareable: bool


def real(path: str, local: bool = True) -> str:
    """One spelling per file: symlinks resolved where the files are this host's,
    only normalised on a remote hypervisor (its files are out of reach)."""
    return os.path.realpath(path) if local else os.path.normpath(path)


class Uses(dict):
    """Real path -> every use of it by a domain."""

    def __init__(self, found: dict[str, list[Use]], local: bool):
        super().__init__(found)
        self.local = local

    def of(self, path: str) -> list[Use]:
        return self.get(real(path, self.local), [])


def domain_xmls(dom: libvirt.virDomain) -> tuple[Domain | None, Domain | None]:
    """(definition, running state): either is None when the domain has none."""
    config = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) if dom.isPersistent() else None
    live = Domain(dom.XMLDesc(0)) if dom.isActive() else None
    return config, live


def find_disk(xml: Domain | None, name: str) -> Disk | None:
    if xml is None:
        return None
    return next((d for d in xml.disks if d.name == name), None)


def created_records(config: Domain | None, live: Domain | None) -> dict[str, dict]:
    return {**(config.created_disks() if config else {}), **(live.created_disks() if live else {})}


def path_uses(conn: libvirt.virConnect) -> Uses:
    """Real path -> every use by a domain (definitions, running guests and
    their backing chains, which count as read-only uses)."""
    local = connection.remote_host(conn) is None
    uses: dict[str, set[Use]] = {}
    for dom in conn.listAllDomains(0):
        try:
            xmls = domain_xmls(dom)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # undefined since the listing: it uses nothing any more
            raise
        for xml in xmls:
            if xml is None:
                continue
            for disk in xml.disks:
                if disk.path:
                    use = Use(dom.name(), disk.target_dev, disk.readonly, disk.shareable)
                    uses.setdefault(real(disk.path, local), set()).add(use)
                for backing in disk.backing_paths():
                    use = Use(dom.name(), f"{disk.target_dev} backing", True, False)
                    uses.setdefault(real(backing, local), set()).add(use)
    return Uses(
        {path: sorted(found, key=lambda u: (u.domain, u.target)) for path, found in uses.items()},
        local,
    )


def pools(conn: libvirt.virConnect) -> dict[str, str]:
    """Active pool name -> its directory."""
    roots = {}
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        path = Pool(pool.XMLDesc(0)).target_path
        if path:
            roots[pool.name()] = os.path.normpath(path)
    return roots


def pool_volume(conn: libvirt.virConnect, path: str) -> libvirt.virStorageVol | None:
    for name, root in pools(conn).items():
        if within(path, [root]):
            storage_pools.refresh(conn.storagePoolLookupByName(name))  # a file copied in since
    try:
        return conn.storageVolLookupByPath(path)
    except libvirt.libvirtError:
        return None


def backed_by(conn: libvirt.virConnect, path: str) -> list[str]:
    """Volumes whose backing file is ``path`` (overlays of a base image)."""
    local = connection.remote_host(conn) is None
    found = []
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        for vol in pool.listAllVolumes(0):
            try:
                backing = Volume(vol.XMLDesc(0)).backing_path
            except libvirt.libvirtError:
                continue
            if backing and real(backing, local) == real(path, local):
                found.append(vol.path())
    return found


def check_uses(spec: DiskSpec, path: str, uses: Uses, domain: str) -> None:
    for use in uses.of(path):
        if use.domain == domain:
            raise ConflictError(f"path: {path} is already attached to {domain} as {use.target}")
        if not ((spec.shareable and use.shareable) or (spec.readonly and use.readonly)):
            mode = "shareable" if use.shareable else "read-only" if use.readonly else "writable"
            raise ConflictError(
                f"path: {path} is used by domain {use.domain!r} ({use.target}, {mode}); "
                "a path may be shared only when both sides are shareable or both readonly"
            )


def new_volume_source(
    conn: libvirt.virConnect, domain: str, spec: DiskSpec, created: dict[str, dict]
) -> Source | None:
    """None: the volume is to be made. A volume salt-kvm made earlier for this
    domain's disk of the same name (detached without delete) is attached again."""
    try:
        pool = conn.storagePoolLookupByName(spec.pool)
    except libvirt.libvirtError:
        known = sorted(pools(conn))
        raise SpecError("pool", f"no storage pool named {spec.pool!r}", known) from None
    if not pool.isActive():
        raise ConflictError(f"pool: {spec.pool!r} is not running (virsh pool-start {spec.pool})")
    storage_pools.refresh(pool)
    volume = names.extra_volume_name(domain, spec.name, spec.volume_format)
    if volume not in pool.listVolumes():
        return None
    path = pool.storageVolLookupByName(volume).path()
    if created.get(path, {}).get("name") != spec.name:
        raise ConflictError(
            f"volume {volume!r} already exists in pool {spec.pool!r} and salt-kvm did not "
            f"create it for this disk; it will not overwrite it (attach it with path=)"
        )
    return Source(path=path, format=spec.volume_format)


# Header magics of the image formats QEMU would parse: a file that starts with
# one is not taken as that format on its word (a guest writes any bytes it
# likes into its raw disk, a qcow2 header naming a host file as backing file
# included).
MAGICS = (
    (0, b"QFI\xfb", "qcow2"),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
)


def probe_format(path: str) -> str:
    """What the file's header claims to be (``raw`` when it claims nothing)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(0x44)
    except OSError:
        return "raw"
    for offset, magic, fmt in MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return fmt
    return "raw"


def confirmed_format(spec: DiskSpec, path: str, probed: str | None) -> str:
    """The caller's ``format``; without one, raw, unless the image claims to be
    something else: then the caller must say so."""
    if spec.format:
        return spec.format
    if probed in (None, "raw"):
        return "raw"
    raise SpecError(
        "format",
        f"{path} has a {probed} header but no format was given: salt-kvm does not take an "
        "image's header on trust (a raw disk a guest wrote can carry one that names a host "
        "file as its backing file)",
        f"format: {probed} if you know the image is one, or format: raw",
    )


def existing_source(
    conn: libvirt.virConnect,
    domain: str,
    spec: DiskSpec,
    allowed_dirs: tuple[str, ...],
    uses: Uses,
) -> Source:
    host = connection.remote_host(conn)
    # Symlinks resolved first: the check is on the file QEMU will open, and the
    # resolved path is what is attached (a link swapped later changes nothing).
    if spec.path is None:
        raise SpecError(spec.name, "has neither size nor path", "size or path")
    path = real(spec.path, host is None)
    roots = sorted(pools(conn).values())
    allowed = [real(d, host is None) for d in (*roots, *allowed_dirs)]
    if not within(path, allowed):
        shown = spec.path if path == spec.path else f"{spec.path} (a link to {path})"
        raise SpecError(
            "path",
            f"{shown} is outside the storage pools and allowed directories",
            f"a path under {', '.join([*roots, *allowed_dirs]) or '(none)'}; "
            "allow more directories with kvm:disk:allowed_dirs (the minion's configuration) "
            "or disk_allowed_dirs (the cloud provider's)",
        )
    vol = pool_volume(conn, path)
    if vol is None and host is not None:
        raise SpecError(
            "path",
            f"{path} is not a volume of a storage pool on {host}: a file outside the pools "
            "can only be checked on the hypervisor itself",
            f"a volume of one of {host}'s pools ({', '.join(roots) or 'none active'}); "
            "or run kvm_disk on the hypervisor's own minion",
        )
    if vol is None and not os.path.exists(path):
        raise NotFoundError(f"path: {path} does not exist")
    block = vol is None and stat.S_ISBLK(os.stat(path).st_mode)
    check_uses(spec, path, uses, domain)
    if not spec.readonly:
        overlays = backed_by(conn, path)
        if overlays:
            raise ConflictError(
                f"path: {path} is the backing file of {', '.join(overlays)}; writing to it "
                "would corrupt them (attach it readonly)"
            )
    # libvirt's format of a pool volume is its own probe of the same header.
    claims = {volume_format(vol) if vol is not None else "raw"}
    if host is None and os.path.exists(path):
        claims.add(probe_format(path))
    fmt = confirmed_format(spec, path, max(claims, key=lambda c: c != "raw"))
    return Source(path=path, format=fmt, block=block)


def source_of(conn, domain, spec, allowed_dirs, uses, created) -> Source | None:
    if spec.new:
        source = new_volume_source(conn, domain, spec, created)
        if source is not None:
            check_uses(spec, source.path, uses, domain)
        return source
    return existing_source(conn, domain, spec, allowed_dirs, uses)


def choose_target(spec: DiskSpec, domain: str, xmls: tuple[Domain | None, ...]) -> str:
    present = [d for xml in xmls if xml is not None for d in xml.disks]
    same = next((d for d in present if d.name == spec.name), None)
    if same is not None:
        raise ConflictError(
            f"name: {domain} already has a disk named {spec.name!r} ({same.target_dev})"
        )
    used = {d.target_dev: d for d in present}
    if spec.index is not None:
        target = target_name(spec.bus, spec.index)
        if target in used:
            raise ConflictError(
                f"index: {spec.index} ({target}) is already used by disk "
                f"{used[target].name!r} of {domain}"
            )
        return target
    for index in range(1, max_index(spec.bus) + 1):
        if target_name(spec.bus, index) not in used:
            return target_name(spec.bus, index)
    raise ConflictError(f"index: {domain} has no free {spec.bus} target left")


def affect_flags(dom: libvirt.virDomain, live: bool, persistent: bool) -> int:
    flags = (LIVE if live and dom.isActive() else 0) | (
        CONFIG if persistent and dom.isPersistent() else 0
    )
    if not flags:
        if not dom.isActive():
            raise SpecError(
                "persistent",
                f"{dom.name()} is not running: only its definition can take the disk",
                "persistent: true, or start the domain first",
            )
        raise SpecError("live", "with persistent false the disk needs live: true", "true")
    return flags
