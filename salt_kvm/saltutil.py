"""Helpers shared by salt-kvm's loader modules (they speak Salt; this reads its config)."""

from __future__ import annotations

from salt_kvm.virt.connection import DEFAULT_URI, connected

CONFIG_KEY = "kvm:connection:uri"


def _traverse(data: dict, path: str):
    for part in path.split(":"):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def hypervisor_uri(opts: dict, pillar: dict, uri: str | None = None) -> str:
    """An explicit ``uri``, else pillar, else minion config ``kvm:connection:uri``."""
    return (
        uri
        or _traverse(pillar or {}, CONFIG_KEY)
        or _traverse(opts or {}, CONFIG_KEY)
        or DEFAULT_URI
    )


def connection_for(opts: dict, pillar: dict, uri: str | None = None):
    return connected(hypervisor_uri(opts, pillar, uri))


def config_value(opts: dict, pillar: dict, key: str, default=None):
    """A ``kvm:...`` setting: pillar first, then the minion config, else ``default``."""
    for source in (pillar or {}, opts or {}):
        value = _traverse(source, key)
        if value is not None:
            return value
    return default
