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
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from salt_kvm.errors import NotFoundError, SaltKvmError, SpecError
from salt_kvm.virt import locks

FORMAT = 1
MANIFEST = "manifest.json"
DOMAIN_XML = "domain.xml"
PARTIAL = ".partial-"
LOCK = ".lock"
KIND_FULL = "full"
KIND_INCREMENTAL = "incremental"
# A store may sit on a NAS or be a replica: every manifest field is checked
# against these before anything uses it (``parse_manifest``); \Z, not $, so that a
# trailing newline never passes.
_POINT = r"[0-9]{8}T[0-9]{6}Z(?:-[0-9]{1,6})?"
POINT_RE = re.compile(rf"^{_POINT}\Z")
TARGET_RE = re.compile(r"^(?:vd|sd|hd|xvd)[a-z]{1,3}\Z")
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
CHECKPOINT_RE = re.compile(rf"^saltkvm-[0-9a-f]{{8}}-{_POINT}\Z")
CREATED_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z\Z")
IMAGE_FORMAT = "qcow2"
CONSISTENCIES = ("frozen", "crash-consistent", "shut-off")
POINT_METHODS = ("api", "snapshot")
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
        """No checks: for dicts this process made; a manifest from a store is
        read with ``parse_manifest``."""
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


class ManifestError(SaltKvmError):
    """A point's manifest (or a file it names) does not fit the store's layout."""

    def __init__(self, folder: str, key: str, problem: str, accepted: str | None = None):
        self.folder, self.key = folder, key
        message = f"backup point {folder}: {key}: {problem}"
        if accepted:
            message += f" (accepted: {accepted})"
        super().__init__(message)


def image_file(target: str) -> str:
    """The one name a disk's image has in a point's folder."""
    return f"{target}.{IMAGE_FORMAT}"


def image_backing(parent: Point, target: str) -> str:
    """The backing file an incremental's image names: its parent point's image."""
    return f"../{parent.id}/{image_file(target)}"


def _pick(folder: str, data: dict, key: str, check, accepted: str, optional: bool = False):
    value = data.get(key)
    if value is None and optional:
        return None
    if not check(value):
        raise ManifestError(folder, key, f"{value!r} is not valid", accepted)
    return value


def _is(types, pattern=None, choices=None):
    def check(value):
        if isinstance(value, bool) and types is not bool:
            return False
        if not isinstance(value, types):
            return False
        if pattern is not None and not pattern.match(value):
            return False
        return choices is None or value in choices

    return check


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _seconds(value) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def parse_manifest(data: object, folder: str, domain: str) -> Point:
    """The point a manifest describes, every field checked against the store's
    layout: the folder it sits in, the domain asked for, image files named after
    their disk inside the folder, an incremental's backing file its parent's
    image. Raises ``ManifestError`` naming the field; unknown keys are ignored
    (a newer manifest reads too)."""
    if not isinstance(data, dict):
        raise ManifestError(folder, MANIFEST, "is not a JSON object")
    pick = functools.partial(_pick, folder, data)
    fmt = pick("format", _count, str(FORMAT))
    if fmt != FORMAT:
        raise ManifestError(folder, "format", f"{fmt!r} is not a format this version reads", "1")
    pid = pick("id", _is(str, POINT_RE), "the point's folder name")
    if pid != folder:
        raise ManifestError(folder, "id", f"{pid!r} is not the folder's name", folder)
    got = data.get("domain")
    if got != domain:
        raise ManifestError(folder, "domain", f"{got!r} is not the domain asked for", domain)
    kind = pick("kind", _is(str, choices=(KIND_FULL, KIND_INCREMENTAL)), "full, incremental")
    parent = pick("parent", _is(str, POINT_RE), "null or an earlier point id", optional=True)
    chain = pick("chain", _is(str, POINT_RE), "the id of the chain's full point")
    if kind == KIND_FULL and (parent is not None or chain != pid):
        raise ManifestError(
            folder, "parent", "a full point follows no point and starts its chain", "null"
        )
    if kind == KIND_INCREMENTAL and (parent is None or not parent < pid):
        raise ManifestError(folder, "parent", f"{parent!r} is not an earlier point", "a point id")
    if kind == KIND_INCREMENTAL and not chain <= parent:
        raise ManifestError(
            folder, "chain", f"{chain!r} does not start before the parent {parent!r}"
        )
    point = Point(
        id=pid,
        domain=domain,
        kind=kind,
        chain=chain,
        parent=parent,
        checkpoint=pick("checkpoint", _is(str, CHECKPOINT_RE), "saltkvm-<tag>-<id>", True),
        created=pick("created", _is(str, CREATED_RE), "YYYY-MM-DDTHH:MM:SSZ"),
        consistency=pick("consistency", _is(str, choices=CONSISTENCIES), ", ".join(CONSISTENCIES)),
        frozen=pick("frozen", _is(bool), "true, false"),
        domain_xml_sha256=pick("domain_xml_sha256", _is(str, SHA256_RE), "a sha256", True),
        duration=pick("duration", _seconds, "a number of seconds", True),
        method=pick("method", _is(str, choices=POINT_METHODS), ", ".join(POINT_METHODS)),
    )
    disks = data.get("disks")
    if not isinstance(disks, dict) or not disks:
        raise ManifestError(folder, "disks", f"{disks!r} is not a map of disks", "target: image")
    for target, entry in disks.items():
        point.disks[target] = _parse_disk(folder, point, target, entry)
    return point


