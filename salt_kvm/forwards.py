"""NAT port forwards of domains: add, remove, list, apply a whole set, re-apply.

Every change renders salt-kvm's whole nftables table from the desired state
(``natstore``) and replaces it in one ``nft`` transaction: a call changes all
it should or nothing. libvirt is asked for guest addresses before the state
lock is taken, so a libvirt hook waiting on that lock can never deadlock
libvirtd.
"""

from __future__ import annotations

import ipaddress
import logging

import libvirt
from lxml import etree

from . import addresses, connection, hostnet, nat
from .domxml import Domain
from .errors import ConflictError, NotFoundError, SaltKvmError, SpecError
from .natstore import Entry, Placement, Store, all_forwards

log = logging.getLogger(__name__)


# ---- where a guest is --------------------------------------------------------


def _networks(conn: libvirt.virConnect) -> dict[str, libvirt.virNetwork]:
    return {n.name(): n for n in conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE)}


def _subnet(root: etree._Element) -> ipaddress.IPv4Network | None:
    for ip in root.findall("ip"):
        if ip.get("family", "ipv4") != "ipv4" or ip.get("address") is None:
            continue
        mask = ip.get("prefix") or ip.get("netmask") or "24"
        network = ipaddress.IPv4Network(f"{ip.get('address')}/{mask}", strict=False)
        return network
    return None


def _reserved(root: etree._Element, mac: str, name: str) -> list[str]:
    found = []
    for host in root.findall("ip/dhcp/host"):
        if (host.get("mac") or "").lower() == mac or (
            not host.get("mac") and host.get("name") == name
        ):
            if host.get("ip"):
                found.append(host.get("ip"))
    return found


def _leased(net: libvirt.virNetwork, mac: str) -> list[str]:
    try:
        return [lease["ipaddr"] for lease in net.DHCPLeases(mac) or [] if lease.get("ipaddr")]
    except libvirt.libvirtError:
        return []


def locate(conn: libvirt.virConnect, name: str) -> Placement:
    """The guest's address on a libvirt-managed network: reservation, lease, then agent."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        raise NotFoundError(f"no domain named {name!r} on {conn.getURI()}") from exc
    networks = _networks(conn)
    by_bridge = {n.bridgeName(): n for n in networks.values()}
    on_network = False
    for iface in Domain(dom.XMLDesc(0)).interfaces:
        net = networks.get(iface.source_network or "") or by_bridge.get(iface.source_bridge or "")
        if net is None or not iface.mac:
            continue
        on_network = True
        mac = iface.mac.lower()
        root = etree.fromstring(net.XMLDesc(0).encode())
        subnet = _subnet(root)
        if subnet is None:
            continue
        candidates = _reserved(root, mac, name) + _leased(net, mac)
        if dom.isActive():
            candidates += addresses.addresses_from(dom, addresses.SOURCE_AGENT, [mac])
        for address in candidates:
            if ipaddress.ip_address(address) in subnet:
                return Placement(net.name(), net.bridgeName(), str(subnet), address, mac)
    if not on_network:
        raise SpecError(
            "domain",
            f"{name} has no interface on an active libvirt-managed network",
            "a domain with a NIC on a libvirt network (e.g. nics: [default])",
        )
    raise ConflictError(
        f"{name} has no known address on its libvirt network (no DHCP reservation, lease or "
        "guest agent answer yet); start it or reserve an address"
    )


# ---- changing the set --------------------------------------------------------


def _check_free(
    entries: dict[str, Entry], domain: str, rules: list[nat.Rule], busy: set[tuple[str, int]]
) -> None:
    ours = {r.key for r in entries.get(domain, Entry([], None)).rules}
    for rule in rules:
        for other, entry in entries.items():
            if other == domain:
                continue
            for taken in entry.rules:
                if rule.clashes(taken):
                    raise ConflictError(
                        f"host port {rule.host}/{rule.proto} is already forwarded to {other}"
                    )
        if rule.key not in ours and (rule.proto, rule.host) in busy:
            raise ConflictError(
                f"host port {rule.host}/{rule.proto} is in use by a process on the host"
            )


def _commit(store: Store, entries: dict[str, Entry], before: dict[str, Entry]) -> None:
    """The table, then the file; if the file cannot be written, the old table again."""
    hostnet.replace_table(nat.script(all_forwards(entries)))
    try:
        store.save(entries)
    except OSError as exc:
        hostnet.replace_table(nat.script(all_forwards(before)))
        raise SaltKvmError(f"could not write {store.path}: {exc}; nothing changed") from exc
    host_settings(entries)


def host_settings(entries: dict[str, Entry]) -> list[str]:
    """What the forwards need beside the table, re-done by every apply and hook:
    route_localnet on their bridges, hairpin on their guests' ports, the accept
    ahead of libvirt's rejects."""
    done = []
    for bridge in sorted({e.placement.bridge for e in entries.values()}):
        if hostnet.route_localnet(bridge):
            done.append(f"route_localnet on {bridge}")
    for name, entry in sorted(entries.items()):
        for tap, _ in hostnet.running_taps(entry.placement.network, {name}):
            if hostnet.hairpin(tap):
                done.append(f"hairpin on {tap}")
    if entries and hostnet.ensure_forward_accept():
        done.append("forward accept")
    return done


