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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

import libvirt

from salt_kvm.errors import ConflictError, ForwardsBlocked, NotFoundError, SaltKvmError, SpecError
from salt_kvm.nat import firewall, relays
from salt_kvm.nat import rules as nat
from salt_kvm.nat.placement import locate, managed_domains
from salt_kvm.nat.store import Entry, Placement, Store, all_forwards
from salt_kvm.virt import connection

log = logging.getLogger(__name__)


# ---- changing the set --------------------------------------------------------


def _check_free(
    entries: dict[str, Entry], domain: str, rules: list[nat.Rule], busy: set[tuple[str, int]]
) -> None:
    ours = {r.key for r in entries[domain].rules} if domain in entries else set()
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
    """The kernel, then the file; if either fails, the old kernel again: a
    call changes all it should or nothing."""
    try:
        sync_kernel(entries)
        store.save(entries)
    except (OSError, SaltKvmError) as exc:
        try:
            sync_kernel(before)
        except (OSError, SaltKvmError) as again:
            log.error("forwards: could not put the previous table back: %s", again)
        if isinstance(exc, OSError):
            raise SaltKvmError(f"could not write {store.path}: {exc}; nothing changed") from exc
        raise


def sync_kernel(entries: dict[str, Entry], replace: bool = True, strict: bool = False) -> list[str]:
    """Make the kernel match ``entries``: the table (if ``replace``), then what
    the forwards need beside it; re-done by every apply and hook.

    When the host's firewall cannot let forwards through (``hostnet.firewall``),
    everything else is still done (a removal must go through); ``strict``
    (the hooks, reapply) then raises so the failure is logged and shown.

    route_localnet lets a guest on a bridge reach the host's 127.0.0.0/8
    unless the table's guard rule for that bridge drops such traffic. So it is
    turned off on every libvirt bridge that will not need it, or whose guard is
    not loaded, BEFORE the table changes; and turned on only AFTER the new
    table is loaded, and only where the kernel shows that bridge's guard.
    """
    forwards = all_forwards(entries)
    want = set(nat.localnet_bridges(forwards))
    done = []
    guarded = firewall.guarded_bridges()
    candidates = firewall.libvirt_bridges() | {e.placement.bridge for e in entries.values()}
    for bridge in sorted(firewall.route_localnet_on(candidates)):
        if (bridge not in want or bridge not in guarded) and firewall.route_localnet(bridge, False):
            done.append(f"route_localnet off on {bridge}")
    if replace:
        firewall.replace_table(nat.script(forwards))
        done.append("table")
        guarded = firewall.guarded_bridges()
    for bridge in sorted(want):
        if bridge not in guarded:
            raise SaltKvmError(
                f"the guard rule for {bridge} is not in the kernel's table; "
                "route_localnet left off (forwards from 127.0.0.1 to it will not work)"
            )
        if firewall.route_localnet(bridge, True):
            done.append(f"route_localnet on {bridge}")
    for name, entry in sorted(entries.items()):
        for tap, _ in firewall.running_taps(entry.placement.network, {name}):
            if firewall.hairpin(tap):
                done.append(f"hairpin on {tap}")
    if entries:
        try:
            if firewall.ensure_forward_accept():
                done.append("forward accept")
        except ForwardsBlocked as exc:
            if strict:
                raise
            log.error("forwards cannot pass the host's firewall: %s", exc)
    return done + sync_relays(forwards)


def sync_relays(forwards: list[nat.Forward]) -> list[str]:
    """Start and stop the userspace relays (``[::1]``, IPv6 to IPv4-only
    guests) with the forwards, in the same code path as the table."""
    return relays.sync(_planned_relays(forwards))


def _planned_relays(forwards: list[nat.Forward]) -> list[relays.Relay]:
    v4_only = {f.bridge for f in forwards if not f.address6 and f.rule.host_address is None}
    return relays.planned(forwards, firewall.bridge_addresses6(v4_only))


def refuse_if_blocked() -> None:
    """A forward that the host's firewall would drop is refused, never made dead."""
    problem = firewall.forward_problem()
    if problem is not None:
        raise ForwardsBlocked(f"forwards cannot work on this host: {problem}; nothing changed")


def _changes(old: list[nat.Rule], new: list[nat.Rule]) -> dict:
    if old == new:
        return {}
    return {"old": [r.as_dict() for r in old], "new": [r.as_dict() for r in new]}


