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
killed run can never leave something that passes for a backup. What a point
and its manifest are lives in ``manifest`` (re-exported here); whether a stored
point is sound, in ``verify``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from salt_kvm.backup.manifest import (
    ALGORITHMS,
    BLAKE2B,
    DOMAIN_XML,
    FORMAT,
    IMAGE_FORMAT,
    KIND_FULL,
    KIND_INCREMENTAL,
    LATEST,
    LOCK,
    MANIFEST,
    MANIFEST_MAX,
    PARTIAL,
    POINT_RE,
    SHA256,
    DiskImage,
    ManifestError,
    Point,
    chain_to,
    chains,
    check_domain,
    check_keep,
    check_point_ref,
    checksum_file,
    digest_fields,
    image_backing,
    image_file,
    new_point_id,
    parse_manifest,
    preferred_algorithm,
    prune_plan,
    sha256_file,
)
from salt_kvm.errors import NotFoundError, SaltKvmError, SpecError
from salt_kvm.virt import locks

# The manifest's vocabulary, re-exported: callers of the store speak it.
__all__ = [
    "DOMAIN_XML",
    "FORMAT",
    "IMAGE_FORMAT",
    "KIND_FULL",
    "KIND_INCREMENTAL",
    "LATEST",
    "LOCK",
    "MANIFEST",
    "MANIFEST_MAX",
    "PARTIAL",
    "POINT_RE",
    "DiskImage",
    "ManifestError",
    "Point",
    "Store",
    "chain_to",
    "chains",
    "check_domain",
    "check_keep",
    "check_point_ref",
    "domain_locked",
    "flocked",
    "image_backing",
    "image_file",
    "new_point_id",
    "parse_manifest",
    "prune_plan",
    "read_no_follow",
    "sha256_file",
    "ALGORITHMS",
    "BLAKE2B",
    "SHA256",
    "checksum_file",
    "digest_fields",
    "preferred_algorithm",
]


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


DEST_ACCEPTED = "an absolute directory path without '.' or '..' parts, spaces or newlines"


def check_dest(dest: object) -> Path:
    """A backup destination as the caller wrote it: absolute, no ``.``/``..``
    parts, no whitespace or control character (``/srv/backup\\n`` from
    ``$(cat file)`` would make a second folder beside the real one)."""
    if not isinstance(dest, str | os.PathLike):
        raise SpecError("dest", f"{dest!r} is not a path", DEST_ACCEPTED)
    raw = os.fspath(dest)
    if not isinstance(raw, str) or not os.path.isabs(raw):
        raise SpecError("dest", f"{raw!r} is not an absolute path", DEST_ACCEPTED)
    if any(c.isspace() or not c.isprintable() for c in raw):
        raise SpecError("dest", f"{raw!r} holds whitespace or a control character", DEST_ACCEPTED)
    trimmed = raw.rstrip("/") or "/"
    if os.path.normpath(trimmed) != trimmed:
        raise SpecError("dest", f"{raw!r} has '.' or '..' parts", DEST_ACCEPTED)
    return Path(raw)


class Store:
    """The backups of one domain below ``dest``."""

    def __init__(self, dest: str | Path, domain: str):
        self.dest = check_dest(dest)
        self.domain = check_domain(domain)
        self.root = self.dest / self.domain

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
        """Unfinished points: real folders only (a link named like one is
        never followed: ``clean_partials`` removes the link alone)."""
        return [p for p in self._partial_entries() if not p.is_symlink()]

    def _partial_entries(self) -> list[Path]:
        if self.root.is_symlink() or not self.root.is_dir():
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
        for partial in self._partial_entries():
            if partial.is_symlink() or not partial.is_dir():
                partial.unlink(missing_ok=True)
            else:
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
