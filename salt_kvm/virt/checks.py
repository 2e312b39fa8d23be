"""Small value checkers shared by the profile parsers: each raises a SpecError
that names the key and what it accepts."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, Literal, overload

from salt_kvm import redact
from salt_kvm.errors import SpecError

# Characters that must not reach an XML document, a log line or a single-line
# field: C0/C1 controls, DEL, and what XML 1.0 cannot carry (surrogates,
# U+FFFE/U+FFFF). Tab and newline are allowed only where ``multiline`` says so.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_MULTILINE_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def shown(key: str, value: Any) -> str:
    """``value`` as an error message may show it: never the value of a secret
    key (``password``, ``sudo_password``...), nor a URL's credentials."""
    return redact.value(key, value)


def boolean(values: dict, key: str, default: bool) -> bool:
    value = values.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in (
        "true",
        "yes",
        "on",
        "1",
        "false",
        "no",
        "off",
        "0",
    ):
        return value.lower() in ("true", "yes", "on", "1")
    raise SpecError(key, f"{shown(key, value)} is not a boolean", "true, false (or yes/no, 1/0)")


def finite(value: Any, key: str, what: str, accepted: str) -> float:
    """``value`` as a finite float: inf and nan (and what float() cannot read)
    are refused by name. The one number check every numeric key goes through."""
    if isinstance(value, bool):
        raise SpecError(key, f"{shown(key, value)} is not {what}", accepted)
    if isinstance(value, str):
        value = value.strip()
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise SpecError(key, f"{shown(key, value)} is not {what}", accepted) from None
    if not math.isfinite(number):
        raise SpecError(key, f"{shown(key, value)} is not a finite number", accepted)
    return number


def _number(value: Any, key: str, convert: type, what: str, accepted: str) -> Any:
    if isinstance(value, bool):
        raise SpecError(key, f"{shown(key, value)} is not {what}", accepted)
    if isinstance(value, float | str):
        finite(value, key, what, accepted)  # int(inf) raises OverflowError
    try:
        return convert(value)
    except (TypeError, ValueError, OverflowError):
        raise SpecError(key, f"{shown(key, value)} is not {what}", accepted) from None


def whole_number(value: Any, key: str, low: int, high: int | None = None) -> int:
    accepted = f"a whole number from {low}" + (f" to {high}" if high is not None else "")
    number = _number(value, key, int, "a number", accepted)
    if isinstance(value, float) and value != number:
        raise SpecError(key, f"{shown(key, value)} is not a whole number", accepted)
    if number < low or (high is not None and number > high):
        raise SpecError(key, f"{shown(key, value)} is out of range", accepted)
    return number


def seconds(value: Any, key: str, minimum: float) -> float:
    accepted = f"a number of seconds, at least {minimum:g}"
    number = _number(value, key, float, "a number of seconds", accepted)
    if number < minimum:
        raise SpecError(key, f"{shown(key, value)} is too small", accepted)
    return number


def plain(value: str, key: str, multiline: bool = False) -> str:
    """Refuse control characters (and what XML cannot hold) in free text that
    goes into a domain definition, a file name or a log; ``multiline`` allows
    tab and newline (a description)."""
    found = (_MULTILINE_CONTROL_RE if multiline else _CONTROL_RE).search(value)
    if found:
        allowed = "text without control characters" + (
            " (tab and newline are allowed)" if multiline else ""
        )
        raise SpecError(
            key, f"{shown(key, value)} holds the control character {found.group()!r}", allowed
        )
    return value


@overload
def text(
    values: dict,
    key: str,
    required: Literal[True],
    label: str | None = None,
    multiline: bool = False,
) -> str: ...


@overload
def text(
    values: dict,
    key: str,
    required: bool = False,
    label: str | None = None,
    multiline: bool = False,
) -> str | None: ...


def text(
    values: dict,
    key: str,
    required: bool = False,
    label: str | None = None,
    multiline: bool = False,
) -> str | None:
    label = label or key
    value = values.get(key)
    if value is None or value == "":
        if required:
            raise SpecError(label, "is required", "a non-empty string")
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise SpecError(label, f"{shown(label, value)} is not a string", "a string")
    return plain(str(value), label, multiline)


def object_name(values: dict, key: str, label: str | None = None) -> str | None:
    """The name of a libvirt object the profile points at (a domain, a network,
    a bridge, a pool): ``text``, and no spaces around it. libvirt allows them in
    a name, but one padded in YAML is a typo that would fail only at lookup."""
    value = text(values, key, label=label)
    if value is not None and value != value.strip():
        raise SpecError(
            label or key,
            f"{value!r} has spaces around it",
            "the name as libvirt lists it, without spaces around it",
        )
    return value


def one_of(values: dict, key: str, choices: tuple, default: Any, label: str | None = None) -> Any:
    value = values.get(key, default)
    if value is None:
        value = default
    if value not in choices:
        raise SpecError(label or key, f"{shown(label or key, value)} is not allowed", choices)
    return value


# ---- composite values ------------------------------------------------------


def uri(value: Any, key: str) -> str:
    """A libvirt URI: a string without whitespace (libvirt fails on one later,
    far from the key that held it: ``$(cat file)`` leaves a newline)."""
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise SpecError(
            key,
            f"{shown('url', value)} is not a libvirt URI (it holds whitespace)"
            if isinstance(value, str) and value
            else f"{shown('url', value)} is not a libvirt URI",
            "e.g. qemu:///system or qemu+ssh://root@hv1/system, without spaces or newlines",
        )
    plain(value, key)
    return value


def key_names(keys: Iterable[Any]) -> str:
    """Keys for a message, sorted: YAML gives ``1:``, ``true:`` and ``null:``
    keys as int, bool and None, which neither sort beside strings nor join."""
    return ", ".join(sorted(repr(k) if not isinstance(k, str) else k for k in keys))


def check_keys(mapping: dict, known: Iterable[str], where: str, what: str = "key(s)") -> None:
    """Refuse the keys of ``mapping`` that are not in ``known`` (any type of key)."""
    known = tuple(known)
    unknown = [k for k in mapping if not isinstance(k, str) or k not in known]
    if unknown:
        raise SpecError(where, f"unknown {what} {key_names(unknown)}", known)
