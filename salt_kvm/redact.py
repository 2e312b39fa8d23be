"""Keeping secrets out of what salt-kvm writes: logs, events, domain metadata,
cache and volume names, error messages.

One helper for the whole project. A secret is either a value under a key that
names one (``password``, ``token``, ``script_args``...), the userinfo or the
query of a URL, or a value the caller knows to be secret (``text(s, [pw])``).
What is shown instead is :data:`MASK`; a URL keeps its scheme, host, port and
path, so a reader still sees which image or target is meant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Keys (matched case-insensitively, as whole words of a snake_case or dashed
# key) whose values are never shown.
SECRET_WORDS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "pem",
    "priv",
    "credential",
    "credentials",
    "auth",
    "apikey",
    "script_args",
    "user_data",
)
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
# scheme://userinfo@ and ?query / #fragment of URLs inside free text
_URL_RE = re.compile(
    r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s/?#'\"<>]*@)?([^\s?#'\"<>]*)([?#][^\s'\"<>]*)?"
)


def is_secret_key(key: object) -> bool:
    """Whether a mapping key names a secret (``password``, ``sudo_password``,
    ``libvirt-password``, ``priv_key``, ``api_token``, ``script_args``...)."""
    if not isinstance(key, str):
        return False
    words = [w for w in _WORD_SPLIT.split(key.lower()) if w]
    joined = f"_{'_'.join(words)}_"
    return any(f"_{secret}_" in joined for secret in SECRET_WORDS)


def url(value: str) -> str:
    """``value`` without a URL's userinfo, query and fragment
    (``https://u:p@host/x.img?token=t`` → ``https://host/x.img``). A string
    that is not a URL with a scheme comes back unchanged."""
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return MASK
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _url_match(match: re.Match) -> str:
    scheme, userinfo, rest, tail = match.groups()
    return scheme + (MASK + "@" if userinfo else "") + rest + (tail[0] + MASK if tail else "")


def text(value: str, secrets: Iterable[str | None] = ()) -> str:
    """``value`` with every known secret and every URL credential or query masked."""
    if not isinstance(value, str):
        return value
    for secret in sorted((s for s in secrets if isinstance(s, str) and s), key=len, reverse=True):
        value = value.replace(secret, MASK)
    return _URL_RE.sub(_url_match, value)


def value(key: str, data: Any, limit: int = 80) -> str:
    """``data`` as an error message about ``key`` may show it: nothing of a
    secret key's value (its type only), else a short repr with secrets masked."""
    if is_secret_key(key):
        return f"the {type(data).__name__} given"
    shown = repr(mapping(data))
    return shown if len(shown) <= limit else shown[: limit - 5] + "...)"


def mapping(data: Any, secrets: Iterable[str | None] = ()) -> Any:
    """A copy of ``data`` (dicts, lists, strings) for showing: values under a
    secret key masked, strings passed through :func:`text`."""
    secrets = tuple(secrets)
    if isinstance(data, dict):
        return {
            k: (MASK if is_secret_key(k) and v not in (None, "", False) else mapping(v, secrets))
            for k, v in data.items()
        }
    if isinstance(data, (list, tuple)):
        return type(data)(mapping(v, secrets) for v in data)
    if isinstance(data, str):
        return text(data, secrets)
    return data