def _changes(old: list[nat.Rule], new: list[nat.Rule]) -> dict:
    if old == new:
        return {}
    return {"old": [r.as_dict() for r in old], "new": [r.as_dict() for r in new]}


def apply(
    conn: libvirt.virConnect | None,
    domain: str,
    rules: object,
    max_rules: int = nat.DEFAULT_MAX_RULES,
    store: Store | None = None,
    test: bool = False,
    placement: Placement | None = None,
) -> dict:
    """Make ``rules`` exactly the forwards of ``domain``; returns old/new (empty: no change).

    The guest's address is looked up again, so a re-apply follows a guest
    whose address changed.
    """
    placements = {domain: placement} if placement is not None else None
    changes = apply_all(conn, {domain: rules}, max_rules, store, test, placements)
    return changes.get(domain, {})


def apply_all(
    conn: libvirt.virConnect | None,
    wanted: dict[str, object],
    max_rules: int = nat.DEFAULT_MAX_RULES,
    store: Store | None = None,
    test: bool = False,
    placements: dict[str, Placement] | None = None,
) -> dict[str, dict]:
    """Set the forwards of several domains in ONE nft transaction; domain → old/new."""
    store = store or Store()
    parsed = {}
    for domain, rules in wanted.items():
        rules = rules if _is_rule_list(rules) else nat.parse_rules(rules, "rules", max_rules)
        if len(rules) > max_rules:
            raise SpecError(
                "rules", f"{len(rules)} rules are more than the maximum", f"at most {max_rules}"
            )
        parsed[domain] = rules
    placements = dict(placements or {})
    for domain, rules in parsed.items():
        if rules and domain not in placements:
            check_local(conn, "rules")
            placements[domain] = locate(conn, domain)
    with store.locked():
        entries = store.load()
        before = dict(entries)
        busy = hostnet.local_ports()
        changes = {}
        for domain, rules in parsed.items():
            change = _set(entries, domain, rules, placements.get(domain), busy)
            if change:
                changes[domain] = change
        if not test and (changes or not _active(entries)):
            _commit(store, entries, before)
    return changes


def _set(entries, domain, rules, placement, busy) -> dict:
    old_entry = entries.get(domain)
    _check_free(entries, domain, rules, busy)
    if rules:
        entries[domain] = Entry(rules, placement)
    else:
        entries.pop(domain, None)
    changes = _changes(old_entry.rules if old_entry else [], rules)
    if not changes and old_entry and rules and old_entry.placement != placement:
        changes = {
            "old": {"address": old_entry.placement.address},
            "new": {"address": placement.address},
        }
    return changes


def _is_rule_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(r, nat.Rule) for r in value) and bool(value)


def _active(entries: dict[str, Entry]) -> bool:
    """Whether the kernel's table holds exactly what the state says."""
    wanted = sorted(f.comment for f in all_forwards(entries))
    return sorted(hostnet.table_comments().get("prerouting", [])) == wanted


