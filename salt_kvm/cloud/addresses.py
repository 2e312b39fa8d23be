"""Learn a guest's IP addresses: DHCP lease, guest agent or ARP, matched by MAC."""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Iterator

import libvirt

from salt_kvm.cloud.choices import (  # noqa: F401 - re-exported: the names' old home
    ALIASES,
    AUTO_ORDER,
    SOURCE_AGENT,
    SOURCE_ARP,
    SOURCE_AUTO,
    SOURCE_LEASE,
    SOURCES,
    check_source,
    usable,
)
from salt_kvm.errors import TimeoutError_
from salt_kvm.virt.domain import Domain

log = logging.getLogger(__name__)

_LIBVIRT_SOURCE = {
    SOURCE_LEASE: libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
    SOURCE_AGENT: libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
    SOURCE_ARP: libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
}


def domain_macs(dom: libvirt.virDomain) -> list[str]:
    return [i.mac.lower() for i in Domain(dom.XMLDesc(0)).interfaces if i.mac]


# (domain, source) → the last "no answer" logged for it.
_NO_ANSWER: dict[tuple[str, str], str] = {}


def addresses_from(dom: libvirt.virDomain, source: str, macs: Iterable[str]) -> list[str]:
    """The usable addresses ``source`` knows for the interfaces with ``macs``.

    IPv4 first: that is what salt-cloud deploys to and minions usually use.
    """
    wanted = {m.lower() for m in macs}
    try:
        ifaces = dom.interfaceAddresses(_LIBVIRT_SOURCE[source], 0) or {}
    except libvirt.libvirtError as exc:
        # No agent yet, no lease file yet, ...: simply nothing known now. Said
        # once per answer, not once per poll.
        key, text = (dom.name(), source), str(exc)
        if _NO_ANSWER.get(key) != text:
            _NO_ANSWER[key] = text
            log.debug("%s: %s has no answer yet: %s", dom.name(), source, exc)
        return []
    _NO_ANSWER.pop((dom.name(), source), None)
    found: list[tuple[int, str]] = []
    for iface in ifaces.values():
        if (iface.get("hwaddr") or "").lower() not in wanted:
            continue
        for addr in iface.get("addrs") or []:
            if usable(addr["addr"]):
                found.append((addr["type"], addr["addr"]))
    found.sort(key=lambda item: item[0] != libvirt.VIR_IP_ADDR_TYPE_IPV4)
    return [addr for _, addr in found]


# The DHCP leases of the other hypervisors of a several-host provider: a guest
# on a network bridged onto another host's (one L2 segment, as in a cluster)
# leases from that host's dnsmasq, so its own host knows no lease.
_PEER_LEASES: contextvars.ContextVar[Callable[[list[str]], list[str]] | None] = (
    contextvars.ContextVar("peer_leases", default=None)
)


@contextlib.contextmanager
def peer_leases(find: Callable[[list[str]], list[str]]) -> Iterator[None]:
    """Inside the block, a lease lookup that finds nothing on the guest's own
    host asks ``find(macs)`` (the other hosts' lease tables)."""
    token = _PEER_LEASES.set(find)
    try:
        yield
    finally:
        _PEER_LEASES.reset(token)


def has_ipv4(found: list[str]) -> bool:
    """Whether an IPv4 address is among ``found`` (NAT forwards need one)."""
    return any(ipaddress.ip_address(a.split("%")[0]).version == 4 for a in found)


def lookup(dom: libvirt.virDomain, source: str, macs: Iterable[str] | None = None) -> list[str]:
    macs = list(macs) if macs is not None else domain_macs(dom)
    order = AUTO_ORDER if source == SOURCE_AUTO else (source,)
    for each in order:
        found = addresses_from(dom, each, macs)
        peers = _PEER_LEASES.get()
        if not found and each == SOURCE_LEASE and peers is not None:
            found = [addr for addr in peers(macs) if usable(addr)]
        if found:
            return found
    return []


_STATE_NAMES = {
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
}


def _check_running(dom: libvirt.virDomain) -> None:
    """Fail at once when the guest stopped running: its address will never come.

    A guest that pauses right after start is typically a KVM guest on a host
    where hardware virtualization does not work (e.g. nested KVM).
    """
    state, reason = dom.state()
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return
    message = (
        f"{dom.name()} stopped running ({_STATE_NAMES.get(state, state)}, reason {reason}) "
        "while waiting for its IP address"
    )
    if state == libvirt.VIR_DOMAIN_PAUSED:
        message += "; if this host cannot run KVM guests, set virt_type: qemu"
    raise TimeoutError_(message)


def wait_for_addresses(
    dom: libvirt.virDomain,
    source: str,
    timeout: float,
    interval: float = 0.5,
    macs: Iterable[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    check: Callable[[], None] | None = None,
    check_every: float = 2.0,
    accept: Callable[[list[str]], bool] | None = None,
) -> list[str]:
    """Poll ``source`` every ``interval`` seconds until the guest has an address
    (one ``accept`` takes, e.g. ``has_ipv4``).

    ``check`` (called every ``check_every`` seconds) raises when the guest has
    said it cannot come up (e.g. its start script failed): the wait ends with
    that cause instead of at ``timeout``."""
    macs = list(macs) if macs is not None else domain_macs(dom)
    deadline = clock() + timeout
    next_check = clock() + check_every
    found: list[str] = []
    while True:
        found = lookup(dom, source, macs)
        if found and (accept is None or accept(found)):
            return found
        _check_running(dom)
        if check is not None and clock() >= next_check:
            check()
            next_check = clock() + check_every
        if clock() >= deadline:
            has = f"; it has only {', '.join(found)}" if found else ""
            raise TimeoutError_(
                f"{dom.name()} got no {'usable ' if found else ''}IP address from {source} "
                f"within {timeout:g}s (MACs {', '.join(macs)}{has})"
            )
        sleep(interval)
