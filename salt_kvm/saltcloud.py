"""The salt-cloud driver's hosts: which hypervisor a create, an action or a
function goes to, read from the provider as salt-cloud configures it.

A provider has one hypervisor (``url``) or several (``hosts``, see
docs/multi-host.rst). With several, a new guest is placed (``location``), an
action finds its guest on whichever host has it, a function names its host
(``location=``), and a lease lookup also asks the other hosts. The driver
(``salt_kvm.clouds.libvirt``) keeps salt-cloud's entry points; what changes
with the number of hosts is here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import salt.config as config

from salt_kvm.cloud import actions, addresses, fleet, locations, placement
from salt_kvm.errors import SpecError
from salt_kvm.saltutil import cloud_errors, connection_args, input_errors, profile_prefix
from salt_kvm.virt.connection import connected

log = logging.getLogger(__name__)


def provider_fleet(opts: dict, source: dict) -> fleet.Fleet | None:
    """The hosts of provider (or VM) config ``source``: a Fleet for ``hosts``,
    None for a one-host provider (``url``)."""

    def get(key):
        return config.get_cloud_config_value(key, source, opts, search_global=False)

    hosts = locations.parse_hosts(get("hosts"), get("url"))
    if hosts is None:
        return None
    auth = connection_args(opts, source)
    return fleet.Fleet(hosts, auth["username"], auth["password"])


@contextlib.contextmanager
def guest_connection(hosts: fleet.Fleet | None, connect: Callable, name: str) -> Iterator[Any]:
    """A connection to the hypervisor guest ``name`` is on (with several hosts:
    wherever it is)."""
    if hosts is None:
        with connect() as conn:
            yield conn
        return
    with hosts.guest(name) as (_host, conn):
        yield conn


@contextlib.contextmanager
def host_connection(
    hosts: fleet.Fleet | None, connect: Callable, kwargs: dict | None
) -> Iterator[Any]:
    """A function's connection: the provider's hypervisor, or with several
    hosts the one ``location=`` names (required then)."""
    if hosts is None:
        with connect() as conn:
            yield conn
        return
    location = (kwargs or {}).get("location")
    if location not in hosts.hosts:
        raise SpecError(
            "location",
            f"{location!r} is not one of this provider's hosts"
            if location
            else "is required with hosts",
            ", ".join(sorted(hosts.hosts)),
        )
    with connected(hosts.hosts[location], **hosts.auth) as conn:
        yield conn


def place(opts: dict, vm_: dict, spec, rollback, journal) -> tuple[fleet.Fleet, str] | None:
    """With several hosts: the host ``location`` (default auto) gives the new
    guest, written down for parallel creates; the VM's connection goes there
    (``vm_["url"]``). After a killed create of the name, ``auto`` goes where
    that one went: what it left is cleared there. None with one host."""
    with input_errors(profile_prefix(vm_)), rollback:
        hosts = provider_fleet(opts, vm_)
        location = config.get_cloud_config_value("location", vm_, opts)  # also -L/--location
        location = locations.check_location(location, hosts.hosts if hosts else None)
    if hosts is None:
        return None
    placements = placement.Placements(opts["cachedir"])
    with cloud_errors(profile_prefix(vm_), f"creating {vm_['name']}: "), rollback:
        if journal.pending and location == locations.AUTO:
            location = placements.killed(vm_["name"]) or location
            location = location if location in hosts.hosts else locations.AUTO
        chosen = placement.place(placements, hosts.hosts, hosts.connect, spec, location)
    log.info("placing %s on host %s (location %s)", vm_["name"], chosen.name, location)
    vm_["url"] = hosts.hosts[chosen.name]
    return hosts, chosen.name


@contextlib.contextmanager
def peer_leases(placed: tuple[fleet.Fleet, str] | None) -> Iterator[None]:
    """With several hosts, a lease lookup also asks the other hosts' tables."""
    if placed is None:
        yield
        return
    hosts, chosen = placed
    with hosts.peer_leases(chosen) as find, addresses.peer_leases(find):
        yield


def cleanup_hosts(opts: dict, hosts: fleet.Fleet, remove_key: Callable[[str], None]) -> dict:
    """What killed creates left, each undone on the host its placement names.
    A create killed before its placement was written had made nothing on any
    host but maybe its minion key: undone with the first host that answers."""
    placed = placement.Placements(opts["cachedir"])
    removed: dict[str, Any] = {}
    silent: dict[str, str | None] = {}
    first = None
    for host, conn, error in hosts.each():
        if conn is None:
            silent[host] = error
            continue
        first = first or host
        mine = lambda name, host=host, first=first: (placed.killed(name) or first) == host  # noqa: E731
        for name, result in actions.cleanup(conn, opts, remove_key, only=mine).items():
            removed[name] = result
            if not (isinstance(result, dict) and "error" in result):
                placed.remove(name)
    if silent:
        removed["hosts that did not answer"] = silent
    return removed
