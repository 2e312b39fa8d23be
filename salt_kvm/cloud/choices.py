"""The cloud-side values a profile chooses among, and their checks: clone
strategies and address sources. Free of libvirt, so the profile spec can
check them (salt_kvm.cloud.clone and salt_kvm.cloud.addresses re-export them)."""

from __future__ import annotations

import ipaddress

from salt_kvm.errors import SpecError

# clone_strategy: a linked clone (a qcow2 overlay on the base's image) or a copy.
STRATEGY_QUICK = "quick"
STRATEGY_FULL = "full"
STRATEGIES = (STRATEGY_QUICK, STRATEGY_FULL)

# Profile values of ip_source. Salt 3007's driver called the lease source
# "ip-learning"; "lease" is accepted as its plain name.
SOURCE_LEASE = "ip-learning"
SOURCE_AGENT = "qemu-agent"
SOURCE_ARP = "arp"
SOURCE_AUTO = "auto"
# The profile's own static plan (nics[].ip on a bridge): no source is asked.
SOURCE_PLAN = "plan"
SOURCES = (SOURCE_LEASE, SOURCE_AGENT, SOURCE_ARP, SOURCE_AUTO, SOURCE_PLAN)
ALIASES = {"lease": SOURCE_LEASE, "agent": SOURCE_AGENT}
AUTO_ORDER = (SOURCE_LEASE, SOURCE_AGENT, SOURCE_ARP)


def check_source(value: object, key: str = "ip_source") -> str:
    value = ALIASES.get(value, value) if isinstance(value, str) else value
    if value not in SOURCES:
        raise SpecError(key, f"{value!r} is not an address source", SOURCES + tuple(ALIASES))
    return str(value)


def usable(address: str) -> bool:
    """Addresses a master can reach a minion on: not link-local, loopback or unspecified."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return not (
        ip.is_link_local or ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_reserved
    )
