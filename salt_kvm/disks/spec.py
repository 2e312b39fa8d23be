"""External disks: the disk spec (module arguments and the profile's ``disks:``),
its validation, target names and the disk's XML. Pure logic; the libvirt side
(checks against every domain, volumes, attach/detach/resize) is ``diskops``.

A disk has a **name** (unique per domain, kept as the libvirt user alias
``ua-NAME`` and, when short enough, as the serial the guest sees in
``/dev/disk/by-id/``) and either a ``size`` (salt-kvm creates a sparse volume
in a pool) or a ``path`` (an existing file or block device).
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from typing import Any

from lxml import etree

from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import boolean, check_keys, object_name, one_of, text, whole_number
from salt_kvm.virt.domain import Disk
from salt_kvm.virt.units import GIB, parse_size

# SlapOS's external-disk formats; cloop is read-only in QEMU.
FORMATS = ("qcow2", "raw", "vdi", "vmdk", "cloop", "qed")
NEW_FORMATS = ("qcow2", "raw", "vdi", "vmdk", "qed")
READONLY_FORMATS = ("cloop",)
BUSES = ("virtio", "scsi", "sata", "ide")
TARGET_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}
CACHES = ("default", "none", "writethrough", "writeback", "directsync", "unsafe")
# What each format can preallocate (libvirt: metadata flag, or allocation = capacity).
PREALLOCATION: dict[str, tuple[str, ...]] = {"qcow2": ("off", "metadata"), "raw": ("off", "full")}
DISK_KEYS = (
    "size",
    "path",
    "format",
    "pool",
    "bus",
    "cache",
    "index",
    "readonly",
    "shareable",
    "preallocation",
)
DEFAULT_POOL = "default"
# Index 0 is the root disk (vda); external disks start at 1 (vdb), as in SlapOS.
MAX_INDEX = {"ide": 3}
MAX_INDEX_DEFAULT = 26 + 26 * 26 - 1  # vdzz
SERIAL_MAX = 20  # virtio-blk's limit
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_TARGET_RE = re.compile(r"(vd|sd|hd|xvd)([a-z]+)")
NAME_RULE = "1-63 letters, digits, '-' or '_', starting with a letter or digit, not a target (vdb)"


@dataclass(frozen=True)
class DiskSpec:
    name: str
    size: int | None = None
    path: str | None = None
    format: str | None = None
    pool: str = DEFAULT_POOL
    bus: str = "virtio"
    cache: str | None = None
    index: int | None = None
    readonly: bool = False
    shareable: bool = False
    preallocation: str = "off"

    @property
    def new(self) -> bool:
        """salt-kvm creates the volume (``size``) rather than using ``path``."""
        return self.size is not None

    @property
    def volume_format(self) -> str:
        """The format of the volume salt-kvm creates (the parser sets it with ``size``)."""
        return self.format or "qcow2"


@dataclass(frozen=True)
class ProfileDisks:
    """The profile's ``disks:``, ``delete_disks`` and ``disk_allowed_dirs``."""

    disks: tuple[DiskSpec, ...] = ()
    delete: bool = False
    allowed_dirs: tuple[str, ...] = ()


# ---- names and targets ---------------------------------------------------------


