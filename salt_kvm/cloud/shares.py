"""The profile's ``shares:`` (host directories shared with the guest as
virtiofs) and the provider's ``share_allowed_dirs``.

Parsing here needs no hypervisor; the path rule (:func:`check_source`) reads
the filesystem where the directories are and is run by ``cloud.sharehost``
on a local hypervisor only. The rule for a source directory:

* its real path (every symbolic link resolved) is one of ``share_allowed_dirs``
  (their real paths) or below one: a link planted inside an allowed directory
  that points out of it is refused; the real path is what the domain gets, so
  a link changed later changes nothing;
* a symbolic link on the way there was made by root (or the user salt-cloud
  runs as), never by another user;
* every directory of the real path, ``/`` down to the source, belongs to root
  (or that user), and every one above the source is writable by nobody else
  (or is sticky, like ``/tmp``): nobody else can swap the shared directory
  for a link to ``/`` before the next boot, when virtiofsd (as root) opens it
  again by name.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from salt_kvm.disks.spec import parse_allowed_dirs, within
from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import boolean, check_keys

KEY = "shares"
ALLOWED_KEY = "share_allowed_dirs"
SHARE_KEYS = ("source", "tag", "readonly", "mount")
ACCEPTED = "a list of {source: /host/dir, tag: name, readonly: true|false, mount: /guest/path}"
# virtio-fs carries the tag in a 36-byte field of the device's config space.
TAG_MAX = 36
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
TAG_ACCEPTED = f"1 to {TAG_MAX} letters, digits, '_', '.', '-', starting with a letter or digit"
# A guest path that goes into /etc/fstab unquoted: no blanks, nothing a shell
# or fstab would read differently.
MOUNT_RE = re.compile(r"(/[A-Za-z0-9_.@+-]+)+")
MOUNT_ACCEPTED = "an absolute guest path of letters, digits and _ . @ + - (e.g. /srv/data)"
# Mounting over these breaks the guest's boot.
GUEST_SYSTEM_DIRS = frozenset(
    ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr")
    + ("/var", "/tmp", "/root", "/home")
)
FSTAB_OPTIONS = "defaults,nofail"


@dataclass(frozen=True)
class ShareSpec:
    source: str  # as the profile wrote it, normalised; the real path is found on the host
    tag: str
    readonly: bool = False
    mount: str | None = None


def _source(value: Any, key: str) -> str:
    accepted = "an absolute host directory below one of share_allowed_dirs"
    if not isinstance(value, str) or not value.startswith("/"):
        raise SpecError(key, f"{value!r} is not an absolute path", accepted)
    if "\x00" in value or "\n" in value:
        raise SpecError(key, "holds a NUL or newline character", accepted)
    if ".." in value.split("/"):
        raise SpecError(key, f"{value!r} has a '..' component: write the real path", accepted)
    return os.path.normpath(value)


def _tag(value: Any, key: str) -> str:
    if not isinstance(value, str) or not TAG_RE.fullmatch(value) or len(value) > TAG_MAX:
        raise SpecError(key, f"{value!r} is not a virtiofs tag", TAG_ACCEPTED)
    return value


def _mount(value: Any, key: str) -> str | None:
    if value in (None, ""):
        return None
    given = value
    if isinstance(value, str) and len(value) > 1:
        value = value.rstrip("/")
    if not isinstance(value, str) or not MOUNT_RE.fullmatch(value):
        raise SpecError(key, f"{given!r} is not a guest path salt-kvm mounts", MOUNT_ACCEPTED)
    if ".." in value.split("/") or "." in value.split("/"):
        raise SpecError(key, f"{value!r} has a '.' or '..' component", MOUNT_ACCEPTED)
    if value in GUEST_SYSTEM_DIRS:
        raise SpecError(
            key,
            f"{value} is a system directory of the guest: mounting over it breaks the boot",
            MOUNT_ACCEPTED,
        )
    return value


def _one(item: Any, index: int) -> ShareSpec:
    where = f"{KEY}[{index}]"
    if not isinstance(item, dict):
        raise SpecError(where, f"a {type(item).__name__} is not a share", ACCEPTED)
    check_keys(item, SHARE_KEYS, where)
    for needed in ("source", "tag"):
        if item.get(needed) in (None, ""):
            raise SpecError(f"{where}.{needed}", "is required", ACCEPTED)
    return ShareSpec(
        source=_source(item["source"], f"{where}.source"),
        tag=_tag(item["tag"], f"{where}.tag"),
        readonly=boolean({f"{where}.readonly": item.get("readonly")}, f"{where}.readonly", False),
        mount=_mount(item.get("mount"), f"{where}.mount"),
    )


def parse(value: Any, allowed: Any) -> tuple[tuple[ShareSpec, ...], tuple[str, ...]]:
    """The profile's ``shares`` and the provider's ``share_allowed_dirs``.
    Every source must lie below an allowed directory as written; the real
    paths are checked on the hypervisor (:func:`check_source`)."""
    allowed_dirs = parse_allowed_dirs(allowed, ALLOWED_KEY)
    if value in (None, "", []):
        return (), allowed_dirs
    if not isinstance(value, list | tuple):
        raise SpecError(KEY, f"a {type(value).__name__} is not a list of shares", ACCEPTED)
    shares = tuple(_one(item, i) for i, item in enumerate(value))
    for kind in ("tag", "mount"):
        seen: dict[str, int] = {}
        for index, share in enumerate(shares):
            name = getattr(share, kind)
            if name is None:
                continue
            if name in seen:
                raise SpecError(
                    f"{KEY}[{index}].{kind}",
                    f"{name!r} is also shares[{seen[name]}].{kind}",
                    f"a distinct {kind} per share",
                )
            seen[name] = index
    for index, share in enumerate(shares):
        if not allowed_dirs:
            raise SpecError(
                f"{KEY}[{index}].source",
                "no directory may be shared: the provider lists none in share_allowed_dirs",
                "share_allowed_dirs: [/srv/shares] in the provider configuration "
                "(cloud.providers.d), or leave shares out",
            )
        if not within(share.source, allowed_dirs):
            raise SpecError(
                f"{KEY}[{index}].source",
                f"{share.source} is outside share_allowed_dirs",
                f"a directory below {', '.join(allowed_dirs)}",
            )
    return shares, allowed_dirs


# ---- the rule on the hypervisor's filesystem ----------------------------------


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _walk(path: str) -> list[str]:
    """``/``, ``/a``, ``/a/b``... down to ``path``."""
    parts = [p for p in path.split("/") if p]
    return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def check_source(share: ShareSpec, allowed_dirs: tuple[str, ...], index: int) -> str:
    """The real path of ``share``'s source, after the rule in the module
    docstring; a SpecError naming ``shares[index].source`` otherwise."""
    key = f"{KEY}[{index}].source"
    accepted = f"an existing directory below {', '.join(allowed_dirs)}, root's, not a link's"
    for prefix in _walk(share.source):
        try:
            info = os.lstat(prefix)
        except FileNotFoundError:
            raise SpecError(key, f"{share.source} does not exist", accepted) from None
        except OSError as exc:
            raise SpecError(key, f"{prefix}: {exc.strerror}", accepted) from None
        if stat.S_ISLNK(info.st_mode) and not _trusted(info.st_uid):
            raise SpecError(key, f"{prefix} is a symbolic link made by uid {info.st_uid}", accepted)
    real = os.path.realpath(share.source)
    allowed_real = [os.path.realpath(d) for d in allowed_dirs]
    if not within(real, allowed_real):
        raise SpecError(
            key, f"{share.source} (a link to {real}) is outside share_allowed_dirs", accepted
        )
    if not os.path.isdir(real):
        raise SpecError(key, f"{share.source} is not a directory", accepted)
    for prefix in _walk(real):
        info = os.lstat(prefix)
        if not _trusted(info.st_uid):
            raise SpecError(
                key,
                f"{prefix} belongs to uid {info.st_uid}: its owner could swap the shared "
                "directory for a link to any host directory",
                accepted,
            )
        open_to_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if prefix != real and open_to_others and not info.st_mode & stat.S_ISVTX:
            raise SpecError(
                key,
                f"{prefix} is writable by others: they could swap {real} for a link to any "
                "host directory",
                accepted,
            )
    return real


# ---- mounting in the guest ----------------------------------------------------


def cloud_config(shares: tuple[ShareSpec, ...]) -> dict:
    """cloud-init config that mounts each share with a ``mount`` at first boot
    and keeps it across reboots: an /etc/fstab line (``nofail``: a guest whose
    share is gone still boots) written once per instance, then a mount."""
    mounted = [s for s in shares if s.mount]
    if not mounted:
        return {}
    lines = []
    runcmd: list = []
    for share in mounted:
        options = FSTAB_OPTIONS + (",ro" if share.readonly else "")
        lines.append(f"{share.tag} {share.mount} virtiofs {options} 0 0\n")
        runcmd += [["mkdir", "-p", share.mount], ["mount", share.mount]]
    return {
        "write_files": [{"path": "/etc/fstab", "append": True, "content": "".join(lines)}],
        "runcmd": runcmd,
    }
