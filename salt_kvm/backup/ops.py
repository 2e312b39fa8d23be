"""Looking after stored backups: list, verify, prune, and a second copy elsewhere.

A second copy goes to another folder (a NAS mount, another disk) or to
another host over SSH. Each point is copied under a ``.partial-`` name,
checked there against the recorded checksums, and only then given its final
name, so the copy is always a set of complete, verified points. On the other
host, ``kvm_backup.restore dest=<that folder> target=<name>`` brings the guest
up from it (a takeover).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import libvirt

from salt_kvm import redact, ssh
from salt_kvm.backup import firmware_state
from salt_kvm.backup import store as bs
from salt_kvm.backup.verify import verify_point
from salt_kvm.errors import ConflictError, SaltKvmError, SpecError
from salt_kvm.virt import chains

TARGET_ACCEPTED = "an absolute directory path, or ssh://user@host[:port]/absolute/path"
BUSY = 75  # flock(1)'s exit status when the lock of a copy over SSH is held (EX_TEMPFAIL)


def list_points(dest: str, domain: str) -> list[dict]:
    return [p.summary() for p in bs.Store(dest, domain).points()]


def verify(dest: str, domain: str, point: str | None = None, deep: bool = True) -> dict:
    """Check every point (or one point and the chain it needs); a point folder
    whose manifest does not fit the store's layout is a problem too."""
    store = bs.Store(dest, domain)
    points, bad = store.scan()
    problems: dict[str, list[str]] = {}
    if point is not None:
        try:
            points = store.chain(point)[1]
        except bs.ManifestError as exc:
            return {"ok": False, "checked": [], "problems": {exc.folder: [str(exc)]}}
    else:
        by_id = {p.id for p in points}
        broken = [p.id for p in points if p.parent and p.parent not in by_id]
        problems.update({folder: [str(exc)] for folder, exc in sorted(bad.items())})
    for each in points:
        found = verify_point(store, each, deep)
        if found:
            problems[each.id] = found
    if point is None:
        for pid in broken:
            problems.setdefault(pid, []).append("the point it follows is missing")
    return {"ok": not problems, "checked": [p.id for p in points], "problems": problems}


def prune(
    dest: str,
    domain: str,
    keep: int,
    test: bool = False,
    conn: libvirt.virConnect | None = None,
) -> dict:
    """Delete the oldest chains, keeping the newest ``keep``; never part of a chain.

    With ``conn`` (the hypervisor's), refused while a volume or a domain's disk
    stands on one of the doomed images (an overlay made to look into a backup)."""
    store = bs.Store(dest, domain)
    doomed = bs.prune_plan(store.points(), keep)
    if test or not doomed:
        return {"deleted": [p.id for p in doomed], "test": test}
    with store.locked("prune"):
        doomed = bs.prune_plan(store.points(), keep)
        if conn is not None:
            files = [str(store.path(p, d.file)) for p in doomed for d in p.disks.values()]
            chains.check_deletable(conn, files, f"prune of {domain}'s backups in {dest}")
        for point in reversed(doomed):  # newest first: a crash never orphans a parent
            store.delete(point)
    return {"deleted": [p.id for p in doomed], "test": False}


# ---- second copies ----------------------------------------------------------------
@dataclass
class SshTarget:
    host: str
    port: int
    user: str
    path: str


def parse_target(value: object) -> Path | SshTarget:
    if not isinstance(value, str) or not value:
        raise SpecError("target", f"{value!r} is not a copy destination", TARGET_ACCEPTED)
    if any(c.isspace() or not c.isprintable() for c in value):
        # urlsplit drops a newline or tab silently; a folder "nas\n" is a typo.
        raise SpecError(
            "target",
            f"{redact.url(value)!r} holds whitespace or a control character",
            TARGET_ACCEPTED,
        )
    if value.startswith("ssh://"):
        parts = urlsplit(value)
        if parts.password is not None:
            raise SpecError(
                "target",
                "an ssh:// URL must not carry a password (it would land in the job cache, "
                "events and logs)",
                "ssh://user@host[:port]/absolute/path with key_filename or password_pillar",
            )
        if not parts.hostname or not parts.path.startswith("/"):
            shown = redact.url(value)
            raise SpecError("target", f"{shown!r} is not a copy destination", TARGET_ACCEPTED)
        return SshTarget(
            parts.hostname, parts.port or 22, unquote(parts.username or "root"), parts.path
        )
    if not value.startswith("/"):
        raise SpecError("target", f"{value!r} is not a copy destination", TARGET_ACCEPTED)
    return Path(value)


