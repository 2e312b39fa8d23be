"""The on-disk layout of backups: points, their manifests, chains and the lock.

One folder per domain below a destination::

    DEST/DOMAIN/.lock                     held while a run changes the folder
    DEST/DOMAIN/20261121T041100Z/         one complete point
        manifest.json                     written last: no manifest, no point
        vda.qcow2 vdb.qcow2               an incremental's images have the
        domain.xml                        previous point's images as backing file
    DEST/DOMAIN/.partial-20261121T051100Z/  a run in progress (or killed)

A point is complete only once its folder has lost the ``.partial-`` prefix,
which happens after every image was checked and its checksum recorded; so a
killed run can never leave something that passes for a backup. A chain is a
full point and the incrementals that follow it; prune removes whole chains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import locks
from .errors import NotFoundError, SaltKvmError, SpecError

FORMAT = 1
MANIFEST = "manifest.json"
DOMAIN_XML = "domain.xml"
PARTIAL = ".partial-"
LOCK = ".lock"
KIND_FULL = "full"
KIND_INCREMENTAL = "incremental"
POINT_RE = re.compile(r"\d{8}T\d{6}Z(?:-\d+)?", re.ASCII)
LATEST = "latest"


@dataclass
class DiskImage:
    target: str
    file: str
    format: str
    virtual_size: int
    size: int
    sha256: str
    backing: str | None = None
    source: str | None = None


@dataclass
class Point:
    id: str
    domain: str
    kind: str
    chain: str
    parent: str | None
    checkpoint: str | None
    created: str
    consistency: str
    frozen: bool
    disks: dict[str, DiskImage] = field(default_factory=dict)
    domain_xml_sha256: str | None = None
    duration: float | None = None
    method: str = "api"  # how it was taken: "api" (backup API) or "snapshot" (fallback)
    format: int = FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Point:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # a newer manifest reads too
        disks = {k: DiskImage(**v) for k, v in (data.pop("disks", None) or {}).items()}
        return cls(disks=disks, **data)

    @property
    def bytes(self) -> int:
        return sum(d.size for d in self.disks.values())

    def summary(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "chain": self.chain,
            "parent": self.parent,
            "created": self.created,
            "consistency": self.consistency,
            "frozen": self.frozen,
            "method": self.method,
            "bytes": self.bytes,
            "disks": sorted(self.disks),
        }


def new_point_id(existing: set[str], now: float | None = None) -> str:
    """A sortable UTC time stamp, suffixed when one already exists this second."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    candidate, n = stamp, 1
    while candidate in existing:
        n += 1
        candidate = f"{stamp}-{n}"
    return candidate


