"""A provider's several hypervisors (``hosts``) as the driver uses them: find
a guest wherever it is, list every host's guests with their host, and report
each host's room. A host that does not answer is named, never fatal for a
listing; an action on a guest that is on none of the hosts that answered says
which did not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import urllib.parse
from collections.abc import Callable, Iterator

import libvirt

from salt_kvm import redact
from salt_kvm.cloud import actions, inventory, placement
from salt_kvm.errors import NotFoundError, SaltKvmError
from salt_kvm.virt import host as hostfacts
from salt_kvm.virt.connection import open_connection

log = logging.getLogger(__name__)


class Fleet:
    """The hosts (name → libvirt URI) of one provider, and its credentials."""

    def __init__(
        self, hosts: dict[str, str], username: str | None = None, password: str | None = None
    ):
        self.hosts = hosts
        self.auth = {"username": username, "password": password}

    def connect(self, uri: str) -> libvirt.virConnect:
        return open_connection(uri, **self.auth)

    def each(self) -> Iterator[tuple[str, libvirt.virConnect | None, str | None]]:
        """(name, connection, None) per host that answers, (name, None, error)
        per host that does not; each connection is closed after its turn."""
        for name, uri in self.hosts.items():
            try:
                conn = self.connect(uri)
            except SaltKvmError as exc:
                log.warning("host %s did not answer: %s", name, exc)
                yield name, None, str(exc)
                continue
            try:
                yield name, conn, None
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

    @contextlib.contextmanager
    def guest(self, name: str) -> Iterator[tuple[str, libvirt.virConnect]]:
        """The host guest ``name`` is defined on, and a connection to it."""
        silent = []
        for host, conn, error in self.each():
            if conn is None:
                silent.append(f"{host} ({error})")
                continue
            try:
                conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            yield host, conn
            return
        message = f"no domain named {name!r} on any host ({', '.join(self.hosts)})"
        if silent:
            message += f"; did not answer: {'; '.join(silent)}"
        raise NotFoundError(message)

    @contextlib.contextmanager
    def peer_leases(self, own: str) -> Iterator[Callable[[list[str]], list[str]]]:
        """A lookup of MACs in the lease tables of every host but ``own``, its
        connections open for the block (a create polls it)."""
        conns = []
        for host, uri in self.hosts.items():
            if host != own:
                with contextlib.suppress(SaltKvmError):
                    conns.append(self.connect(uri))

        def find(macs: list[str]) -> list[str]:
            wanted = {m.lower() for m in macs}
            found = []
            for conn in conns:
                with contextlib.suppress(libvirt.libvirtError):
                    table = inventory.lease_table(conn)
                    found += [ip for mac in wanted for ip in table.get(mac, [])]
            return found

        try:
            yield find
        finally:
            for conn in conns:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

    def nodes(self, opts: dict, lister: Callable[[libvirt.virConnect], dict]) -> dict:
        """Every host's salt-kvm guests, each with its ``location``; a running
        guest whose own host knows no address gets it from the other hosts'
        leases (a network bridged onto another host's, one L2 segment)."""
        found: dict[str, dict] = {}
        leases: dict[str, list[str]] = {}
        for host, conn, _error in self.each():
            if conn is None:
                continue  # named by each()'s warning
            try:
                nodes = actions.live_nodes(conn, opts, lister)
                for mac, ips in inventory.lease_table(conn).items():
                    leases.setdefault(mac, []).extend(ips)
            except libvirt.libvirtError as exc:
                log.warning("host %s: listing failed: %s", host, exc)
                continue
            for name, node in nodes.items():
                if name in found:
                    log.warning(
                        "guest %s is on host %s and on host %s: listing the first",
                        name,
                        found[name]["location"],
                        host,
                    )
                    continue
                found[name] = {**node, "location": host}
        for node in found.values():
            if node.get("state") == "running" and "macs" in node:
                if not node.get("private_ips") and not node.get("public_ips"):
                    ips = [ip for mac in node["macs"] for ip in leases.get(mac, [])]
                    node["private_ips"] = [ip for ip in ips if ipaddress.ip_address(ip).is_private]
                    node["public_ips"] = [
                        ip for ip in ips if not ipaddress.ip_address(ip).is_private
                    ]
        return found

    def locations(self) -> dict[str, dict]:
        """--list-locations: each host's memory, committed memory, guests and facts."""
        result: dict[str, dict] = {}
        for host, conn, error in self.each():
            uri = self.hosts[host]
            if urllib.parse.urlsplit(uri).password:  # else shown as written
                uri = redact.url(uri)
            if conn is None:
                result[host] = {"uri": uri, "error": error}
                continue
            try:
                room = placement.room(conn, host)
                facts = hostfacts.info(conn)
            except (libvirt.libvirtError, SaltKvmError) as exc:
                result[host] = {"uri": uri, "error": str(exc)}
                continue
            facts.pop("uri", None)
            result[host] = {
                "uri": uri,
                "memory_mib": room.memory_mib,
                "cpus": room.cpus,
                "committed_memory_mib": room.committed_mib,
                "uncommitted_memory_mib": room.free_mib,
                "guests": room.guests,
                **facts,
            }
        return result

    def base_domains(self) -> dict[str, dict]:
        """--list-images: the base domains of every host, each with the hosts that have it."""
        result: dict[str, dict] = {}
        for host, conn, _error in self.each():
            if conn is None:
                continue
            for name, facts in inventory.base_domains(conn).items():
                entry = result.setdefault(name, {**facts, "locations": []})
                entry["locations"].append(host)
        return result
