"""What a create is about to make, written down before it is made.

A rollback undoes a failure and an interrupt, but nothing runs after SIGKILL
(or a power cut): the half-made guest's domain, volumes, seed, DHCP
reservations and forwards would stay, and a new create of the name would
trip over them. So every creation step first appends a line to the name's
journal (a root-only file in the salt-cloud machine's cache directory); the
journal goes when the create succeeds or its rollback has undone everything.
A journal whose process is gone is a killed run's: the next create of that
name, or ``salt-cloud -f cleanup <provider>``, undoes what it lists.

Only what the journal names is touched, and only what salt-kvm can tell is
its own: a domain only if it carries salt-kvm's metadata tag, a volume only
by the pool and name the killed run was about to create (names it checked
were free first).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt

from salt_kvm.errors import ConflictError
from salt_kvm.virt import chains, locks, pools

log = logging.getLogger(__name__)
SUBDIR = "salt-kvm/creating"
ROLE = "create journal directory"


def _folders(cachedir: str | Path) -> tuple[Path, Path]:
    top = Path(cachedir) / SUBDIR
    return top.parent, top


def _made(cachedir: str | Path) -> Path:
    """The journal directory, made root-only if missing; every level below the
    cachedir checked like the lock directory (a real directory of ours, 0700):
    a link or another user's folder planted there is refused, not written."""
    for folder in _folders(cachedir):
        _tighten(folder)
        locks.secure_dir(folder, ROLE, "write a create journal")
    return _folders(cachedir)[1]


def _tighten(folder: Path) -> None:
    """Earlier versions made ``<cachedir>/salt-kvm`` with the umask's 0755: a
    folder of ours that nobody else can write to is closed to 0700 (one
    others could write to, or another user's, is still refused)."""
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return
    mode = info.st_mode & 0o777
    if info.st_uid == os.geteuid() and os.path.isdir(folder) and not os.path.islink(folder):
        if mode & 0o077 and not mode & 0o022:
            os.chmod(folder, 0o700)


def _existing(cachedir: str | Path) -> Path | None:
    """The journal directory if there is one, checked the same way before any
    journal in it is read (a planted journal would name guests to remove)."""
    for folder in _folders(cachedir):
        if not os.path.lexists(folder):
            return None
        _tighten(folder)
        locks.check_dir(folder, ROLE, "read create journals")
    return _folders(cachedir)[1]


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): a pid reused by
    another process after a kill does not pass for the killed run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner() -> dict:
    return {"pid": os.getpid(), "start": _start_time(os.getpid())}


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    return isinstance(pid, int) and _start_time(pid) == owner.get("start") is not None