def current(domain: str, store: Store | None = None) -> list[nat.Rule]:
    entry = (store or Store()).load().get(domain)
    return list(entry.rules) if entry else []


def add(
    conn, domain: str, guest_port, host_port=None, proto="tcp", host_address=None, **kw
) -> dict:
    """Add one forward to the domain's set (the others stay)."""
    item = {"guest": guest_port, "host": host_port, "proto": proto, "host_address": host_address}
    rule = nat.parse_rule(item, "rule")
    have = current(domain, kw.get("store"))
    if rule in have:
        return {}
    for existing in have:
        if existing.clashes(rule):
            raise ConflictError(
                f"host port {rule.host}/{rule.proto} is already forwarded to {domain}"
            )
    return apply(conn, domain, sorted([*have, rule]), **kw)


def remove(conn, domain: str, guest_port=None, host_port=None, proto="tcp", **kw) -> dict:
    """Remove the domain's forwards matching the given guest and/or host port."""
    if guest_port is None and host_port is None:
        raise SpecError("guest_port", "is required (or host_port)", "a port from 1 to 65535")
    store = kw.get("store") or Store()
    entry = store.load().get(domain)
    if entry is None:
        return {}
    keep = [
        r
        for r in entry.rules
        if not (
            r.proto == proto
            and (guest_port is None or r.guest == int(guest_port))
            and (host_port is None or r.host == int(host_port))
        )
    ]
    if keep == entry.rules:
        return {}
    return apply(conn, domain, keep or [], placement=entry.placement, **{**kw, "store": store})


def forget(domain: str, store: Store | None = None) -> dict:
    """Drop a (removed) domain's forwards; no libvirt needed."""
    store = store or Store()
    if domain not in store.load():
        return {}
    return apply(None, domain, [], store=store)


def check_local(conn: libvirt.virConnect, key: str = "nat_rules") -> None:
    """Forwards are programmed in this host's kernel: the hypervisor must be this host."""
    host = connection.remote_host(conn)
    if host is not None:
        raise SpecError(
            key,
            f"forwards are made in the kernel of the host salt-kvm runs on, not {host}",
            "a local libvirt URI (qemu:///system); or run kvm_nat on the hypervisor's minion",
        )


def check_free(domain: str, rules: list[nat.Rule], store: Store | None = None) -> None:
    """Refuse, before anything is made, forwards whose host ports are taken."""
    _check_free((store or Store()).load(), domain, rules, hostnet.local_ports())


def listing(domain: str | None = None, store: Store | None = None) -> dict[str, dict]:
    """Domain → its forwards, guest address and whether the kernel has them."""
    entries = (store or Store()).load()
    active = set(hostnet.table_comments().get("prerouting", []))
    result = {}
    for name, entry in sorted(entries.items()):
        if domain is not None and name != domain:
            continue
        result[name] = {
            "network": entry.placement.network,
            "address": entry.placement.address,
            "forwards": [
                {**r.as_dict(), "active": nat.comment_for(name, r) in active} for r in entry.rules
            ],
        }
    return result


def reapply(store: Store | None = None) -> list[str]:
    """Put the stored forwards back in the kernel (hooks, boot); no libvirt calls."""
    store = store or Store()
    with store.locked():
        entries = store.load()
        done = host_settings(entries)
        if not _active(entries):
            hostnet.replace_table(nat.script(all_forwards(entries)))
            done.append("table")
    return done


def refresh(conn: libvirt.virConnect, store: Store | None = None) -> dict:
    """Look every domain up again: follow address changes, drop removed domains."""
    store = store or Store()
    changes = {}
    for name, entry in sorted(store.load().items()):
        try:
            placement = locate(conn, name)
        except NotFoundError:
            changes[name] = forget(name, store)
            continue
        except SaltKvmError as exc:
            log.warning("forwards of %s kept as they are: %s", name, exc)
            continue
        change = apply(conn, name, entry.rules, store=store, placement=placement)
        if change:
            changes[name] = change
    reapply(store)
    return changes
