"""A profile's shares on its hypervisor: checked before anything is made, then
added to the new domain's definition.

On a local hypervisor every rule of ``cloud.shares`` is checked on the
directories themselves. libvirt cannot look at a remote hypervisor's
directories (nor its virtiofsd): there the sources are checked as written
(absolute, no ``..``, below ``share_allowed_dirs``) and what was not checked
is returned, for the create's events and log.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import libvirt

from salt_kvm.cloud.shares import ShareSpec, check_source
from salt_kvm.virt import connection, virtiofs
from salt_kvm.virt.domain import Domain

log = logging.getLogger(__name__)
# Where the guest mounts each share, in the salt-kvm metadata tag ("tag=/path").
MOUNTS_FIELD = "share_mounts"


@dataclass
class Checked:
    shares: list[virtiofs.Share] = field(default_factory=list)
    unchecked: str | None = None  # what a remote hypervisor kept us from checking


def check(
    conn: libvirt.virConnect, shares: tuple[ShareSpec, ...], allowed_dirs: tuple[str, ...]
) -> Checked:
    """The shares as the domain gets them (real paths on a local host), or a
    SpecError naming the share's key."""
    if not shares:
        return Checked()
    host = connection.remote_host(conn)
    readonly_at = next((i for i, s in enumerate(shares) if s.readonly), None)
    daemon_note = virtiofs.check_host(conn, readonly_at, host is None)
    if host is None:
        return Checked(
            [
                virtiofs.Share(check_source(s, allowed_dirs, i), s.tag, s.readonly)
                for i, s in enumerate(shares)
            ]
        )
    note = (
        f"on {host}: the sources were checked as written, not on its filesystem (that they "
        "exist, are directories, that no link leads out of share_allowed_dirs, who owns "
        f"them); {daemon_note}"
    )
    log.warning("shares %s", note)
    return Checked(
        [virtiofs.Share(os.path.normpath(s.source), s.tag, s.readonly) for s in shares], note
    )


def mounts_info(shares: tuple[ShareSpec, ...]) -> dict[str, list[str]]:
    mounts = [f"{s.tag}={s.mount}" for s in shares if s.mount]
    return {MOUNTS_FIELD: mounts} if mounts else {}


def describe(xml: Domain) -> list[dict]:
    """The domain's virtiofs shares as show_instance reports them."""
    info = xml.managed_info() or {}
    recorded = info.get(MOUNTS_FIELD) or []
    mounts = dict(item.split("=", 1) for item in recorded if "=" in item)
    return [
        {
            "source": fs.source_dir,
            "tag": fs.tag,
            "readonly": fs.readonly,
            "mount": mounts.get(fs.tag or ""),
        }
        for fs in virtiofs.filesystems(xml)
    ]