class Journal:
    """The intent journal of one create of ``name``; see the module docstring."""

    def __init__(self, directory: str | Path, name: str) -> None:
        self.cachedir = Path(directory)
        self.dir = Path(directory) / SUBDIR
        self.path = self.dir / f"{name}.jsonl"
        self.name = name
        self.pending: list[dict] = []  # a killed run's records, not undone yet
        self.ours: list[dict] = []  # this run's

    @classmethod
    def in_cache(cls, opts: dict, name: str) -> Journal:
        return cls(opts.get("cachedir") or "/var/cache/salt/cloud", name)

    # ---- reading -------------------------------------------------------------

    def read(self) -> tuple[dict, list[dict]]:
        """(owner, records) of the journal on disk; a torn last line is skipped."""
        owner: dict = {}
        records: list[dict] = []
        if _existing(self.cachedir) is None:
            return owner, records
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return owner, records
        with os.fdopen(fd) as handle:
            lines = handle.read().splitlines()
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "owner" in entry:
                owner = entry["owner"]
            elif isinstance(entry, dict) and "kind" in entry:
                records.append(entry)
        return owner, records

    def stale(self) -> list[dict] | None:
        """A killed run's records; None when there is no journal. A journal of
        a live process is another create of this name, running now: refused."""
        if _existing(self.cachedir) is None or not os.path.lexists(self.path):
            return None
        owner, records = self.read()
        if owner and _alive(owner):
            raise ConflictError(
                f"another salt-cloud (pid {owner['pid']}) is creating {self.name} right now"
            )
        return records

    # ---- writing -------------------------------------------------------------

    def begin(self, keep: list[dict] | None = None) -> None:
        """Own the journal; ``keep``: a killed run's records not yet undone
        (kept in it until :meth:`recover` has undone them)."""
        self.pending = list(keep or [])
        self._write()

    def _write(self) -> None:
        _made(self.cachedir)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps({"owner": _owner()}) + "\n")
            for record in [*self.pending, *self.ours]:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def intend(self, kind: str, **fields: Any) -> None:
        """Append (synced) what is about to be made, before it is made."""
        record = {"kind": kind, **fields}
        self.ours.append(record)
        line = json.dumps(record, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def recover(self, conn: libvirt.virConnect, remove_key=None) -> list[str]:
        """Undo the killed run's records this journal took over."""
        done = undo(conn, self.pending, remove_key)
        self.pending = []
        self._write()
        return done

    def clear(self) -> None:
        """This run has nothing left to undo (success, or a complete rollback)."""
        self.ours = []
        if self.pending:
            self._write()  # still the killed run's to undo
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def journals(opts: dict) -> Iterator[Journal]:
    cachedir = opts.get("cachedir") or "/var/cache/salt/cloud"
    directory = _existing(cachedir)
    if directory is None:
        return
    for path in sorted(directory.glob("*.jsonl")):
        yield Journal(cachedir, path.name[: -len(".jsonl")])


def killed(opts: dict) -> set[str]:
    """Names whose last create was killed half-way (its domain is a leftover)."""
    names = set()
    for journal in journals(opts):
        try:
            records = journal.stale()
        except ConflictError:
            continue  # being created right now
        if any(r.get("kind") == "domain" for r in records or []):
            names.add(journal.name)
    return names


# ---- undoing a killed run ------------------------------------------------------


def undo(conn: libvirt.virConnect, records: list[dict], remove_key=None) -> list[str]:
    """Undo ``records``, newest first, as far as they exist; returns what was
    removed. ``remove_key(id)`` removes a minion key (None: keys are kept)."""
    # Imported here: these modules import the rollback, which imports nothing of ours.
    from salt_kvm.cloud import dhcp
    from salt_kvm.nat import forwards
    from salt_kvm.virt import lifecycle

    done = []
    for record in reversed(records):
        kind = record.get("kind")
        try:
            if kind == "domain":
                dom = _domain(conn, record["name"])
                if dom is not None and lifecycle.managed_info(dom) is not None:
                    lifecycle.remove(conn, record["name"])
                    done.append(f"domain {record['name']}")
            elif kind == "volume":
                path = _volume_path(conn, record["pool"], record["name"])
                if path is not None:
                    chains.delete_volume(conn, path, "rollback")
                    done.append(f"volume {path}")
            elif kind == "reservation":
                dhcp.release(conn, record["network"], record["mac"], record["ip"])
                done.append(f"reservation {record['ip']} on {record['network']}")
            elif kind == "nat":
                if forwards.forget(record["name"]):
                    done.append(f"NAT forwards of {record['name']}")
            elif kind == "key" and remove_key is not None:
                remove_key(record["id"])
                done.append(f"minion key {record['id']}")
        except Exception as exc:  # noqa: BLE001 - undo the rest; report this one
            log.error("could not undo %s of a killed create: %s", record, exc)
            raise ConflictError(
                f"a killed create of this name left {kind} {record} that could not be removed: "
                f"{exc}"
            ) from exc
    return done


def _domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def _volume_path(conn: libvirt.virConnect, pool: str, name: str) -> str | None:
    try:
        storage = conn.storagePoolLookupByName(pool)
        pools.refresh(storage)
        return storage.storageVolLookupByName(name).path()
    except libvirt.libvirtError:
        return None
