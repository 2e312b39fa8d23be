"""The few ``qemu-img`` operations backups, restores and snapshots need."""

from __future__ import annotations

import json
import shutil
import subprocess

from .errors import SaltKvmError

QEMU_IMG = "qemu-img"


def available() -> bool:
    return shutil.which(QEMU_IMG) is not None


def run(*args: str, timeout: float | None = None) -> str:
    cmd = [QEMU_IMG, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SaltKvmError(f"{' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        raise SaltKvmError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def info(path: str, chain: bool = False) -> dict | list:
    """``qemu-img info`` as JSON; ``-U`` reads images a running guest holds."""
    args = ["info", "-U", "--output=json"] + (["--backing-chain"] if chain else []) + [path]
    return json.loads(run(*args))


def check(path: str) -> dict:
    """``qemu-img check``: raises when the image is corrupt or leaks clusters."""
    proc = subprocess.run(
        [QEMU_IMG, "check", "--output=json", path], capture_output=True, text=True, check=False
    )
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result = {}
    if proc.returncode != 0:
        raise SaltKvmError(f"qemu-img check {path}: {(proc.stderr or proc.stdout).strip()}")
    return result


def rebase_unsafe(path: str, backing: str | None, backing_format: str = "qcow2") -> None:
    """Point ``path`` at ``backing`` (a path relative to ``path``'s folder) without copying."""
    if backing is None:
        run("rebase", "-u", "-b", "", path)
    else:
        run("rebase", "-u", "-F", backing_format, "-b", backing, path)


def convert(source: str, dest: str, fmt: str = "qcow2") -> None:
    """Copy ``source`` with its whole backing chain into one standalone image."""
    options = ["-o", "compat=1.1"] if fmt == "qcow2" else []
    run("convert", "-q", "-O", fmt, *options, source, dest)


def create_overlay(path: str, backing: str, backing_format: str) -> None:
    run(
        "create", "-q", "-f", "qcow2", "-o", "compat=1.1", "-F", backing_format, "-b", backing, path
    )
