"""The profile's ``cloud_init`` key: first-boot data for the NoCloud seed.

One seed per guest carries both the user's data and, with ``deploy_method:
cloud-init``, the minion preseed. How they merge:

* salt-kvm's own part is a cloud-config: the profile's ``authorized_keys``
  (a ``users`` entry for ``ssh_username``), ``files`` (``write_files``),
  ``packages``, ``runcmd``, then the minion preseed (its files after the
  profile's, so they are in place when its ``bootcmd`` starts the minion).
* ``user_data`` that is a cloud-config (a YAML mapping, with or without the
  ``#cloud-config`` line) is merged with that part into ONE cloud-config:
  mappings merge key by key, lists are concatenated (the user_data's items
  first), and for any other value user_data wins.
* Any other ``user_data`` (a ``#!`` script, ``#cloud-boothook``, ``#include``,
  a ``## template: jinja`` cloud-config, a MIME multipart) becomes a MIME
  multipart: the user's part(s) first, salt-kvm's cloud-config last with
  ``merge_how`` list append / dict no-replace, so cloud-init merges the same way.

``user_data`` is a string or the absolute path of a file; with
``template: jinja`` (or a ``.j2``/``.jinja`` file) it is rendered first with
the VM's name, fixed addresses, NICs and grains (see ``context``).
"""

from __future__ import annotations

import base64
import email.parser
import re
from dataclasses import dataclass, field
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import jinja2
import yaml

from salt_kvm import redact
from salt_kvm.errors import SpecError
from salt_kvm.virt.checks import check_keys, one_of

KEY = "cloud_init"
KEYS = (
    "user_data",
    "template",
    "meta_data",
    "network_config",
    "authorized_keys",
    "files",
    "packages",
    "runcmd",
)
CLOUD_CONFIG = "#cloud-config"
MERGE_HOW = "list(append)+dict(no_replace,recurse_list)+str()"
_KEY_RE = re.compile(r"(ssh-(rsa|dss|ed25519)|ecdsa-sha2-\S+|sk-\S+) [A-Za-z0-9+/=]+( .*)?")
_MODE_RE = re.compile(r"[0-7]{3,4}")
TEMPLATE_SUFFIXES = (".j2", ".jinja")


@dataclass
class FileSpec:
    path: str
    content: bytes
    mode: str | None = None
    owner: str | None = None


@dataclass
class CloudInitSpec:
    user_data: str | None = None
    user_data_origin: str = "cloud_init.user_data"  # the key or the file, for errors
    template: bool = False
    meta_data: dict = field(default_factory=dict)
    network_config: dict | None = None
    authorized_keys: list[str] = field(default_factory=list)
    files: list[FileSpec] = field(default_factory=list)
    packages: list = field(default_factory=list)
    runcmd: list = field(default_factory=list)


