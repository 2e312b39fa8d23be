"""Start, stop and remove the domains salt-kvm manages."""

from __future__ import annotations

import logging
import time

import libvirt

from salt_kvm.errors import ConflictError, NotFoundError, SaltKvmError
from salt_kvm.virt import chains, firmware
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback

log = logging.getLogger(__name__)


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        raise NotFoundError(f"no domain named {name!r} on {conn.getURI()}") from exc


def managed_info(dom: libvirt.virDomain) -> dict | None:
    return Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).managed_info()


def remove(conn: libvirt.virConnect, name: str, also: list[str] | tuple[str, ...] = ()) -> dict:
    """Remove a salt-kvm domain and the volumes salt-kvm created for it.

    Never touches the base's volumes nor disks attached from elsewhere (those
    are not listed in the domain's salt-kvm metadata). Refused, before anything
    changes, while any of its volumes is needed by something else: another
    domain's disk, or the backing chain of any volume or disk (a quick clone of
    this guest); so are the volumes in ``also`` (deleted by the caller
    afterwards) when in such a chain; one another domain has attached is only
    kept. Returns what was removed.
    """
    dom = lookup(conn, name)
    info = managed_info(dom)
    if info is None:
        raise SaltKvmError(
            f"{name!r} was not created by salt-kvm (no salt-kvm metadata); refusing to remove it"
        )
    seed = [info["seed"]] if info.get("seed") else []
    paths = [*(info.get("volumes") or []), *seed]
    blocked = chains.dependents(conn).blocking([*paths, *also], domains=(name,))
    for path in also:  # a shared extra disk is kept (delete_volumes), not a refusal
        blocked[path] = [d for d in blocked.get(path, []) if d.domain is None or d.backing]
    blocked = {path: needs for path, needs in blocked.items() if needs}
    if blocked:
        raise ConflictError(
            f"destroy of {name!r}: refused, nothing was deleted: {chains.describe(blocked)} "
            "(destroy or flatten those first)"
        )
    undefine(dom)
    removed = []
    doomed, kept = chains.dependents(conn).deletable(paths)
    for path, needs in kept.items():  # only if something appeared meanwhile
        log.warning("volume %s of %s is needed by %s; kept", path, name, needs[0])
    for path in doomed:
        try:
            conn.storageVolLookupByPath(path).delete(0)
            removed.append(path)
        except libvirt.libvirtError as exc:
            log.warning("volume %s of %s was not removed: %s", path, name, exc)
    if info.get("nvram") and _remove_nvram(conn, name, info["nvram"]):
        removed.append(info["nvram"])
    return {"domain": name, "volumes": removed}


def _remove_nvram(conn: libvirt.virConnect, name: str, path: str) -> bool:
    """The UEFI variables file salt-kvm made for the guest, if libvirt's
    undefine left it (a driver that does not delete it, or a file kept while
    another domain used it and free since): through the delete gate."""
    try:
        return chains.delete_volume(conn, path, f"NVRAM of {name}")
    except (ConflictError, libvirt.libvirtError) as exc:
        log.warning("the NVRAM %s of %s is kept: %s", path, name, exc)
        return False


def shutdown(dom: libvirt.virDomain, timeout: float = 180, interval: float = 0.5) -> bool:
    """Ask the guest to power off (guest agent first, then the ACPI button) and
    wait until it has; ``False`` if it is still running after ``timeout``."""
    if not dom.isActive():
        return True
    flags = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT | libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
    try:
        dom.shutdownFlags(flags)
    except libvirt.libvirtError:
        dom.shutdown()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not dom.isActive():
            return True
        time.sleep(interval)
    return False


def define(
    conn: libvirt.virConnect, xml: Domain, rollback: Rollback, validate: bool = False
) -> libvirt.virDomain:
    """Define ``xml``; with ``validate``, libvirt checks it against its schema first."""
    flags = libvirt.VIR_DOMAIN_DEFINE_VALIDATE if validate else 0
    rollback.intend("domain", name=xml.name)
    try:
        dom = conn.defineXMLFlags(xml.to_xml(), flags)
    except libvirt.libvirtError as exc:
        raise SaltKvmError(f"libvirt refused the definition of {xml.name!r}: {exc}") from exc
    uuid = dom.UUIDString()
    rollback.add(
        f"domain {xml.name}", lambda: undefine(rollback.live(conn).lookupByUUIDString(uuid))
    )
    return dom


def undefine(dom: libvirt.virDomain) -> None:
    """Stop and undefine, taking libvirt's per-domain state (managed save,
    snapshot and checkpoint metadata, the emulated TPM's state) with it, as far
    as the driver can; the UEFI variables file too when it is the domain's own
    and nothing else uses it (``nvram_is_own``)."""
    own_nvram = nvram_is_own(dom)
    if dom.isActive():
        dom.destroy()
    nvram = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    if not own_nvram:
        nvram = libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
    base = (
        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | nvram
    )
    # libvirt >= 8.9 (9.0 of the stable tier too): remove the swtpm state explicitly.
    tpm = getattr(libvirt, "VIR_DOMAIN_UNDEFINE_TPM", 0)
    checkpoints = libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    for flags in (base | checkpoints | tpm, base | checkpoints, base):
        try:
            dom.undefineFlags(flags)
            return
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (
                libvirt.VIR_ERR_INVALID_ARG,
                libvirt.VIR_ERR_NO_SUPPORT,
            ):
                raise
    dom.undefine()


def nvram_is_own(dom: libvirt.virDomain) -> bool:
    """Whether the domain's UEFI variables file goes with it: the file salt-kvm
    made for it (its metadata names it) or the one libvirt made in its own
    folder, and no other domain uses it (salt_kvm.virt.chains)."""
    try:
        xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError:
        return True
    path = firmware.nvram_path(xml)
    if path is None:
        return True
    info = xml.managed_info() or {}
    name = dom.name()
    made = path in (info.get("nvram"), f"{firmware.LIBVIRT_NVRAM_DIR}/{name}_VARS.fd")
    if not made:
        log.info("the NVRAM %s of %s is not its own: kept", path, name)
        return False
    needs = chains.dependents(dom.connect()).blocking([path], domains=(name,))
    if needs:
        log.warning("the NVRAM %s of %s is kept: %s", path, name, chains.describe(needs))
        return False
    return True
