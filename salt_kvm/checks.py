"""Small value checkers shared by the profile parsers: each raises a SpecError
that names the key and what it accepts."""

from __future__ import annotations

from typing import Any

from . import redact
from .errors import SpecError


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


def _number(value: Any, key: str, convert: type, what: str, accepted: str) -> Any:
    if isinstance(value, bool):
        raise SpecError(key, f"{shown(key, value)} is not {what}", accepted)
    try:
        return convert(value)
    except (TypeError, ValueError):
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


def text(values: dict, key: str, required: bool = False, label: str | None = None) -> str | None:
    label = label or key
    value = values.get(key)
    if value is None or value == "":
        if required:
            raise SpecError(label, "is required", "a non-empty string")
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise SpecError(label, f"{shown(label, value)} is not a string", "a string")
    return str(value)


def one_of(values: dict, key: str, choices: tuple, default: Any, label: str | None = None) -> Any:
    value = values.get(key, default)
    if value is None:
        value = default
    if value not in choices:
        raise SpecError(label or key, f"{shown(label or key, value)} is not allowed", choices)
    return value


# ---- composite values ------------------------------------------------------
