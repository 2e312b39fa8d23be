"""Rules for the names salt-kvm gives to domains and volumes."""

from __future__ import annotations

import re

from salt_kvm.errors import SpecError

# A DNS name (labels of letters, digits and inner hyphens, dot-separated): what a
# minion id, a hostname and a libvirt domain name all accept, and what cannot
# escape a pool directory (no '/', no '..', no leading '.' or '-').
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
NAME_RULE = (
    "a DNS name: letters, digits and hyphens, 1-63 per dot-separated label, "
    "not starting or ending with a hyphen, 253 characters at most"
)


# A hypervisor's name among several (a provider's ``hosts``, the minions'
# ``kvm:hosts``): one plain token, never a path or an option.
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


def check_vm_name(name: object, key: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise SpecError(key, f"{name!r} is not a name", NAME_RULE)
    if len(name) > 253 or not _NAME_RE.fullmatch(name):
        raise SpecError(key, f"{name!r} is not a valid VM name", NAME_RULE)
    return name


def hostname_of(name: str) -> str:
    """The guest's short hostname: the first label of the VM name."""
    return name.split(".", 1)[0]


def root_volume_name(vm: str, fmt: str) -> str:
    return f"{vm}.{fmt}"


def extra_volume_name(vm: str, target: str, fmt: str) -> str:
    return f"{vm}-{target}.{fmt}"


def seed_volume_name(vm: str) -> str:
    return f"{vm}-seed.iso"