@dataclass(frozen=True)
class Edit:
    """A change to a domain's current set, made under the lock (read-modify-write).

    ``located``: the result needs the guest's address looked up (``add``);
    otherwise the stored one is kept (``remove``)."""

    change: Callable[[list[nat.Rule]], list[nat.Rule]]
    located: bool = True


def _replaced_by(rules: list[nat.Rule]) -> Callable[[list[nat.Rule]], list[nat.Rule]]:
    """The change that sets the whole list to ``rules``."""
    return lambda _current: rules


def _locked(store: Store):
    """The one place forwards take the NAT state lock (a project lock helper may
    replace ``Store.locked`` here)."""
    return store.locked()


def apply(
    conn: libvirt.virConnect | None,
    domain: str,
    rules: object,
    max_rules: int = nat.DEFAULT_MAX_RULES,
    store: Store | None = None,
    test: bool = False,
    placement: Placement | None = None,
) -> dict:
    """Make ``rules`` (or an ``Edit`` of the current set) the forwards of
    ``domain``; returns old/new (empty: no change).

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
    """Set the forwards of several domains in ONE nft transaction; domain → old/new.

    With a connection, forwards of domains that are gone (undefined outside
    salt-kvm) or not salt-kvm's are dropped in the same transaction.
    """
    store = store or Store()
    edits: dict[str, Edit] = {}
    for domain, rules in wanted.items():
        if isinstance(rules, Edit):
            edits[domain] = rules
            continue
        parsed = rules if _is_rule_list(rules) else nat.parse_rules(rules, "rules", max_rules)
        check_host_addresses(parsed)
        edits[domain] = Edit(_replaced_by(parsed), located=bool(parsed))
    if any(edit.located for edit in edits.values()):
        refuse_if_blocked()
    placements = dict(placements or {})
    # libvirt is asked before the lock: a hook waiting on the lock while
    # libvirtd waits on the hook must never meet a call into libvirtd here.
    stored = store.load()
    for domain, edit in edits.items():
        if edit.located and domain not in placements:
            check_local(conn, "rules")
            known = stored[domain].placement if domain in stored else None
            placements[domain] = locate(conn, domain, known)
    gone = _gone(conn, store, set(edits))
    with _locked(store):
        entries = store.load()
        before = dict(entries)
        busy = firewall.local_ports()
        changes = {}
        for domain in sorted(gone & set(entries)):
            log.warning("forwards of %s dropped: the domain is gone or not salt-kvm's", domain)
            entries.pop(domain)
        for domain, edit in edits.items():
            old = entries[domain].rules if domain in entries else []
            rules = sorted(edit.change(list(old)))
            if len(rules) > max_rules and len(rules) >= len(old):
                raise SpecError(
                    "rules", f"{len(rules)} rules are more than the maximum", f"at most {max_rules}"
                )
            change = _set(entries, domain, rules, placements.get(domain), busy)
            if change:
                changes[domain] = change
        if test:
            return changes
        if changes or entries != before:
            _commit(store, entries, before)
        else:  # nothing to store; the kernel is still made right (a flushed table, a stray sysctl)
            sync_kernel(entries, replace=not _active(entries))
    return changes


def _gone(conn: libvirt.virConnect | None, store: Store, keep: set[str]) -> set[str]:
    """Domains with stored forwards that no longer exist as salt-kvm domains.

    Only names stored BEFORE libvirt is asked count: a domain being created
    meanwhile is defined before its forwards are stored. A guest migrated to
    another host (``moved_to``) is not gone: its forwards stay here."""
    if conn is None or connection.remote_host(conn) is not None:
        return set()
    stored = {name for name, entry in store.load().items() if not entry.moved_to} - keep
    if not stored:
        return set()
    return stored - managed_domains(conn)


def _set(entries, domain, rules, placement, busy) -> dict:
    old_entry = entries.get(domain)
    _check_free(entries, domain, rules, busy)
    if placement is None and old_entry is not None:
        placement = old_entry.placement
    if rules:
        if placement is None:
            raise ConflictError(f"{domain} has no known address for its forwards")
        moved_to, pinned_on = (old_entry.moved_to, old_entry.pinned_on) if old_entry else ("", "")
        entries[domain] = Entry(rules, placement, moved_to, pinned_on)
    else:
        entries.pop(domain, None)
    changes = _changes(old_entry.rules if old_entry else [], rules)
    if not changes and old_entry and rules and old_entry.placement != placement:
        changes = {
            "old": {"address": old_entry.placement.address},
            "new": {"address": placement.address},
        }
    return changes


def _is_rule_list(value: object) -> TypeGuard[list[nat.Rule]]:
    return isinstance(value, list) and all(isinstance(r, nat.Rule) for r in value) and bool(value)


def _active(entries: dict[str, Entry]) -> bool:
    """Whether the kernel's table holds exactly what the state says (forwards and guards)."""
    forwards = all_forwards(entries)
    chains = firewall.table_comments()
    wanted = sorted(f.comment for f in forwards if f.answers_ipv4)
    guards = sorted(nat.GUARD + b for b in {f.bridge for f in forwards if f.answers_ipv4})
    wanted6 = sorted(f.comment for f in forwards if f.answers_ipv6)
    chains6 = firewall.table_comments(nat.TABLE6_FAMILY)
    return (
        sorted(chains.get("prerouting", [])) == wanted
        and sorted(chains.get("guard", [])) == guards
        and sorted(chains6.get("prerouting", [])) == wanted6
    )