def _parse_disk(folder: str, point: Point, target: object, entry: object) -> DiskImage:
    key = f"disks.{target}"
    if not isinstance(target, str) or not TARGET_RE.match(target):
        raise ManifestError(folder, "disks", f"{target!r} is not a disk target", "vda, sdb, ...")
    if not isinstance(entry, dict):
        raise ManifestError(folder, key, "is not a JSON object")
    pick = functools.partial(_pick, folder, {f"{key}.{k}": v for k, v in entry.items()})
    if pick(f"{key}.target", _is(str), target) != target:
        raise ManifestError(folder, f"{key}.target", "is not the disk's key", target)
    name = image_file(target)
    if pick(f"{key}.file", _is(str), name) != name:
        raise ManifestError(
            folder, f"{key}.file", f"{entry['file']!r} is not the disk's image", name
        )
    if pick(f"{key}.format", _is(str), IMAGE_FORMAT) != IMAGE_FORMAT:
        raise ManifestError(
            folder, f"{key}.format", f"{entry['format']!r} is not valid", IMAGE_FORMAT
        )
    backing = pick(f"{key}.backing", _is(str), "the parent point's image", optional=True)
    wanted = f"../{point.parent}/{name}" if point.parent else None
    if backing != wanted:
        raise ManifestError(
            folder,
            f"{key}.backing",
            f"{backing!r} is not the parent point's image",
            wanted or "null (a full point has no backing file)",
        )
    return DiskImage(
        target=target,
        file=name,
        format=IMAGE_FORMAT,
        virtual_size=pick(f"{key}.virtual_size", _count, "a number of bytes"),
        size=pick(f"{key}.size", _count, "a number of bytes"),
        sha256=pick(f"{key}.sha256", _is(str, SHA256_RE), "a sha256 in hexadecimal"),
        backing=backing,
        source=pick(f"{key}.source", _is(str), "a path", optional=True),
    )


def new_point_id(existing: set[str], now: float | None = None) -> str:
    """A sortable UTC time stamp, suffixed when one already exists this second."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    candidate, n = stamp, 1
    while candidate in existing:
        n += 1
        candidate = f"{stamp}-{n}"
    return candidate


def sha256_file(path: str | Path, chunk: int = 4 * 1024 * 1024) -> str:
    """The checksum of a regular file (never read through a symbolic link)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
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
    chain = list(reversed(out))
    for parent, child in zip(chain, chain[1:], strict=False):
        # each image's backing file is its parent's image of the same disk
        if child.chain != chain[0].id or not set(child.disks) <= set(parent.disks):
            raise SaltKvmError(
                f"backup point {child.id} does not follow {parent.id} (chain {child.chain!r}, "
                f"disks {', '.join(sorted(child.disks))} of {', '.join(sorted(parent.disks))})"
            )
    return chain


def prune_plan(points: list[Point], keep: int) -> list[Point]:
    """The points to delete to keep the newest ``keep`` chains: whole chains only."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise SpecError("keep", f"{keep!r} is not a number of chains", "an integer of 1 or more")
    groups = chains(points)
    return [p for group in groups[: max(0, len(groups) - keep)] for p in group]


DOMAIN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,252}\Z")
MANIFEST_MAX = 1024 * 1024


def check_domain(value: object, key: str = "domain") -> str:
    """A domain's folder below a destination: one plain path component."""
    if not isinstance(value, str) or not DOMAIN_RE.match(value) or value.strip(".") == "":
        raise SpecError(
            key,
            f"{value!r} is not a domain name a backup folder can have",
            "letters, digits, '_', '.', '+', '-', not starting with '.' or '-'",
        )
    return value


