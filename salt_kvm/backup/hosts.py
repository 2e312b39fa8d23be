"""The other hypervisors, by name: the minions' ``kvm:hosts`` setting.

A hypervisor minion that sends its backups to another host, or takes a guest
over from one, knows the others by the names the cloud provider's ``hosts``
gives them. ``kvm:hosts`` (pillar or minion config) maps each name to how it
is reached::

    kvm:
      host: kvm2                 # this host's own name (default: the minion id)
      hosts:
        kvm1:
          uri: qemu+ssh://root@kvm1/system
          backup: ssh://root@kvm1/srv/replica
          host_key: SHA256:...
        kvm2:
          uri: qemu+ssh://root@kvm2/system
          backup: ssh://root@kvm2/srv/replica
          key_filename: /root/.ssh/id_ed25519

``uri`` is the host's libvirt URI (a takeover asks it whether the guest still
runs there); ``backup`` its replica folder, as another host sends copies there
(``ssh://user@host[:port]/path``, or a folder all hosts mount); ``host_key``,
``known_hosts``, ``key_filename`` and ``password_pillar`` are the SSH options
of ``kvm_backup.replicate``. A plain string is a ``uri`` alone. A password is
never a value here: ``password_pillar`` names the key that holds it.

Pure logic: no libvirt, no Salt; the loader module reads the setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import shown
from salt_kvm.virt.names import HOST_NAME_RE

KEY = "kvm:hosts"
SELF_KEY = "kvm:host"
SSH_OPTIONS = ("host_key", "known_hosts", "key_filename", "password_pillar")
ENTRY_KEYS = ("uri", "backup", *SSH_OPTIONS)
ENTRY_ACCEPTED = (
    "a libvirt URI, or a mapping with uri, backup (ssh://user@host[:port]/path or an "
    "absolute folder), host_key, known_hosts, key_filename, password_pillar"
)


@dataclass(frozen=True)
class Host:
    name: str
    uri: str | None = None
    backup: str | None = None
    host_key: Any = None
    known_hosts: Any = None
    key_filename: str | None = None
    password_pillar: str | None = None

    def copy_args(self) -> dict[str, Any]:
        """``replicate``'s target and SSH options for a copy to this host."""
        if not self.backup:
            raise SpecError(
                f"{KEY}:{self.name}:backup",
                f"host {self.name} has no replica folder",
                "ssh://user@host[:port]/absolute/path, or an absolute folder",
            )
        args: dict[str, Any] = {"target": self.backup}
        for key in SSH_OPTIONS:
            if getattr(self, key) is not None:
                args[key] = getattr(self, key)
        return args

    def replica_folder(self) -> str:
        """The folder, on this host itself, that other hosts send its copies to."""
        if not self.backup:
            self.copy_args()  # says why
        assert self.backup is not None
        if self.backup.startswith("ssh://"):
            return unquote(urlsplit(self.backup).path)
        return self.backup


def _check_backup(name: str, value: Any) -> str | None:
    if value in (None, ""):
        return None
    key = f"{KEY}:{name}:backup"
    accepted = "ssh://user@host[:port]/absolute/path, or an absolute folder"
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise SpecError(key, f"{shown('backup', value)} is not a replica folder", accepted)
    if value.startswith("ssh://"):
        parts = urlsplit(value)
        if parts.password is not None:
            raise SpecError(
                key,
                "an ssh:// URL must not carry a password",
                "password_pillar naming the key that holds it",
            )
        path = parts.path
        if not parts.hostname or not path.startswith("/"):
            raise SpecError(key, f"{shown('backup', value)} is not a replica folder", accepted)
    else:
        path = value
    if not path.startswith("/") or ".." in path.split("/"):
        raise SpecError(key, f"{shown('backup', value)} is not a replica folder", accepted)
    return value


def _entry(name: str, value: Any) -> Host:
    if isinstance(value, str):
        value = {"uri": value}
    if not isinstance(value, dict):
        raise SpecError(
            f"{KEY}:{name}", f"{shown(name, value)} is not a host entry", ENTRY_ACCEPTED
        )
    if "password" in value:
        raise SpecError(
            f"{KEY}:{name}:password",
            "a password is never given here (it would be read with the rest of the entry)",
            "password_pillar naming a pillar or minion-config key that holds it",
        )
    unknown = sorted(str(k) for k in value if k not in ENTRY_KEYS)
    if unknown:
        raise SpecError(
            f"{KEY}:{name}", f"unknown key(s) {', '.join(unknown)}", ", ".join(ENTRY_KEYS)
        )
    uri = value.get("uri")
    if uri is not None and (not isinstance(uri, str) or not uri or any(c.isspace() for c in uri)):
        raise SpecError(
            f"{KEY}:{name}:uri",
            f"{shown('uri', uri)} is not a libvirt URI",
            "e.g. qemu+ssh://root@kvm1/system",
        )
    for key in ("key_filename", "password_pillar"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise SpecError(f"{KEY}:{name}:{key}", f"{value[key]!r} is not a string")
    return Host(
        name=name,
        uri=uri,
        backup=_check_backup(name, value.get("backup")),
        host_key=value.get("host_key"),
        known_hosts=value.get("known_hosts"),
        key_filename=value.get("key_filename"),
        password_pillar=value.get("password_pillar"),
    )


def parse_hosts(value: Any) -> dict[str, Host]:
    """``kvm:hosts`` checked: every name and entry, errors naming the key."""
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise SpecError(KEY, f"{shown('hosts', value)} is not a mapping", "host name: entry")
    hosts = {}
    for name, entry in value.items():
        if not isinstance(name, str) or not HOST_NAME_RE.match(name):
            raise SpecError(
                KEY, f"{name!r} is not a usable host name", "letters, digits, '.', '_', '-'"
            )
        hosts[name] = _entry(name, entry)
    return hosts


def lookup(hosts: dict[str, Host], name: Any, key: str = "host") -> Host:
    """The host ``name``; an unknown one is refused listing the configured ones."""
    if isinstance(name, str) and name in hosts:
        return hosts[name]
    accepted = ", ".join(sorted(hosts)) or f"none: {KEY} is not set on this minion"
    raise SpecError(key, f"{shown(key, name)} is not a host of {KEY}", accepted)


def is_host_name(value: Any) -> bool:
    """Whether a copy target is written as a host name (not a folder or URL)."""
    return isinstance(value, str) and bool(HOST_NAME_RE.match(value))


def this_host(hosts: dict[str, Host], configured: Any, minion_id: Any) -> Host:
    """The host this minion runs on: ``kvm:host``, else the minion id."""
    if configured not in (None, ""):
        return lookup(hosts, configured, SELF_KEY)
    if isinstance(minion_id, str) and minion_id in hosts:
        return hosts[minion_id]
    accepted = ", ".join(sorted(hosts)) or f"none: {KEY} is not set on this minion"
    raise SpecError(
        SELF_KEY,
        f"this minion ({minion_id}) is none of {KEY}; set {SELF_KEY} to its name there",
        accepted,
    )