def current(domain: str, store: Store | None = None) -> list[nat.Rule]:
    entry = (store or Store()).load().get(domain)
    return list(entry.rules) if entry else []


def add(
    conn, domain: str, guest_port, host_port=None, proto="tcp", host_address=None, **kw
) -> dict:
    """Add one forward to the domain's set (the others stay), read and written
    under the lock so concurrent adds all persist."""
    item = {"guest": guest_port, "host": host_port, "proto": proto, "host_address": host_address}
    rule = nat.parse_rule(item, "rule")
    check_host_addresses([rule], "rule")

    def change(have: list[nat.Rule]) -> list[nat.Rule]:
        if rule in have:
            return have
        for existing in have:
            if existing.clashes(rule):
                raise ConflictError(
                    f"host port {rule.host}/{rule.proto} is already forwarded to {domain}"
                )
        return [*have, rule]

    return apply(conn, domain, Edit(change), **kw)


def remove(conn, domain: str, guest_port=None, host_port=None, proto="tcp", **kw) -> dict:
    """Remove the domain's forwards matching the given guest and/or host port."""
    if guest_port is None and host_port is None:
        raise SpecError("guest_port", "is required (or host_port)", nat.PORTS)
    proto = nat.parse_proto(proto)
    guest = None if guest_port is None else nat.parse_port(guest_port, "guest_port")
    host = None if host_port is None else nat.parse_port(host_port, "host_port")

    def change(have: list[nat.Rule]) -> list[nat.Rule]:
        return [
            r
            for r in have
            if not (
                r.proto == proto
                and (guest is None or r.guest == guest)
                and (host is None or r.host == host)
            )
        ]

    return apply(conn, domain, Edit(change, located=False), **kw)


def elsewhere(domain: str, store: Store | None = None) -> str:
    """The host ``domain``'s guest was migrated to, its forwards kept here ("": none)."""
    entry = (store or Store()).load().get(domain)
    return entry.moved_to if entry else ""


def pin_of(domain: str, store: Store | None = None) -> tuple[str, str, str, str] | None:
    """(URI, network, MAC, address) of the reservation a migration made for
    ``domain``'s forwards, to release with them."""
    entry = (store or Store()).load().get(domain)
    return entry.pin if entry else None


def relocate(
    domain: str, moved_to: str, pinned_on: str | None = None, store: Store | None = None
) -> Callable[[], object]:
    """Record that ``domain``'s guest runs on ``moved_to`` ("": this host
    again) while its forwards stay in this kernel (a migration on a bridged
    segment; the table does not change). ``pinned_on``: the URI of the
    reservation made for them (None: as it was). Returns what undoes it."""
    store = store or Store()
    with _locked(store):
        entries = store.load()
        if domain not in entries:
            return lambda: None
        old = entries[domain]
        entries[domain] = Entry(
            old.rules, old.placement, moved_to, old.pinned_on if pinned_on is None else pinned_on
        )
        store.save(entries)

    def undo() -> None:
        with _locked(store):
            now = store.load()
            if domain in now:
                now[domain] = Entry(
                    now[domain].rules, now[domain].placement, old.moved_to, old.pinned_on
                )
                store.save(now)

    return undo


def forget(domain: str, store: Store | None = None) -> dict:
    """Drop a (removed) domain's forwards; no libvirt needed."""
    store = store or Store()
    if domain not in store.load():
        return {}
    return apply(None, domain, [], store=store)