def replicate(
    dest: str,
    domain: str,
    target: str,
    password: str | None = None,
    key_filename: str | None = None,
    keep: int | None = None,
    host_key: str | list[str] | None = None,
    known_hosts: str | list[str] | None = None,
) -> dict:
    """Copy every complete point of ``domain`` not yet at ``target``; verify each there.

    An SSH target's host key must be in ``known_hosts`` (files; default: the
    system's and the user's) or match a pinned ``host_key`` fingerprint; it is
    checked before logging in. ``password`` is for library callers: the Salt
    module reads it from pillar or the minion config, never from its arguments.
    """
    where = parse_target(target)
    trust = ssh.HostTrust.build(host_key, known_hosts) if isinstance(where, SshTarget) else None
    store = bs.Store(dest, domain)
    if not store.scan()[0]:  # nothing to copy: fail before taking the lock (which writes)
        store.point(bs.LATEST)  # says why: no backups, or the newest one's problem
    with store.locked("replicate"):
        copier: _DirCopier | _SshCopier
        if isinstance(where, Path):
            copier = _DirCopier(bs.Store(where, domain))
        else:
            copier = _SshCopier(where, domain, password, key_filename, trust)
        try:
            present = copier.present()
            points, bad = store.scan()
            copied = []
            refused = {folder: [str(exc)] for folder, exc in sorted(bad.items())}
            for point in points:
                if point.id in present:
                    continue
                # a hostile image (or one following it) is never spread to a second copy;
                # the checksums are checked on the copy
                problems = verify_point(store, point, deep=False)
                if point.parent in refused:
                    problems.append(f"it follows {point.parent}, which is not copied")
                if problems:
                    refused[point.id] = problems
                    continue
                copier.copy(store, point)
                copied.append(point.id)
            pruned = copier.prune(keep) if keep else []
        finally:
            copier.close()
    return {
        "target": target,
        "copied": copied,
        "already_there": sorted(present),
        "refused": refused,
        "pruned": pruned,
    }


def _open_source(store: bs.Store, point: bs.Point, name: str):
    """A point's file for reading; a symbolic link is never followed out of the store."""
    try:
        return os.fdopen(os.open(store.path(point, name), os.O_RDONLY | os.O_NOFOLLOW), "rb")
    except OSError as exc:
        raise SaltKvmError(f"{point.id}/{name} cannot be copied: {exc.strerror}") from exc


def _files(point: bs.Point) -> list[tuple[str, str, str | None]]:
    """(file name, checksum algorithm, digest) of each file of a point."""
    files: list[tuple[str, str, str | None]]
    files = [(d.file, d.algorithm, d.checksum) for d in point.disks.values()]
    files.append((bs.DOMAIN_XML, bs.SHA256, point.domain_xml_sha256))
    # the UEFI variables and TPM state files: sha256 always (they are small)
    return files + [(f, bs.SHA256, digest) for f, digest in firmware_state.stored_files(point)]


# the command that prints a file's digest on an SSH target (coreutils)
SUM_COMMANDS = {bs.SHA256: "sha256sum", bs.BLAKE2B: "b2sum"}