def sha256_file(path: str | Path, chunk: int = 4 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_point_ref(value: object, key: str = "point") -> str:
    if value in (None, LATEST):
        return LATEST
    if not isinstance(value, str) or not POINT_RE.fullmatch(value):
        raise SpecError(
            key, f"{value!r} is not a backup point", "latest or an id such as 20261121T041100Z"
        )
    return value


def chains(points: list[Point]) -> list[list[Point]]:
    """Group ``points`` (oldest first) into chains, oldest chain first."""
    by_chain: dict[str, list[Point]] = {}
    for point in sorted(points, key=lambda p: p.id):
        by_chain.setdefault(point.chain, []).append(point)
    return [by_chain[c] for c in sorted(by_chain)]


def chain_to(points: list[Point], point_id: str) -> list[Point]:
    """The points needed to rebuild ``point_id``: its full, then each incremental up to it."""
    by_id = {p.id: p for p in points}
    if point_id not in by_id:
        raise NotFoundError(f"no complete backup point {point_id!r}")
    out = [by_id[point_id]]
    while out[-1].parent is not None:
        parent = by_id.get(out[-1].parent)
        if parent is None:
            raise SaltKvmError(
                f"backup point {out[-1].id} needs {out[-1].parent}, which is missing: "
                "the chain is broken"
            )
        out.append(parent)
    if out[-1].kind != KIND_FULL:
        raise SaltKvmError(f"backup chain of {point_id} does not start with a full backup")
    return list(reversed(out))


def prune_plan(points: list[Point], keep: int) -> list[Point]:
    """The points to delete to keep the newest ``keep`` chains: whole chains only."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise SpecError("keep", f"{keep!r} is not a number of chains", "an integer of 1 or more")
    groups = chains(points)
    return [p for group in groups[: max(0, len(groups) - keep)] for p in group]


class Store:
    """The backups of one domain below ``dest``."""

    def __init__(self, dest: str | Path, domain: str):
        dest = Path(dest)
        if not dest.is_absolute():
            raise SpecError(
                "dest", f"{str(dest)!r} is not an absolute path", "an absolute directory path"
            )
        self.dest = dest
        self.domain = domain
        self.root = dest / domain

    # ---- reading -------------------------------------------------------------
    def points(self) -> list[Point]:
        """Complete points, oldest first; folders without a readable manifest are skipped."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            if not POINT_RE.fullmatch(child.name):
                continue
            with contextlib.suppress(OSError, ValueError, TypeError):
                found.append(Point.from_dict(json.loads((child / MANIFEST).read_text())))
        return sorted(found, key=lambda p: p.id)

    def point(self, ref: str) -> Point:
        ref = check_point_ref(ref)
        points = self.points()
        if not points:
            raise NotFoundError(f"no backups of {self.domain} in {self.dest}")
        if ref == LATEST:
            return points[-1]
        for point in points:
            if point.id == ref:
                return point
        raise NotFoundError(
            f"point: no backup {ref!r} of {self.domain} in {self.dest} "
            f"(accepted: latest, {', '.join(p.id for p in points)})"
        )

    def path(self, point: Point | str, name: str = "") -> Path:
        pid = point if isinstance(point, str) else point.id
        return self.root / pid / name if name else self.root / pid

    def partials(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith(PARTIAL))

    # ---- writing -------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, what: str = "backup") -> Iterator[None]:
        """One run at a time per domain: a second one is refused, not queued."""
        self.root.mkdir(parents=True, exist_ok=True)
        busy = f"another run holds the backup lock of {self.domain} in {self.dest}"
        with flocked(self.root / LOCK, what, busy):
            yield

    def begin(self, point_id: str) -> Path:
        partial = self.root / f"{PARTIAL}{point_id}"
        # qemu (another user) opens the images by path: traverse, no listing
        partial.mkdir(parents=True, mode=0o711)
        os.chmod(partial, 0o711)
        return partial

    def commit(self, partial: Path, point: Point) -> Path:
        """Write the manifest (synced) and give the folder its final name."""
        manifest = partial / MANIFEST
        tmp = partial / f"{MANIFEST}.tmp"
        with open(tmp, "w") as handle:
            json.dump(point.to_dict(), handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, manifest)
        for child in partial.iterdir():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        final = self.root / point.id
        os.rename(partial, final)
        _fsync_dir(self.root)
        return final

    def clean_partials(self) -> list[str]:
        removed = []
        for partial in self.partials():
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial.name)
        return removed

    def delete(self, point: Point) -> None:
        """Remove a point: first un-name it (so it stops being listed), then its files."""
        doomed = self.root / f"{PARTIAL}deleted-{point.id}"
        os.rename(self.path(point), doomed)
        shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def flocked(path: Path, what: str, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (never through a link); ``busy`` (plus
    the holder) when taken. The store's own lock: its folder is the operator's."""
    with locks.held(path.name, what, directory=path.parent, busy=busy, secure=False):
        yield


@contextlib.contextmanager
def domain_locked(
    uuid: str, domain: str, dest: Path | None, lock_dir: str | None = None, what: str = ""
):
    """One backup run or snapshot operation per domain on this host, whatever
    the destination: a run cleaning up after a killed one must never merge back
    a live run's overlays, and a snapshot taken while a run copies would make
    the merge-back delete its backing file. In salt-kvm's checked lock directory."""
    if dest is not None:
        busy = f"another backup run of {domain} (into another destination than {dest}) is under way"
    else:
        busy = f"a backup run or snapshot operation of {domain} is under way"
    what = what or f"backup into {dest}"
    with locks.held(f"backup-{uuid}.lock", what, directory=lock_dir, busy=busy):
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_point(store: Store, point: Point, deep: bool = True) -> list[str]:
    """Problems with ``point`` (empty when it is sound): files, checksums, images."""
    from . import qemuimg  # qemu-img only when a point is really checked

    problems = []
    folder = store.path(point)
    for target, disk in sorted(point.disks.items()):
        path = folder / disk.file
        if not path.is_file():
            problems.append(f"{point.id}/{disk.file}: missing")
            continue
        if path.stat().st_size != disk.size:
            problems.append(f"{point.id}/{disk.file}: size {path.stat().st_size} != {disk.size}")
            continue
        if deep and sha256_file(path) != disk.sha256:
            problems.append(f"{point.id}/{disk.file}: checksum mismatch")
            continue
        try:
            qemuimg.check(str(path))
        except SaltKvmError as exc:
            problems.append(f"{point.id}/{disk.file} ({target}): {exc}")
    xml = folder / DOMAIN_XML
    if point.domain_xml_sha256 and (
        not xml.is_file() or sha256_file(xml) != point.domain_xml_sha256
    ):
        problems.append(f"{point.id}/{DOMAIN_XML}: missing or checksum mismatch")
    return problems