def check_name(name: object, key: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or _TARGET_RE.fullmatch(name):
        raise SpecError(key, f"{name!r} is not a disk name", NAME_RULE)
    return name


def letters(index: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa: libvirt's target suffixes."""
    out = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        out = string.ascii_lowercase[rest] + out
    return out


def target_name(bus: str, index: int) -> str:
    return TARGET_PREFIX[bus] + letters(index)


def target_index(target: str | None) -> int | None:
    """vdb -> 1; None for names that are not ``<prefix><letters>``."""
    match = _TARGET_RE.fullmatch(target or "")
    if not match:
        return None
    number = 0
    for char in match.group(2):
        number = number * 26 + string.ascii_lowercase.index(char) + 1
    return number - 1


def max_index(bus: str) -> int:
    return MAX_INDEX.get(bus, MAX_INDEX_DEFAULT)


# ---- parsing -----------------------------------------------------------------


def _label(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def parse_disk(name: object, values: dict[str, Any], where: str = "") -> DiskSpec:
    """Validate one disk. ``where`` prefixes keys in errors (``disks.data``)."""
    name = check_name(name, where or "name")
    check_keys(values, DISK_KEYS, where or "disk")
    has_size = values.get("size") not in (None, "")
    has_path = values.get("path") not in (None, "")
    if has_size == has_path:
        raise SpecError(
            where or "size",
            "needs exactly one of size (a new volume) or path (an existing image or device)",
            ("size", "path"),
        )
    size = parse_size(values["size"], _label(where, "size"), GIB) if has_size else None
    if size is not None:
        size = -(-size // 512) * 512  # whole sectors, as qemu-img and blockResize need
    path = text(values, "path", label=_label(where, "path")) if has_path else None
    if path is not None and (not os.path.isabs(path) or os.path.normpath(path) != path):
        raise SpecError(
            _label(where, "path"),
            f"{path!r} is not a normalized absolute path",
            "an absolute path without '..', '//' or a trailing '/'",
        )
    # A path's format may come from its pool volume later; a new volume is qcow2.
    fmt = None
    if has_size or values.get("format") not in (None, ""):
        formats = NEW_FORMATS if has_size else FORMATS
        fmt = one_of(values, "format", formats, "qcow2", _label(where, "format"))
    readonly = boolean(values, "readonly", False)
    if has_size and readonly:
        raise SpecError(
            _label(where, "readonly"), "a new, empty volume cannot be read-only", "false"
        )
    if fmt in READONLY_FORMATS and not readonly:
        raise SpecError(_label(where, "readonly"), f"{fmt} images are read-only", "true")
    bus = one_of(values, "bus", BUSES, "virtio", _label(where, "bus"))
    index = values.get("index")
    if index is not None:
        index = whole_number(index, _label(where, "index"), 1, max_index(bus))
    pool = object_name(values, "pool", label=_label(where, "pool")) or DEFAULT_POOL
    if has_path and values.get("pool") not in (None, ""):
        raise SpecError(
            _label(where, "pool"), "goes with size (where to create the volume)", "leave it out"
        )
    allowed = PREALLOCATION.get(fmt or "", ("off",)) if has_size else ("off",)
    preallocation = one_of(values, "preallocation", allowed, "off", _label(where, "preallocation"))
    return DiskSpec(
        name=name,
        size=size,
        path=path,
        format=fmt,
        pool=pool,
        bus=bus,
        cache=one_of(values, "cache", (*CACHES, None), None, _label(where, "cache")),
        index=index,
        readonly=readonly,
        shareable=boolean(values, "shareable", False),
        preallocation=preallocation,
    )


def parse_disks(value: object, key: str = "disks") -> tuple[DiskSpec, ...]:
    """A mapping name -> disk, returned ordered by index (disks without one last,
    in the mapping's order). Indexes must be distinct per target prefix."""
    accepted = "a mapping of disk names to {size|path, format, bus, cache, index, ...}"
    if not isinstance(value, dict):
        raise SpecError(key, f"{value!r} is not a mapping of disks", accepted)
    specs = []
    for name, values in value.items():
        where = f"{key}.{name}"
        if not isinstance(values, dict):
            raise SpecError(where, f"{values!r} is not a disk", accepted)
        specs.append(parse_disk(name, values, where))
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.index is None:
            continue
        target = target_name(spec.bus, spec.index)
        if target in seen:
            raise SpecError(
                f"{key}.{spec.name}.index",
                f"{spec.index} ({target}) is also the index of {seen[target]}",
                "distinct indexes",
            )
        seen[target] = spec.name
    paths: dict[str, str] = {}
    for spec in specs:
        if spec.path is not None and spec.path in paths:
            raise SpecError(
                f"{key}.{spec.name}.path",
                f"{spec.path} is also disk {paths[spec.path]}",
                "distinct paths",
            )
        if spec.path is not None:
            paths[spec.path] = spec.name
    numbered = sorted((s for s in specs if s.index is not None), key=lambda s: s.index or 0)
    return tuple(numbered + [s for s in specs if s.index is None])


def parse_allowed_dirs(value: object, key: str = "allowed_dirs") -> tuple[str, ...]:
    accepted = "a list of absolute directory paths"
    if value in (None, "", []):
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise SpecError(key, f"{value!r} is not a list of directories", accepted)
    dirs = []
    for item in items:
        if not isinstance(item, str) or not os.path.isabs(item):
            raise SpecError(key, f"{item!r} is not an absolute path", accepted)
        dirs.append(os.path.normpath(item))
    return tuple(dirs)


def parse_profile(values: dict) -> ProfileDisks:
    """The profile keys ``disks``, ``delete_disks`` and ``disk_allowed_dirs``."""
    disks = values.get("disks")
    return ProfileDisks(
        disks=parse_disks(disks) if disks not in (None, {}) else (),
        delete=boolean(values, "delete_disks", False),
        allowed_dirs=parse_allowed_dirs(values.get("disk_allowed_dirs"), "disk_allowed_dirs"),
    )


def parse_size_arg(value: object, key: str = "size") -> int:
    size = parse_size(value, key, GIB)
    return -(-size // 512) * 512


def within(path: str, roots: tuple[str, ...] | list[str]) -> bool:
    """Whether ``path`` is one of ``roots`` or below one."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


# ---- the disk element ------------------------------------------------------------


@dataclass
class Source:
    """Where a disk's data is: a file or block device, with its format."""

    path: str
    format: str
    block: bool = False


def disk_element(spec: DiskSpec, target: str, source: Source) -> Disk:
    disk = Disk(etree.Element("disk", type="file", device=Disk.DEVICE_DISK))
    disk.driver_name = "qemu"
    disk.driver_type = source.format
    if spec.cache:
        disk.driver_cache = spec.cache
    if source.block:
        disk.set_block(source.path)
    else:
        disk.path = source.path
    disk.target_dev = target
    disk.target_bus = spec.bus
    if len(spec.name) <= SERIAL_MAX:
        disk.serial = spec.name
    disk.readonly = spec.readonly
    disk.shareable = spec.shareable
    disk.alias = Disk.USER_ALIAS_PREFIX + spec.name
    return disk


# ---- states ------------------------------------------------------------------


def differences(current: dict, spec: DiskSpec) -> tuple[list[str], int | None]:
    """How an attached disk (as ``diskops.describe`` shows it) differs from
    ``spec``: (differences a state cannot fix in place, size to grow to)."""
    wanted = {
        "source": spec.path,
        "format": spec.format if spec.path is None or spec.format else None,
        "bus": spec.bus,
        "cache": spec.cache,
        "index": spec.index,
        "readonly": spec.readonly,
        "shareable": spec.shareable,
    }
    fixed = [
        f"{key} is {current.get(key)!r}, not {value!r}"
        for key, value in wanted.items()
        if value is not None and current.get(key) != value
    ]
    grow = None
    if spec.size is not None and current.get("size") is not None:
        if spec.size < current["size"]:
            fixed.append(f"size is {current['size']} bytes, more than {spec.size}; disks only grow")
        elif spec.size > current["size"]:
            grow = spec.size
    return fixed, grow