class _DirCopier:
    def __init__(self, target: bs.Store):
        self.target = target

    def present(self) -> set[str]:
        return {p.id for p in self.target.points()}

    def copy(self, store: bs.Store, point: bs.Point) -> None:
        with self.target.locked("replica"):
            self.target.clean_partials()
            partial = self.target.begin(point.id)
            try:
                for name, algorithm, digest in _files(point):
                    with _open_source(store, point, name) as source:
                        fd = os.open(partial / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        with os.fdopen(fd, "wb") as copy:
                            shutil.copyfileobj(source, copy, 4 * 1024 * 1024)
                    if digest and bs.checksum_file(partial / name, algorithm) != digest:
                        raise SaltKvmError(f"copy of {point.id}/{name} has a wrong checksum")
                self.target.commit(partial, point)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise

    def prune(self, keep: int) -> list[str]:
        return prune(str(self.target.dest), self.target.domain, keep)["deleted"]

    def close(self) -> None:
        return None


class _SshCopier:
    """The same layout on another host, written over one SSH session (SFTP + sha256sum or b2sum)."""

    def __init__(self, where: SshTarget, domain: str, password, key_filename, trust):
        self.where = where
        self.domain = domain
        self.root = posixpath.join(where.path, domain)
        self.session = ssh.connect(
            where.host,
            where.user,
            password=password,
            key_filename=key_filename,
            port=where.port,
            timeout=60,
            trust=trust,
        )
        self.sftp = self.session.client.open_sftp()

    def _sh(self, command: str) -> str:
        return self.session.check(command)

    def present(self) -> set[str]:
        self._sh(f"mkdir -p {shlex.quote(self.root)}")
        found = set()
        for name in self.sftp.listdir(self.root):
            if bs.POINT_RE.fullmatch(name):
                with contextlib.suppress(OSError):
                    self.sftp.stat(posixpath.join(self.root, name, bs.MANIFEST))
                    found.add(name)
        return found

    def copy(self, store: bs.Store, point: bs.Point) -> None:
        partial = posixpath.join(self.root, f"{bs.PARTIAL}{point.id}")
        quoted = shlex.quote(partial)
        self._sh(f"rm -rf {quoted} && mkdir -m 700 {quoted}")
        try:
            for name, algorithm, digest in _files(point):
                remote = posixpath.join(partial, name)
                with _open_source(store, point, name) as source:
                    self.sftp.putfo(source, remote)
                self.sftp.chmod(remote, 0o600)
                out = self._sh(f"{SUM_COMMANDS[algorithm]} {shlex.quote(remote)}")
                if digest and out.split()[0] != digest:
                    raise SaltKvmError(f"copy of {point.id}/{name} on {self.where.host} differs")
            with self.sftp.open(posixpath.join(partial, bs.MANIFEST), "w") as handle:
                handle.write(json.dumps(point.to_dict(), indent=2, sort_keys=True))
            final = shlex.quote(posixpath.join(self.root, point.id))
            self._sh(f"sync && mv {quoted} {final} && sync")
        except BaseException:
            with contextlib.suppress(Exception):
                self._sh(f"rm -rf {quoted}")
            raise

    def prune(self, keep: int) -> list[str]:
        points = []
        for pid in sorted(self.present()):
            with self.sftp.open(posixpath.join(self.root, pid, bs.MANIFEST)) as handle:
                data = handle.read(bs.MANIFEST_MAX + 1)
            with contextlib.suppress(ValueError, SaltKvmError):  # not ours: never pruned
                points.append(bs.parse_manifest(json.loads(data), pid, self.domain))
        doomed = bs.prune_plan(points, keep)
        if not doomed:
            return []
        # Under the store's lock there, which a restore (a takeover reading a
        # chain), a backup run or a prune on that host holds: never pulled away
        # from under them. Newest first: a crash never orphans a parent.
        lock = shlex.quote(posixpath.join(self.root, bs.LOCK))
        folders = " ".join(shlex.quote(posixpath.join(self.root, p.id)) for p in reversed(doomed))
        code, out, err = self.session.run(
            f"test ! -L {lock} || exit 76; "
            f"flock -n -E {BUSY} {lock} sh -c 'for d; do rm -rf \"$d\"; done' sh {folders}"
        )
        if code == BUSY:
            holder = self.session.run(f"cat {lock}")[1].strip() or "unknown holder"
            raise ConflictError(
                f"prune of the copy of {self.domain} on {self.where.host}: another run holds "
                f"its backup lock (held by {holder}); nothing deleted, try again when it has "
                "finished"
            )
        if code != 0:
            raise SaltKvmError(
                f"prune of the copy of {self.domain} on {self.where.host} failed "
                f"(exit code {code}): {err or out or 'its lock file is a symbolic link'}"
            )
        return [p.id for p in doomed]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sftp.close()
        self.session.close()
