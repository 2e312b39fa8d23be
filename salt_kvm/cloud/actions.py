"""What the driver's actions and functions do on the hypervisor, after
salt-cloud's checks: destroy a guest salt-kvm created, start/stop/reboot it,
describe it, and clear what killed creates left."""

from __future__ import annotations

import logging
from collections.abc import Callable

import libvirt

from salt_kvm.cloud import dhcp, intent, inventory, machine, provision
from salt_kvm.disks import ops as diskops
from salt_kvm.errors import SaltKvmError
from salt_kvm.nat import forwards
from salt_kvm.virt import connection, lifecycle
from salt_kvm.virt.domain import Domain

log = logging.getLogger(__name__)


def created(conn: libvirt.virConnect, guest: provision.Guest, deployed: dict | None) -> dict:
    """What ``salt-cloud -p`` shows of a new guest."""
    result: dict[str, object] = {
        "name": guest.name,
        "ip_address": guest.addresses[0],
        "addresses": guest.addresses,
    }
    if deployed is not None:
        result["deploy"] = deployed
    if guest.virt_type_note:
        result["virt_type_note"] = guest.virt_type_note
    result.update(inventory.describe(conn, guest.domain))
    result["machine"] = machine.shown(Domain(guest.domain.XMLDesc(0)))
    return result


def destroy(conn: libvirt.virConnect, name: str, delete_disks: bool) -> dict:
    """Remove the domain, the volumes it created (never the base's), its DHCP
    reservations and NAT forwards; external disks go only with ``delete_disks``
    (never those attached from a path)."""
    dom = lifecycle.lookup(conn, name)
    info = lifecycle.managed_info(dom) or {}
    doomed, kept = diskops.split_for_destroy(dom, delete_disks)
    removed = lifecycle.remove(conn, name, also=doomed)
    removed["reservations"] = provision.release_reservations(conn, info)
    removed.update(disks=diskops.delete_volumes(conn, doomed), kept_disks=kept)
    pin = forwards.pin_of(name)
    removed["nat"] = forwards.forget(name)
    if pin is not None and _release_pin(*pin):
        removed["reservations"].append("|".join(pin[1:]))
    if isinstance(info.get("minion_id"), str):
        removed["minion_id"] = info["minion_id"]
    return removed


def _release_pin(uri: str, network: str, mac: str, ip: str) -> bool:
    """The reservation a migration made on the host that keeps the guest's
    NAT forwards (the guest may be on another host now)."""
    try:
        with connection.connected(uri) as here:
            dhcp.release(here, network, mac, ip)
        return True
    except (SaltKvmError, libvirt.libvirtError) as exc:
        log.warning("reservation %s on %s was not released: %s", ip, uri, exc)
        return False


def on_managed(
    conn: libvirt.virConnect, name: str, fn: Callable[[libvirt.virDomain], object]
) -> dict:
    """Run ``fn`` on guest ``name`` (refused unless salt-kvm created it);
    returns its state after."""
    dom = lifecycle.lookup(conn, name)
    if lifecycle.managed_info(dom) is None:
        raise SaltKvmError(f"{name!r} was not created by salt-kvm")
    fn(dom)
    return {name: inventory.state_of(dom)}


def stopper(name: str, timeout: float) -> Callable[[libvirt.virDomain], None]:
    """A clean shutdown (guest agent, else ACPI) that waits until the guest is off."""

    def stop_domain(dom: libvirt.virDomain) -> None:
        if not lifecycle.shutdown(dom, timeout):
            raise SaltKvmError(f"{name} is still running {timeout:g}s after the shutdown request")

    return stop_domain


def describe(conn: libvirt.virConnect, name: str) -> dict:
    """A guest's state, addresses, size, base and NAT forwards."""
    dom = lifecycle.lookup(conn, name)
    info = inventory.describe(conn, dom)
    info["machine"] = machine.shown(Domain(dom.XMLDesc(0)))
    info["nat"] = forwards.listing(name).get(name, {}).get("forwards", [])
    return info


def live_nodes(
    conn: libvirt.virConnect, opts: dict, lister: Callable[[libvirt.virConnect], dict]
) -> dict:
    """The nodes ``lister`` finds on the hypervisor. A killed create's
    half-made domain is not one: salt-cloud would refuse to create the name
    again ("already exists") instead of letting the driver clear it."""
    nodes = lister(conn)
    for name in intent.killed(opts):
        nodes.pop(name, None)
    return nodes


def cleanup(
    conn: libvirt.virConnect,
    opts: dict,
    remove_key: Callable[[str], None],
    only: Callable[[str], bool] | None = None,
) -> dict[str, object]:
    """Undo what each killed create wrote down before making it (only runs
    whose process is gone; with ``only``, only the names it accepts: the
    creates that were on this host); its journal goes once undone."""
    removed: dict[str, object] = {}
    for journal in intent.journals(opts):
        if only is not None and not only(journal.name):
            continue
        try:
            records = journal.stale()
            if records is None:
                continue
            removed[journal.name] = intent.undo(conn, records, remove_key)
            journal.path.unlink()
        except SaltKvmError as exc:
            removed[journal.name] = {"error": str(exc)}
    return removed