def read_no_follow(path: Path, limit: int | None = None) -> bytes:
    """The content of a regular file, never through a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1 if limit else -1)
    finally:
        os.close(fd)
    if limit and len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


class Store:
    """The backups of one domain below ``dest``."""

    def __init__(self, dest: str | Path, domain: str):
        dest = Path(dest)
        if not dest.is_absolute():
            raise SpecError(
                "dest", f"{str(dest)!r} is not an absolute path", "an absolute directory path"
            )
        self.dest = dest
        self.domain = check_domain(domain)
        self.root = dest / domain

    # ---- reading -------------------------------------------------------------
    def scan(self) -> tuple[list[Point], dict[str, SaltKvmError]]:
        """Complete points (oldest first), and the point folders that do not fit
        the layout with why. A folder without a manifest is no point (a run died)."""
        found: list[Point] = []
        bad: dict[str, SaltKvmError] = {}
        if self.root.is_symlink():
            raise SaltKvmError(
                f"{self.root} is a symbolic link: a store's folders are never followed out of it"
            )
        if not self.root.is_dir():
            return found, bad
        for child in self.root.iterdir():
            if not POINT_RE.fullmatch(child.name):
                continue
            try:
                found.append(self.read_point(child.name))
            except FileNotFoundError:
                continue
            except SaltKvmError as exc:
                bad[child.name] = exc
        return sorted(found, key=lambda p: p.id), bad

    def read_point(self, folder: str) -> Point:
        """The point in ``folder``, its manifest checked (``parse_manifest``)."""
        where = self.root / folder
        if not stat.S_ISDIR(os.lstat(where).st_mode):
            raise ManifestError(folder, "folder", "is not a folder (a symbolic link?)")
        try:
            raw = read_no_follow(where / MANIFEST, MANIFEST_MAX)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise ManifestError(folder, MANIFEST, f"cannot be read: {exc.strerror}") from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ManifestError(folder, MANIFEST, f"is not JSON: {exc}") from exc
        return parse_manifest(data, folder, self.domain)

    def points(self) -> list[Point]:
        """Complete points whose manifest fits the layout, oldest first."""
        return self.scan()[0]

    def point(self, ref: str) -> Point:
        ref = check_point_ref(ref)
        points, bad = self.scan()
        if not points and not bad:
            raise NotFoundError(f"no backups of {self.domain} in {self.dest}")
        if ref == LATEST:
            ref = max([p.id for p in points] + list(bad))
        if ref in bad:
            raise bad[ref]
        for point in points:
            if point.id == ref:
                return point
        raise NotFoundError(
            f"point: no backup {ref!r} of {self.domain} in {self.dest} "
            f"(accepted: latest, {', '.join(p.id for p in points)})"
        )

    def chain(self, ref: str) -> tuple[Point, list[Point]]:
        """Point ``ref`` and the points needed to rebuild it, full first."""
        point = self.point(ref)
        points, bad = self.scan()
        by_id = {p.id: p for p in points}
        link = point
        while link.parent is not None and link.parent in by_id:
            link = by_id[link.parent]
        if link.parent is not None and link.parent in bad:
            raise SaltKvmError(
                f"backup point {point.id} needs {link.parent}, which is unusable: "
                f"{bad[link.parent]}"
            )
        return point, chain_to(points, point.id)

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
        self.make_root()
        busy = f"another run holds the backup lock of {self.domain} in {self.dest}"
        with flocked(self.root / LOCK, what, busy):
            yield

    def make_root(self) -> Path:
        """The domain's folder, made (0755) if missing, and checked before
        anything is written into it or read from it under the lock: a real
        folder (never a link) owned by this process's user, root or the
        destination's owner, writable by nobody else. In a world-writable
        destination a local user could otherwise make ``dest/<domain>`` first
        and own every image root writes there."""
        try:
            os.mkdir(self.root, 0o755)
            os.chmod(self.root, 0o755)  # whatever the umask
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(self.dest, 0o755, exist_ok=True)
            return self.make_root()
        info = os.lstat(self.root)
        owners = {os.geteuid(), 0, os.stat(self.dest).st_uid}
        problem = None
        if not stat.S_ISDIR(info.st_mode):
            problem = "is a symbolic link or not a folder"
        elif info.st_uid not in owners:
            problem = (
                f"is owned by uid {info.st_uid}, not by this process's user, root or the "
                "destination's owner"
            )
        elif stat.S_IMODE(info.st_mode) & 0o022:
            problem = (
                f"has mode {stat.S_IMODE(info.st_mode):04o}: writable by group or others "
                "(accepted: not group- or world-writable, as 0755)"
            )
        if problem:
            raise SaltKvmError(
                f"backup folder {self.root} {problem}: refused, nothing written (someone "
                "else may have made it; remove it and salt-kvm makes its own)"
            )
        return self.root

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
        if deep and sha256_file(folder / disk.file) != disk.sha256:
            problems.append(f"{name}: checksum mismatch")
            continue
        problems += [f"{name} ({target}): {p}" for p in image_problems(folder / disk.file, disk)]
    xml = folder / DOMAIN_XML
    if point.domain_xml_sha256 and (
        _regular_file(xml) is not None or sha256_file(xml) != point.domain_xml_sha256
    ):
        problems.append(f"{point.id}/{DOMAIN_XML}: missing or checksum mismatch")
    return problems


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