def undo_for(domain: str, store: Store | None = None) -> Callable[[], object]:
    """What puts the domain's forwards back as they are now: registered as a
    rollback step BEFORE a create writes any, so a failed create leaves none."""
    store = store or Store()
    entry = store.load().get(domain)
    if entry is None:
        return lambda: forget(domain, store)
    rules, placement = list(entry.rules), entry.placement
    return lambda: apply(None, domain, rules, max(len(rules), 1), store=store, placement=placement)


def check_host_addresses(rules: list[nat.Rule], key: str = "rules") -> None:
    """A forward listens only on an address of this host (or the documented wildcards)."""
    wide = (None, nat.EVERY, nat.EVERY6)
    explicit = [r.host_address for r in rules if r.host_address not in wide]
    if not explicit:
        return
    local = firewall.local_addresses()
    for address in explicit:
        if address not in local and not ipaddress.ip_address(address).is_loopback:
            raise SpecError(
                f"{key}.host_address",
                f"{address} is not an address of this host",
                nat.HOST_ADDRESSES,
            )


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
    """Refuse, before anything is made, forwards whose host ports are taken or
    whose host address is not this host's."""
    if rules:
        refuse_if_blocked()
    check_host_addresses(rules, "nat_rules")
    _check_free((store or Store()).load(), domain, rules, firewall.local_ports())


def listing(domain: str | None = None, store: Store | None = None) -> dict[str, dict]:
    """Domain → its forwards, guest address and whether the kernel has them.

    ``active``: in salt-kvm's table AND able to pass libvirt's forward rules
    (``firewall`` says how, or why not)."""
    entries = (store or Store()).load()
    active = set(firewall.table_comments().get("prerouting", []))
    if any(r.ipv6_only for e in entries.values() for r in e.rules):
        # an IPv6 host_address: the ip6 table's DNAT, or relays only
        active |= set(firewall.table_comments(nat.TABLE6_FAMILY).get("prerouting", []))
    result = {}
    through, why = firewall.passable() if entries else (True, "")
    planned = _planned_relays(all_forwards(entries)) if entries else []
    running = relays.runner().running() if planned else set()
    relayed = {(r.domain, r.port) for r in planned if r.name in running}
    for name, entry in sorted(entries.items()):
        if domain is not None and name != domain:
            continue
        result[name] = {
            # The host the guest was migrated to (its forwards stay here), None: this one.
            "moved_to": entry.moved_to or None,
            "network": entry.placement.network,
            "address": entry.placement.address,
            # The forwards also answer over IPv6, at this address (None: IPv4 only).
            "address6": entry.placement.address6 or None,
            "firewall": why,
            "forwards": [
                {**r.as_dict(), "active": _shown_active(name, r, active, relayed, through)}
                for r in entry.rules
            ],
            # What the userspace relays carry ([::1], IPv6 to an IPv4-only guest).
            "relays": [
                {"listen": f"[{r.listen}]:{r.port}", "to": r.to, "running": r.name in running}
                for r in planned
                if r.domain == name
            ],
        }
    return result


def _shown_active(
    name: str, rule: nat.Rule, active: set[str], relayed: set[tuple[str, int]], through: bool
) -> bool:
    """In a table (and passing libvirt's rules); an IPv6-only forward to an
    IPv4-only guest: its relay runs."""
    if rule.ipv6_only and nat.comment_for(name, rule) not in active:
        return (name, rule.host) in relayed
    return through and nat.comment_for(name, rule) in active


def reapply(store: Store | None = None) -> list[str]:
    """Put the stored forwards back in the kernel (hooks, boot); no libvirt calls."""
    store = store or Store()
    with _locked(store):
        entries = store.load()
        return sync_kernel(entries, replace=not _active(entries), strict=True)


def refresh(
    conn: libvirt.virConnect, store: Store | None = None, max_rules: int = nat.DEFAULT_MAX_RULES
) -> dict:
    """Look every domain up again: follow address changes, drop removed domains."""
    store = store or Store()
    apply_all(conn, {}, max_rules, store)  # drops the forwards of domains that are gone
    changes = {}
    for name, entry in sorted(store.load().items()):
        if entry.moved_to:
            log.info("forwards of %s kept: it runs on %s", name, entry.moved_to)
            continue
        try:
            placement = locate(conn, name, entry.placement)
        except NotFoundError:
            changes[name] = forget(name, store)
            continue
        except SaltKvmError as exc:
            log.warning("forwards of %s kept as they are: %s", name, exc)
            continue
        change = apply(conn, name, entry.rules, max_rules, store=store, placement=placement)
        if change:
            changes[name] = change
    reapply(store)
    return changes
