"""The one lock helper of salt-kvm.

Locks are files in a directory this process's user owns with mode 0700
(``/run/lock/salt-kvm`` by default, never a world-writable place itself), opened
with ``O_NOFOLLOW`` so that a link a local user planted is refused rather than
followed (and its target truncated). A lock waits a bounded time; when it gives
up, the error names the holder (pid and what it is doing), which the holder
writes into the file once it has the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from salt_kvm.errors import ConflictError, SaltKvmError

#: Where every host-wide lock of salt-kvm lives (``SALT_KVM_LOCK_DIR`` overrides it).
LOCK_DIR = "/run/lock/salt-kvm"
HOLDER_MAX = 300


def lock_dir() -> Path:
    return Path(os.environ.get("SALT_KVM_LOCK_DIR") or LOCK_DIR)


def secure_dir(
    path: str | os.PathLike | None = None, role: str = "lock directory", use: str = "take a lock"
) -> Path:
    """Create ``path`` (0700) if missing, then check it (:func:`check_dir`)."""
    path = Path(path) if path is not None else lock_dir()
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path.parent, 0o755, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    return check_dir(path, role, use)


def check_dir(
    path: str | os.PathLike, role: str = "lock directory", use: str = "take a lock"
) -> Path:
    """``path`` must be a real directory (not a link) owned by us and closed
    to everybody else; anything else is refused, naming ``role``. The one
    check for every root-only folder of salt-kvm (locks, create journals)."""
    path = Path(path)
    info = os.lstat(path)
    problem = None
    if not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory (a symlink or a file is refused)"
    elif info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by uid {os.geteuid()} (this process)"
    elif stat.S_IMODE(info.st_mode) & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}; it must be 0700"
    if problem:
        raise SaltKvmError(
            f"{role} {path} {problem}: refusing to {use} there "
            "(remove it, salt-kvm recreates it owned by root with mode 0700)"
        )
    return path


def _open(path: Path, ours: bool) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise SaltKvmError(f"lock file {path} is a symlink: refused (remove it)") from None
        raise
    info = os.fstat(fd)
    # ours: in our own checked folder; elsewhere (a NAS squashing root to nobody)
    # the owner is not ours to check, a link still is
    if (
        not stat.S_ISREG(info.st_mode)
        or info.st_nlink != 1
        or (ours and info.st_uid != os.geteuid())
    ):
        os.close(fd)
        raise SaltKvmError(
            f"lock file {path} is not a regular file of ours with a single link: refused "
            "(remove it)"
        )
    return fd


def holder_of(fd: int) -> str:
    return os.pread(fd, HOLDER_MAX, 0).decode(errors="replace").strip() or "unknown holder"


@contextlib.contextmanager
def held(
    name: str,
    what: str,
    timeout: float = 0,
    directory: str | os.PathLike | None = None,
    busy: str | None = None,
    secure: bool = True,
    interval: float = 0.1,
) -> Iterator[Path]:
    """Hold the exclusive lock ``name`` while doing ``what``.

    ``timeout`` seconds at most are waited (0: refuse at once when taken); the
    ConflictError then says ``busy`` and names the holder. ``directory`` is the
    lock directory (checked unless ``secure`` is false: a backup store on a NAS
    has its own owner; its lock is still opened without following links).
    The lock goes with the process: closing the file (or dying) releases it.
    """
    if not name or "/" in name or name in (".", ".."):
        raise SaltKvmError(f"lock name {name!r} is not a plain file name")
    folder = secure_dir(directory) if secure else Path(directory or lock_dir())
    path = folder / name
    fd = _open(path, secure)
    try:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
                    raise ConflictError(
                        f"{busy or f'{path} is locked'} (held by {holder_of(fd)}){waited}; "
                        "try again when it has finished"
                    ) from None
                time.sleep(interval)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} pid {os.getpid()}".encode()[:HOLDER_MAX], 0)
        yield path
    finally:
        os.close(fd)
