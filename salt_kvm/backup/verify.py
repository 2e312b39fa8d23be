"""Whether a stored point is sound: its files, checksums and image headers.

Run before a restore, a replicate and on demand; the headers are read with
qemu-img opening each image alone, so a hostile backing file is never followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from salt_kvm.backup import firmware_state
from salt_kvm.backup.manifest import (
    DOMAIN_XML,
    IMAGE_FORMAT,
    DiskImage,
    Point,
    checksum_file,
    sha256_file,
)
from salt_kvm.backup.store import Store
from salt_kvm.errors import SaltKvmError


def verify_point(store: Store, point: Point, deep: bool = True) -> list[str]:
    """Problems with ``point`` (empty when it is sound): files, checksums, images.

    Every file must be a regular file in the point's folder (no symbolic link),
    and every image a qcow2 whose header names no file outside the point's
    chain: no external data file, and as backing file exactly the parent
    point's image. qemu-img opens each image alone (its backing file never), so
    a hostile header is refused before anything follows it.
    """
    folder = store.path(point)
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return [f"{point.id}: not a folder (a symbolic link?)"]
    except FileNotFoundError:
        return [f"{point.id}: missing"]
    problems = []
    for target, disk in sorted(point.disks.items()):
        name = f"{point.id}/{disk.file}"
        found = _regular_file(folder / disk.file)
        if found is not None:
            problems.append(f"{name}: {found}")
            continue
        size = os.lstat(folder / disk.file).st_size
        if size != disk.size:
            problems.append(f"{name}: size {size} != {disk.size}")
            continue
        if deep and checksum_file(folder / disk.file, disk.algorithm) != disk.checksum:
            problems.append(f"{name}: checksum mismatch")
            continue
        problems += [f"{name} ({target}): {p}" for p in image_problems(folder / disk.file, disk)]
    xml = folder / DOMAIN_XML
    if point.domain_xml_sha256 and (
        _regular_file(xml) is not None or sha256_file(xml) != point.domain_xml_sha256
    ):
        problems.append(f"{point.id}/{DOMAIN_XML}: missing or checksum mismatch")
    return problems + firmware_state.problems(store, point, deep)


def _regular_file(path: Path) -> str | None:
    """Why ``path`` is not a regular file of its own (``None`` when it is)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(mode):
        return "a symbolic link (refused: it could point out of the store)"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def image_problems(path: Path, disk: DiskImage) -> list[str]:
    """What is wrong with the header of a point's image, read without opening
    any file it names."""
    from salt_kvm.virt import qemuimg  # qemu-img only when a point is really checked

    try:
        info = qemuimg.info(str(path), fmt=IMAGE_FORMAT)
    except SaltKvmError as exc:
        return [str(exc)]
    problems = []
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        problems.append(f"names an external data file {specific['data-file']!r} (refused)")
    backing = info.get("backing-filename")
    if backing != disk.backing:
        problems.append(
            f"its backing file is {backing!r}, not {disk.backing!r} (refused: it leaves the chain)"
        )
    elif backing and info.get("backing-filename-format") != IMAGE_FORMAT:
        problems.append(
            f"its backing file's format is {info.get('backing-filename-format')!r}, "
            f"not {IMAGE_FORMAT}"
        )
    if info.get("virtual-size") != disk.virtual_size:
        problems.append(f"virtual size {info.get('virtual-size')} != {disk.virtual_size}")
    if not problems:
        try:
            qemuimg.check(str(path), fmt=IMAGE_FORMAT, backing=False)
        except SaltKvmError as exc:
            problems.append(str(exc))
    return problems
