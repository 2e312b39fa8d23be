"""Facts about a hypervisor, and its storage pools."""

from __future__ import annotations

import os

import libvirt

from salt_kvm import __version__
from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt.accel import kvm_access
from salt_kvm.virt.connection import kvm_available, remote_host
from salt_kvm.virt.names import HOST_NAME_RE
from salt_kvm.virt.pools import Pool


def _version(number: int) -> str:
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def info(conn: libvirt.virConnect) -> dict:
    """What a user checks first on a hypervisor: versions, acceleration (and whether
    QEMU's user can open /dev/kvm), pools, networks; ``warnings`` says what to fix."""
    access = kvm_access(conn)
    facts = {
        "uri": conn.getURI(),
        "hostname": conn.getHostname(),
        "hypervisor": conn.getType(),
        "hypervisor_version": _version(conn.getVersion()),
        "libvirt_version": _version(conn.getLibVersion()),
        "kvm_available": kvm_available(conn),
        "kvm_access": {k: v for k, v in access.items() if k != "warning"},
        "pools": sorted(p.name() for p in conn.listAllStoragePools(0)),
        "networks": sorted(n.name() for n in conn.listAllNetworks(0)),
        "salt_kvm_version": __version__,
    }
    if "warning" in access:
        facts["warnings"] = [access["warning"]]
    return facts


def network_active(conn: libvirt.virConnect, name: str) -> bool:
    """Whether the host has libvirt network ``name`` and it runs."""
    try:
        return bool(conn.networkLookupByName(name).isActive())
    except libvirt.libvirtError:
        return False


def pool_state(conn: libvirt.virConnect, name: str) -> dict | None:
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        return None
    xml = Pool(pool.XMLDesc(0))
    return {
        "type": xml.type,
        "path": xml.target_path,
        "active": bool(pool.isActive()),
        "autostart": bool(pool.autostart()),
    }


def pool_xml(name: str, path: str) -> str:
    return Pool.new_dir(name, path).to_xml()


POOL_NAME_RULE = "letters, digits, '_', '.' or '-', starting with a letter or digit"


def check_pool_args(name: object, path: object) -> tuple[str, str]:
    """A pool's name and directory as the caller gave them: a plain name, an
    absolute path without ``.``/``..`` parts or whitespace (a trailing ``/``
    is dropped: libvirt stores the path without it)."""
    if not isinstance(name, str) or not HOST_NAME_RE.fullmatch(name):
        raise SpecError("name", f"{name!r} is not a pool name", POOL_NAME_RULE)
    accepted = "an absolute directory path without '.' or '..' parts, spaces or newlines"
    if not isinstance(path, str) or not os.path.isabs(path):
        raise SpecError("path", f"{path!r} is not an absolute path", accepted)
    if path != "/":
        path = path.rstrip("/")
    if any(c.isspace() or not c.isprintable() for c in path) or os.path.normpath(path) != path:
        raise SpecError("path", f"{path!r} is not a plain absolute path", accepted)
    return name, path


def _check_pool_dir(conn: libvirt.virConnect, path: str, adopt: bool) -> None:
    """On this host (the path is out of reach on a remote one): a path through
    a symlink (someone else's, leading anywhere) is refused naming where it
    leads; a directory that holds files only with ``adopt`` (every file becomes
    a volume that volume calls may delete)."""
    if remote_host(conn) is not None:
        return
    real = os.path.realpath(path)
    if real != path:
        raise SpecError(
            "path",
            f"{path!r} goes through a symlink to {real!r}",
            f"the real path ({real}) if that directory is meant",
        )
    if not adopt and os.path.isdir(path) and any(os.scandir(path)):
        raise SpecError(
            "path",
            f"{path!r} already holds files: a pool on it makes each a volume that volume "
            "calls may delete",
            "an empty or new directory, or adopt=True to define the pool on it anyway",
        )


def ensure_dir_pool(
    conn: libvirt.virConnect, name: object, path: object, adopt: bool = False
) -> dict:
    """Make ``name`` a defined, running, autostarted ``dir`` pool on ``path``.

    Returns what changed (``{}`` when nothing did). An existing pool of the
    same name on another path is an error: its volumes are not ours to move.
    A new pool on a directory that holds files needs ``adopt``.
    """
    name, path = check_pool_args(name, path)
    before = pool_state(conn, name)
    if before is not None and before["path"] != path:
        raise SaltKvmError(
            f"pool {name!r} already exists on {before['path']!r}, not {path!r}; "
            "salt-kvm will not redefine it"
        )
    if before is None:
        _check_pool_dir(conn, path, adopt)
    try:
        if before is None:
            pool = conn.storagePoolDefineXML(pool_xml(name, path), 0)
            pool.build(0)  # a dir pool: creates the directory if missing
        else:
            pool = conn.storagePoolLookupByName(name)
        if not pool.isActive():
            pool.create(0)
        if not pool.autostart():
            pool.setAutostart(1)
    except libvirt.libvirtError as exc:
        raise SaltKvmError(f"pool {name!r} on {path!r}: {exc}") from exc
    after = pool_state(conn, name)
    return {} if after == before else {"old": before, "new": after}