def _read(path: str, key: str, accepted: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise SpecError(key, f"cannot read {path!r}: {exc.strerror}", accepted) from None


def _is_path(value: str) -> bool:
    return value.startswith("/") and "\n" not in value


def _user_data(value: Any, spec: CloudInitSpec) -> None:
    key = f"{KEY}.user_data"
    accepted = "a string (cloud-config, script...), a mapping, or an absolute file path"
    if isinstance(value, dict):
        spec.user_data = CLOUD_CONFIG + "\n" + yaml.safe_dump(value, sort_keys=False)
        return
    if not isinstance(value, str) or not value.strip():
        raise SpecError(key, f"{redact.value(key, value)} is not user data", accepted)
    if _is_path(value):
        spec.user_data = _read(value, key, accepted).decode("utf-8", "replace")
        spec.user_data_origin = value
        spec.template = spec.template or value.endswith(TEMPLATE_SUFFIXES)
    else:
        spec.user_data = value


def _authorized_keys(value: Any) -> list[str]:
    key = f"{KEY}.authorized_keys"
    accepted = "public keys (ssh-ed25519 AAAA... comment) or absolute paths of .pub files"
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise SpecError(key, f"{redact.value(key, value)} is not a list of keys", accepted)
    keys = []
    for item in items:
        if not isinstance(item, str):
            raise SpecError(key, f"{redact.value(key, item)} is not a public key", accepted)
        lines = _read(item, key, accepted).decode().splitlines() if _is_path(item) else [item]
        for line in (ln.strip() for ln in lines):
            if not line or line.startswith("#"):
                continue
            if not _KEY_RE.fullmatch(line):
                raise SpecError(key, f"{line[:40]!r} is not an OpenSSH public key", accepted)
            keys.append(line)
    return keys


MODE_ACCEPTED = (
    "a mode such as 644, 0640 or '0755' (digits read as octal, as Salt's file.managed "
    "does); write world-writable (o+w) or setuid/setgid/sticky modes as a quoted "
    "four-digit string ('0777', '4755')"
)
_WORLD_WRITABLE = 0o002
_SPECIAL = 0o7000


def _mode(value: Any, key: str) -> str:
    """A file mode as cloud-init's four-digit octal string.

    An unquoted ``755`` or ``0755`` reaches us as the int 755 (Salt's YAML
    loader reads both as decimal): its digits are the octal mode, as in Salt's
    ``file.managed``. An int with an 8 or 9 (493 is what a YAML 1.1 loader makes
    of ``0755``) is refused, never reinterpreted. A mode that lets others write
    or sets setuid/setgid/sticky is taken only from a quoted four-digit string:
    it must be asked for in so many words.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        digits = str(value)
        if value < 0 or len(digits) > 3 or not _MODE_RE.fullmatch(digits.rjust(3, "0")):
            raise SpecError(key, f"{value!r} is not an octal file mode (quote it)", MODE_ACCEPTED)
        mode = int(digits, 8)
        if mode & _WORLD_WRITABLE:
            raise SpecError(key, f"{value!r} lets every user write the file", MODE_ACCEPTED)
        return f"{mode:04o}"
    if isinstance(value, str):
        text = value.strip()
        text = "0" + text[2:] if text[:2] in ("0o", "0O") else text
        if _MODE_RE.fullmatch(text):
            mode = int(text, 8)
            explicit = len(text) == 4
            if mode & _SPECIAL and not explicit:
                raise SpecError(key, f"{value!r} sets setuid/setgid/sticky", MODE_ACCEPTED)
            if mode & _WORLD_WRITABLE and not explicit:
                raise SpecError(key, f"{value!r} lets every user write the file", MODE_ACCEPTED)
            return f"{mode:04o}"
    raise SpecError(key, f"{value!r} is not a file mode", MODE_ACCEPTED)


def _files(value: Any) -> list[FileSpec]:
    key = f"{KEY}.files"
    accepted = "a mapping of absolute guest paths to text, or to {content|source, mode, owner}"
    if not isinstance(value, dict) or not value:
        raise SpecError(key, f"{redact.value(key, value)} is not a mapping of files", accepted)
    files = []
    for path, item in value.items():
        where = f"{key}[{path}]"
        if not isinstance(path, str) or not path.startswith("/") or "/../" in f"{path}/":
            raise SpecError(where, f"{path!r} is not an absolute path", accepted)
        if isinstance(item, str):
            item = {"content": item}
        if not isinstance(item, dict):
            raise SpecError(where, f"a {type(item).__name__} is not file content", accepted)
        unknown = set(item) - {"content", "source", "mode", "owner"}
        if unknown or ("content" in item) == ("source" in item):
            raise SpecError(where, "needs content or source (one of them)", accepted)
        if "source" in item:
            source = item["source"]
            if not isinstance(source, str) or not source.startswith("/"):
                raise SpecError(f"{where}.source", f"{source!r} is not an absolute path", accepted)
            content = _read(source, f"{where}.source", accepted)
        elif isinstance(item["content"], str):
            content = item["content"].encode()
        else:
            raise SpecError(
                f"{where}.content", f"a {type(item['content']).__name__} is not text", accepted
            )
        owner = item.get("owner")
        if owner is not None and not (
            isinstance(owner, str) and re.fullmatch(r"[\w.-]+(:[\w.-]+)?", owner, re.ASCII)
        ):
            raise SpecError(f"{where}.owner", f"{owner!r} is not an owner", "user or user:group")
        mode = _mode(item["mode"], f"{where}.mode") if item.get("mode") is not None else None
        files.append(FileSpec(path, content, mode, owner))
    return files


def _mapping(value: Any, key: str) -> dict:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            # the error's snippet would quote the text, which may hold secrets
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid"
            raise SpecError(
                key, f"is not YAML: {problem}{where}", "a mapping (or YAML text)"
            ) from None
    if not isinstance(value, dict):
        raise SpecError(
            key, f"{redact.value(key, value)} is not a mapping", "a mapping (or YAML text)"
        )
    return value


def _list(value: Any, key: str) -> list:
    if not isinstance(value, list) or not all(isinstance(i, str | list) for i in value):
        raise SpecError(
            key, f"{redact.value(key, value)} is not a list", "a list of strings (or of lists)"
        )
    return value


def parse(value: Any) -> CloudInitSpec:
    """Validate the profile's ``cloud_init`` mapping; files are read here, so a
    missing one stops the create before anything exists."""
    if not isinstance(value, dict):
        raise SpecError(
            KEY,
            f"{redact.value(KEY, value)} is not a mapping",
            f"a mapping with keys {', '.join(KEYS)}",
        )
    check_keys(value, KEYS, KEY)
    spec = CloudInitSpec()
    spec.template = one_of(value, "template", (None, "jinja"), None, f"{KEY}.template") == "jinja"
    if value.get("user_data") is not None:
        _user_data(value["user_data"], spec)
    if value.get("meta_data") is not None:
        spec.meta_data = _mapping(value["meta_data"], f"{KEY}.meta_data")
        if "instance-id" in spec.meta_data:
            raise SpecError(
                f"{KEY}.meta_data", "instance-id is made new for every guest", "leave it out"
            )
    if value.get("network_config") is not None:
        spec.network_config = _mapping(value["network_config"], f"{KEY}.network_config")
        if spec.network_config.get("version") not in (1, 2):
            raise SpecError(
                f"{KEY}.network_config", "needs version: 1 or 2", "cloud-init network config v1/v2"
            )
    if value.get("authorized_keys") is not None:
        spec.authorized_keys = _authorized_keys(value["authorized_keys"])
    if value.get("files") is not None:
        spec.files = _files(value["files"])
    for name in ("packages", "runcmd"):
        if value.get(name) is not None:
            setattr(spec, name, _list(value[name], f"{KEY}.{name}"))
    return spec


# ---- building the user-data ------------------------------------------------


def render(spec: CloudInitSpec, context: dict) -> str | None:
    """``user_data``, rendered when it is a template; undefined names are errors."""
    if spec.user_data is None or not spec.template:
        return spec.user_data
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(spec.user_data).render(**context)
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
        # A template's own mistakes (``name + 1``, ``1 / 0``) are bad input too.
        raise SpecError(
            f"{KEY}.user_data",
            f"template {spec.user_data_origin}: {exc}",
            f"a Jinja2 template using {', '.join(sorted(context))}",
        ) from None


def own_config(spec: CloudInitSpec | None, user: str, minion: dict | None) -> dict:
    """salt-kvm's cloud-config: the profile's keys, then the minion preseed."""
    config: dict = {}
    if spec is not None and spec.authorized_keys:
        # A users entry sets keys without cloud-init's disable_root prefix; the
        # image's default user is kept, the password is not locked.
        config["users"] = [
            "default",
            {"name": user, "ssh_authorized_keys": spec.authorized_keys, "lock_passwd": False},
        ]
    if spec is not None and spec.files:
        config["write_files"] = [_write_file(f) for f in spec.files]
    if spec is not None and spec.packages:
        config["packages"] = list(spec.packages)
    if spec is not None and spec.runcmd:
        config["runcmd"] = list(spec.runcmd)
    return merge(config, minion or {})


def _write_file(spec: FileSpec) -> dict:
    entry: dict = {"path": spec.path}
    try:
        entry["content"] = spec.content.decode("utf-8")
    except UnicodeDecodeError:
        entry.update(encoding="b64", content=base64.b64encode(spec.content).decode())
    if spec.mode:
        entry["permissions"] = spec.mode
    if spec.owner:
        entry["owner"] = spec.owner
        if spec.owner.split(":")[0] != "root":
            entry["defer"] = True  # after cloud-init has created the users
    return entry


def merge(first: dict, second: dict) -> dict:
    """Mappings merge key by key, lists concatenate (``first``'s items first),
    anything else: ``first`` wins."""
    result = dict(first)
    for key, value in second.items():
        if key not in result:
            result[key] = value
        elif isinstance(result[key], dict) and isinstance(value, dict):
            result[key] = merge(result[key], value)
        elif isinstance(result[key], list) and isinstance(value, list):
            result[key] = result[key] + value
    return result


def _as_cloud_config(text: str) -> dict | None:
    """The mapping of a cloud-config user-data, or None for any other kind."""
    stripped = text.lstrip()
    if stripped.startswith("#") and not stripped.startswith(CLOUD_CONFIG):
        return None  # a script, boothook, include, jinja header...
    if stripped.lower().startswith(("content-type:", "mime-version:")):
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else ({} if data is None else None)


def _multipart(user_text: str, config: dict) -> bytes:
    outer = MIMEMultipart()
    if user_text.lower().lstrip().startswith(("content-type:", "mime-version:")):
        message = email.parser.Parser().parsestr(user_text)
        parts = [p for p in message.walk() if not p.is_multipart()]
    else:
        parts = [MIMEText(user_text, "plain", "utf-8")]  # cloud-init types it by its 1st line
    for part in parts:
        outer.attach(part)
    if config:
        ours = MIMEText(
            CLOUD_CONFIG + "\n" + yaml.safe_dump({**config, "merge_how": MERGE_HOW}),
            "cloud-config",
            "utf-8",
        )
        ours.add_header("Content-Disposition", "attachment", filename="salt-kvm.cfg")
        outer.attach(ours)
    return outer.as_bytes()


def user_data(spec: CloudInitSpec | None, user: str, minion: dict | None, context: dict) -> bytes:
    """The seed's ``user-data``: one cloud-config, or a MIME multipart when the
    profile's user_data is not a cloud-config (see the module docstring)."""
    config = own_config(spec, user, minion)
    text = render(spec, context) if spec is not None else None
    if text is None:
        return (CLOUD_CONFIG + "\n" + yaml.safe_dump(config, sort_keys=False)).encode()
    theirs = _as_cloud_config(text)
    if theirs is None:
        return _multipart(text, config)
    merged = merge(theirs, config)
    return (CLOUD_CONFIG + "\n" + yaml.safe_dump(merged, sort_keys=False)).encode()


def context(vm_name: str, nics: list, grains: dict | None, **extra: Any) -> dict:
    """What a user_data template can use. Addresses a DHCP server hands out are
    not known before the first boot: ``ips`` are the profile's fixed ones."""
    return {
        "name": vm_name,
        "hostname": vm_name.split(".", 1)[0],
        "ips": [n.ip for n in nics if n.ip],
        "nics": [
            {"network": n.network, "bridge": n.bridge, "mac": n.mac, "ip": n.ip} for n in nics
        ],
        "grains": dict(grains or {}),
        **extra,
    }


# ---- the network config of a static plan ------------------------------------


def network_config(nics: list) -> dict | None:
    """cloud-init network config v2 for NICs with a static ip on a bridge
    (``nics[].ip``), None when there is none. Every NIC is matched by its MAC
    (the spec makes sure each has one) and named ``eth<index>`` in NIC order:
    cloud-init's networkd, ifupdown and sysconfig renderers match the name as
    well as the MAC, so only a ``set-name`` makes the match hold on every
    image, not just on netplan's. NICs without a static ip keep DHCP, as the
    image's own fallback config would have given them."""
    if not any(n.static for n in nics):
        return None
    ethernets: dict = {}
    for index, nic in enumerate(nics):
        entry: dict = {"match": {"macaddress": nic.mac}, "set-name": f"eth{index}"}
        if nic.static:
            entry["addresses"] = [f"{nic.ip}/{nic.prefix}"]
            if nic.gateway:
                entry["routes"] = [{"to": "0.0.0.0/0", "via": nic.gateway}]
            if nic.dns:
                entry["nameservers"] = {"addresses": list(nic.dns)}
        else:
            entry["dhcp4"] = True
        ethernets[f"eth{index}"] = entry
    return {"version": 2, "ethernets": ethernets}


# ---- IPv6 reservations: the DUID the guest asks with ------------------------

DUID_CONF = "/etc/systemd/networkd.conf.d/50-salt-kvm-duid.conf"


def duid_config(nics: list) -> dict:
    """A ``bootcmd`` that makes systemd-networkd's DHCPv6 client send the
    DUID-LL of each NIC's MAC (``DUIDType=link-layer``), the key of the NICs'
    ``ip6`` reservations; empty without one. Written and networkd restarted
    on the first boot only (it may have asked with its machine-id DUID by
    then; it asks again). An image without networkd is left as it is."""
    if not any(getattr(n, "ip6", None) for n in nics):
        return {}
    script = (
        f"[ -e {DUID_CONF} ] || ! [ -d /etc/systemd/network ] || {{ "
        f"mkdir -p {DUID_CONF.rsplit('/', 1)[0]} && "
        f"printf '[DHCPv6]\\nDUIDType=link-layer\\n' > {DUID_CONF} && "
        "systemctl try-restart systemd-networkd; }"
    )
    return {"bootcmd": [["sh", "-c", script]]}
