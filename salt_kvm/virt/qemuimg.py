"""The few ``qemu-img`` operations backups, restores and snapshots need."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from typing import Literal, overload

from salt_kvm.errors import SaltKvmError

QEMU_IMG = "qemu-img"
PERCENT_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
PR_SET_PDEATHSIG = 1
# Every file qemu-img makes (backup images, restores, overlays) is 0600 from its
# first byte: a guest's disk in a traversable folder with a predictable name is
# not readable by a local user while it is written. Callers chmod afterwards
# where another mode is wanted (an in-place restore keeps the old file's).
UMASK = 0o077


def available() -> bool:
    return shutil.which(QEMU_IMG) is not None


def run(*args: str, timeout: float | None = None) -> str:
    cmd = [QEMU_IMG, *args]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, umask=UMASK
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SaltKvmError(f"{' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        raise SaltKvmError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


@overload
def info(path: str, chain: Literal[False] = False, fmt: str | None = None) -> dict: ...
@overload
def info(path: str, chain: Literal[True], fmt: str | None = None) -> list[dict]: ...


def info(path: str, chain: bool = False, fmt: str | None = None) -> dict | list[dict]:
    """``qemu-img info`` as JSON; ``-U`` reads images a running guest holds.

    Pass ``fmt`` whenever it is known: a probed format is the image's word (a
    guest writes a qcow2 header into its raw disk). Without ``chain`` no
    backing file is opened, only named."""
    args = ["info", "-U", "--output=json"] + (["--backing-chain"] if chain else [])
    return json.loads(run(*args, *(["-f", fmt] if fmt else []), path))


def alone(path: str, fmt: str) -> str:
    """An image name for qemu-img that opens ``path`` as ``fmt`` without its
    backing file (whatever file its header names)."""
    return "json:" + json.dumps(
        {"driver": fmt, "backing": None, "file": {"driver": "file", "filename": path}}
    )


def check(path: str, fmt: str | None = None, backing: bool = True) -> dict:
    """``qemu-img check``: raises when the image is corrupt or leaks clusters;
    ``backing=False`` (needs ``fmt``) opens no backing file."""
    if fmt and not backing:
        args = [alone(path, fmt)]
    else:
        args = [*(["-f", fmt] if fmt else []), path]
    proc = subprocess.run(
        [QEMU_IMG, "check", "--output=json", *args], capture_output=True, text=True, check=False
    )
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result = {}
    if proc.returncode != 0:
        raise SaltKvmError(f"qemu-img check {path}: {(proc.stderr or proc.stdout).strip()}")
    return result


def rebase_unsafe(path: str, backing: str | None, backing_format: str = "qcow2") -> None:
    """Point the qcow2 ``path`` at ``backing`` (a path relative to ``path``'s folder)
    without copying."""
    if backing is None:
        run("rebase", "-u", "-f", "qcow2", "-b", "", path)
    else:
        run("rebase", "-u", "-f", "qcow2", "-F", backing_format, "-b", backing, path)


def convert(
    source: str, dest: str, fmt: str = "qcow2", source_format: str = "qcow2", into: bool = False
) -> None:
    """Copy ``source`` (of ``source_format``) with its whole backing chain into one
    standalone image of ``fmt``; ``into``: write into the existing ``dest`` (a
    block device), never creating or replacing it."""
    options = ["-o", "compat=1.1"] if fmt == "qcow2" and not into else []
    target = ["-n"] if into else []
    run("convert", "-q", "-f", source_format, "-O", fmt, *options, *target, source, dest)


def create_overlay(path: str, backing: str, backing_format: str, size: int | None = None) -> None:
    """A qcow2 on ``backing``; with ``size``, the backing file is not opened (it may be
    in use by a running guest)."""
    args = ["create", "-q", "-f", "qcow2", "-o", "compat=1.1", "-F", backing_format]
    run(*args, "-b", backing, path, *([str(size)] if size is not None else []))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """A copy must not outlive a killed backup run (it would read a disk being merged)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_progress(*args: str, progress: Callable[[float], None] | None = None) -> None:
    """``qemu-img`` with ``-p`` (its ``(12.50/100%)`` lines go to ``progress``)."""
    cmd = [QEMU_IMG, *args]
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                preexec_fn=_die_with_parent,
                umask=UMASK,
            )
        except OSError as exc:
            raise SaltKvmError(f"{' '.join(cmd)}: {exc}") from exc
        try:
            pending = b""
            while chunk := proc.stdout.read1(4096):  # type: ignore[union-attr]  # stdout=PIPE
                pending += chunk
                *lines, pending = re.split(rb"[\r\n]", pending)
                for line in lines:
                    found = PERCENT_RE.search(line)
                    if found and progress is not None:
                        progress(float(found.group(1)))
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if code != 0:
            err.seek(0)
            message = err.read().decode(errors="replace").strip() or f"exit status {code}"
            raise SaltKvmError(f"{' '.join(cmd)} failed: {message}")


def copy_flat(
    source: str,
    source_format: str,
    dest: str,
    share: bool,
    progress: Callable[[float], None] | None = None,
) -> None:
    """``source`` with its whole backing chain into one standalone qcow2 v3 image;
    ``share`` (``-U``) reads an image a running guest holds."""
    shared = ["-U"] if share else []
    args = ["convert", "-p", *shared, "-f", source_format, "-O", "qcow2", "-o", "compat=1.1"]
    run_progress(*args, source, dest, progress=progress)


@functools.cache
def compression_type() -> str:
    """qcow2's best compression this qemu-img writes: ``zstd`` (QEMU 5.1 or later,
    built with it: faster and smaller than zlib, readable by QEMU 5.1 or later
    only), else ``zlib`` (the default every QEMU reads). Probed once, on an
    empty image."""
    with tempfile.TemporaryDirectory(prefix="salt-kvm-probe-") as folder:
        probe = os.path.join(folder, "probe.qcow2")
        try:
            run("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", probe, "64k")
        except SaltKvmError:
            return "zlib"
    return "zstd"


def compress(
    source: str,
    dest: str,
    backing: str | None,
    backing_format: str = "qcow2",
    progress: Callable[[float], None] | None = None,
) -> None:
    """Write the qcow2 ``source`` into the new qcow2 ``dest`` with compressed
    clusters (``compression_type()``). With ``backing`` (``source``'s own backing
    file, named as in its header), only what ``source`` itself holds is written
    and ``dest`` names the same backing file; without, ``source`` stands alone."""
    kind = compression_type()  # zlib: the default (a QEMU before 5.1 knows no option)
    options = "compat=1.1" + (f",compression_type={kind}" if kind != "zlib" else "")
    chain = ["-B", backing, "-F", backing_format] if backing else []
    args = ["convert", "-p", "-c", "-f", "qcow2", "-O", "qcow2", "-o", options, *chain]
    run_progress(*args, source, dest, progress=progress)


def rebase_safe(
    path: str,
    backing: str,
    backing_format: str,
    share: bool,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Give ``path`` the new backing file ``backing``, writing into ``path`` every
    cluster where the old and the new backing chains differ (so the content of
    ``path`` stays the same)."""
    shared = ["-U"] if share else []
    args = ["rebase", "-p", *shared, "-f", "qcow2", "-F", backing_format, "-b", backing, path]
    run_progress(*args, progress=progress)


def commit(path: str) -> None:
    """Write ``path``'s data into its backing file (one level, never further down)."""
    run("commit", "-q", "-f", "qcow2", path)
