"""Sizes: the one place where size strings and units are parsed."""

from __future__ import annotations

import re

from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import finite

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4

_FACTORS = {
    "": None,  # the caller's default unit
    "b": 1,
    "k": KIB,
    "kb": KIB,
    "kib": KIB,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "t": TIB,
    "tb": TIB,
    "tib": TIB,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", re.ASCII)
ACCEPTED_SIZE = "a number in {unit}, or a string such as 512M, 2G, 2GB, 1.5GiB (binary units)"


def parse_size(value: object, key: str, default_unit: int) -> int:
    """Return ``value`` in bytes. A bare number is in ``default_unit`` bytes.

    Units are binary (``2GB`` is 2 GiB), as libvirt and qemu-img read them.
    """
    unit_name = {MIB: "MiB", GIB: "GiB", 1: "bytes"}.get(default_unit, f"{default_unit}-byte units")
    accepted = ACCEPTED_SIZE.format(unit=unit_name)
    if isinstance(value, bool):
        raise SpecError(key, f"{value!r} is not a size", accepted)
    if isinstance(value, int | float):
        number, factor = finite(value, key, "a size", accepted), default_unit
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        if not match or match.group(2).lower() not in _FACTORS:
            raise SpecError(key, f"{value!r} is not a size", accepted)
        number = finite(match.group(1), key, "a size", accepted)
        factor = _FACTORS[match.group(2).lower()] or default_unit
    else:
        raise SpecError(key, f"{value!r} is not a size", accepted)
    size = int(finite(number * factor, key, "a size", accepted))
    if size <= 0:
        raise SpecError(key, f"{value!r} must be greater than zero", accepted)
    return size


def human_size(size: int) -> str:
    """``2147483648`` -> ``2G``: the shortest exact binary form."""
    for suffix, factor in (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if size % factor == 0:
            return f"{size // factor}{suffix}"
    return f"{size}B"


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.ASCII)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
ACCEPTED_DURATION = "seconds, or a string such as 90s, 30m, 24h, 7d, 2w"


def parse_duration(value: object, key: str) -> float:
    """Return ``value`` in seconds; a bare number is seconds."""
    if isinstance(value, bool):
        raise SpecError(key, f"{value!r} is not a duration", ACCEPTED_DURATION)
    if isinstance(value, int | float):
        seconds = finite(value, key, "a duration", ACCEPTED_DURATION)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.lower())):
        seconds = finite(match.group(1), key, "a duration", ACCEPTED_DURATION)
        seconds = finite(seconds * _SECONDS[match.group(2)], key, "a duration", ACCEPTED_DURATION)
    else:
        raise SpecError(key, f"{value!r} is not a duration", ACCEPTED_DURATION)
    if seconds <= 0:
        raise SpecError(key, f"{value!r} must be greater than zero", ACCEPTED_DURATION)
    return seconds
