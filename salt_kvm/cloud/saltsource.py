"""The profile key ``salt_source``: where a guest whose image has no Salt gets
it at its first boot (with ``deploy_method: cloud-init``).

* ``bootstrap``: Salt's bootstrap script (``bootstrap_script_url``, salt-cloud's
  own key, or its default), run with ``-X stable VERSION``; the guest needs the
  internet.
* an ``http(s)://`` URL ending ``.tar.xz``/``.tar.gz``/``.tgz``: a Salt onedir
  tarball, extracted under /opt/saltstack (``#sha256=HEX`` on the URL, pip's
  convention, checks it first).
* any other ``http(s)://`` URL: a pip wheelhouse (a directory listing pip's
  ``--find-links`` reads), installed into a virtualenv at /opt/saltstack/salt
  with ``pip install --no-index --find-links URL salt==VERSION``. Stock images
  have no python3-venv (ensurepip): the venv is made without pip and pip runs
  from the wheelhouse's own pip wheel (ensurepip only when the wheelhouse has none).

The install runs in the guest as a small Python program (cloud-init needs
python3, so every image that reads the seed has one), before the start script
starts the minion; what it prints last on failure is the cause the host shows.
Free of libvirt: the profile spec imports it.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from salt_kvm.errors import SpecError

KEY = "salt_source"
VERSION_KEY = "salt_version"
URL_KEY = "bootstrap_script_url"
BOOTSTRAP = "bootstrap"
WHEELHOUSE = "wheelhouse"
ONEDIR = "onedir"
TARBALL_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz")
# Salt 3007's default (salt.utils.cloud.update_bootstrap), for the same key.
DEFAULT_BOOTSTRAP_URL = (
    "https://github.com/saltstack/salt-bootstrap/releases/latest/download/bootstrap-salt.sh"
)
ACCEPTED = (
    "bootstrap (Salt's bootstrap script; the guest needs the internet), the http(s):// URL "
    "of a Salt onedir tarball (ending .tar.xz, .tar.gz or .tgz; add #sha256=HEX to check it), "
    "or the http(s):// URL of a pip wheelhouse (a directory listing); or leave it out when "
    "the image has Salt"
)
VERSION_ACCEPTED = (
    "a Salt version such as 3007.8 or 3008 (with salt_source bootstrap or a wheelhouse)"
)
_VERSION_RE = re.compile(r"[0-9]{4}(\.[0-9]+){0,2}(rc[0-9]+)?")
_SHA256_RE = re.compile(r"sha256=([0-9a-fA-F]{64})")
_URL_CHARS_RE = re.compile(r"[\x00-\x20\x7f-\x9f\"'\\<>`]")


@dataclass(frozen=True)
class SaltSource:
    kind: str  # BOOTSTRAP, WHEELHOUSE or ONEDIR
    url: str  # the script's, the wheelhouse's or the tarball's (without #sha256)
    version: str | None = None
    sha256: str | None = None
    # Install and start qemu-guest-agent (ip_source: qemu-agent needs it).
    agent: bool = False


def _shown(url: str) -> str:
    """A URL as an error may show it: scheme, host and path, nothing else."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else repr(url[:60])


def _url(value: str, key: str, accepted: str) -> urllib.parse.SplitResult:
    if _URL_CHARS_RE.search(value):
        raise SpecError(
            key, f"{_shown(value)} holds spaces, quotes or control characters", accepted
        )
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(key, f"{_shown(value)} is not an http(s):// URL", accepted)
    if parts.username is not None or parts.password is not None:
        # The URL goes into the guest and into error messages: no secrets in it.
        raise SpecError(
            key,
            f"{_shown(value)} carries credentials",
            "a mirror the guest reaches without credentials (" + accepted + ")",
        )
    return parts


def _version(values: dict) -> str | None:
    value = values.get(VERSION_KEY)
    if value in (None, ""):
        return None
    # An unquoted 3007.8 is a float in YAML, 3008 an int: both read as written.
    text = str(value).strip() if isinstance(value, str | int | float) else None
    if isinstance(value, bool) or text is None or not _VERSION_RE.fullmatch(text):
        raise SpecError(VERSION_KEY, f"{value!r} is not a Salt version", VERSION_ACCEPTED)
    return text


def parse(values: dict, method: str, enabled: bool, agent: bool) -> SaltSource | None:
    """``salt_source`` (with ``salt_version``, ``bootstrap_script_url``) as the
    profile gives it; None when absent (the image has Salt). ``method`` and
    ``enabled``: the profile's deploy; ``agent``: ip_source needs the guest agent."""
    value = values.get(KEY)
    version = _version(values)
    if value in (None, ""):
        if version is not None:
            raise SpecError(VERSION_KEY, "only applies with salt_source", f"{KEY}: {ACCEPTED}")
        return None
    if not isinstance(value, str):
        raise SpecError(KEY, f"a {type(value).__name__} is not a Salt source", ACCEPTED)
    if not enabled:
        raise SpecError(
            KEY,
            "installs the minion a deploy starts, and this profile deploys none",
            "deploy_method: cloud-init, or leave salt_source out",
        )
    if method != "cloud-init":
        raise SpecError(
            KEY,
            f"installs Salt through the NoCloud seed of deploy_method: cloud-init, not with "
            f"deploy_method: {method} (salt-cloud's SSH deploy installs Salt with its deploy "
            "script)",
            "deploy_method: cloud-init; or, for an SSH deploy, salt_source left out and "
            "script: bootstrap-salt with script_args such as '-X stable 3007.8'",
        )
    text = value.strip()
    if text == BOOTSTRAP:
        url = values.get(URL_KEY) or DEFAULT_BOOTSTRAP_URL
        if not isinstance(url, str):
            raise SpecError(
                URL_KEY, f"{url!r} is not a URL", "the http(s):// URL of bootstrap-salt.sh"
            )
        _url(url, URL_KEY, "the http(s):// URL of bootstrap-salt.sh")
        return SaltSource(BOOTSTRAP, url, version, agent=agent)
    parts = _url(text, KEY, ACCEPTED)
    bare = urllib.parse.urlunsplit(parts._replace(fragment=""))
    if parts.path.endswith(TARBALL_SUFFIXES):
        sha256 = None
        if parts.fragment:
            match = _SHA256_RE.fullmatch(parts.fragment)
            if not match:
                raise SpecError(
                    KEY, f"#{parts.fragment[:80]} is not a checksum", "#sha256=<64 hex digits>"
                )
            sha256 = match.group(1).lower()
        if version is not None:
            raise SpecError(
                VERSION_KEY,
                "does not apply to a onedir tarball: the tarball is one Salt version",
                "leave salt_version out (name the version's tarball in salt_source)",
            )
        return SaltSource(ONEDIR, bare, None, sha256, agent)
    if parts.fragment:
        raise SpecError(
            KEY,
            "a wheelhouse URL takes no #fragment (a checksum applies to a onedir tarball)",
            ACCEPTED,
        )
    return SaltSource(WHEELHOUSE, bare, version, agent=agent)


# ---- in the guest ------------------------------------------------------------

# What the start script runs before it starts the minion: the source's
# settings (written by write_files) and the installer.
SOURCE_FILE = "/run/salt-kvm/salt-source.json"
INSTALLER = "/run/salt-kvm/install-salt"

INSTALLER_TEXT = r'''#!/usr/bin/env python3
"""salt-kvm: install Salt (and the guest agent when asked) at first boot.
On failure the last line on stderr is the cause the host shows."""
import hashlib, json, os, re, shutil, subprocess, sys, tarfile, tempfile, time
import urllib.error, urllib.parse, urllib.request

PREFIX = "/opt/saltstack"
TRIES_FOR = 40  # seconds: the guest's network may still be settling


def die(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def tail(text, lines=3):
    """The last lines of a tool's output, its ERROR lines first of all (pip)."""
    every = [t.strip() for t in text.strip().splitlines() if t.strip()]
    errors = [t for t in every if t.startswith("ERROR")]
    return " | ".join((errors or every)[-lines:])


def run(argv, what, **kw):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", **kw)
    except OSError as exc:
        die(f"{what}: {exc}")
    if done.returncode:
        die(f"{what} failed ({done.returncode}): {tail(done.stderr or done.stdout)}")
    return done


def fetch(url, dest=None):
    deadline = time.monotonic() + TRIES_FOR
    while True:
        try:
            with urllib.request.urlopen(url, timeout=15) as resp:
                if dest is None:
                    return resp.read(1 << 20)
                with open(dest, "wb") as out:
                    shutil.copyfileobj(resp, out)
                return None
        except urllib.error.HTTPError as exc:
            die(f"cannot download {url}: HTTP {exc.code} {exc.reason}")
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            if time.monotonic() >= deadline:
                die(f"cannot reach {url}: {reason}")
            time.sleep(2)


def link(binary):
    for name in ("salt-minion", "salt-call"):
        target = os.path.join(os.path.dirname(binary), name)
        if os.path.exists(target):
            path = "/usr/bin/" + name
            if os.path.lexists(path):
                os.remove(path)
            os.symlink(target, path)


def agent():
    if not shutil.which("qemu-ga"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        what = "installing qemu-guest-agent (ip_source: qemu-agent; needs a package mirror)"
        if shutil.which("apt-get"):
            run(["apt-get", "update", "-q"], what, env=env)
            run(["apt-get", "install", "-y", "-q", "qemu-guest-agent"], what, env=env)
        elif shutil.which("dnf"):
            run(["dnf", "install", "-y", "qemu-guest-agent"], what)
        elif shutil.which("zypper"):
            run(["zypper", "--non-interactive", "install", "qemu-guest-agent"], what)
        else:
            die(what + ": no apt-get, dnf or zypper in the image")
    run(["systemctl", "enable", "--now", "--no-block", "qemu-guest-agent"],
        "starting qemu-guest-agent")


def bootstrap(src, work):
    script = os.path.join(work, "bootstrap-salt.sh")
    fetch(src["url"], script)
    args = ["-X", "stable", src["version"]] if src.get("version") else ["-X"]
    run(["sh", script] + args, "bootstrap-salt.sh " + " ".join(args))


def onedir(src, work):
    archive = os.path.join(work, "salt.tar")
    fetch(src["url"], archive)
    if src.get("sha256"):
        digest = hashlib.sha256()
        with open(archive, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != src["sha256"]:
            die(f"{src['url']}: sha256 {digest.hexdigest()}, the profile says {src['sha256']}")
    try:
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                parts = m.name.split("/")
                if m.name.startswith("/") or ".." in parts or parts[0] != "salt":
                    die(f"{src['url']}: {m.name[:80]!r} is outside salt/: "
                        "not a Salt onedir tarball")
            os.makedirs(PREFIX, exist_ok=True)
            if hasattr(tarfile, "data_filter"):  # links that leave PREFIX, device files...
                tar.extractall(PREFIX, filter="tar")
            else:
                tar.extractall(PREFIX)
    except (tarfile.TarError, OSError, EOFError) as exc:
        die(f"{src['url']}: not a readable tarball: {exc}")
    binary = os.path.join(PREFIX, "salt", "salt-minion")
    if not os.path.exists(binary):
        die(f"{src['url']}: no salt/salt-minion in it: not a Salt onedir tarball")
    link(binary)


def pip_wheel(url, listing):
    """The URL of the newest pip-*.whl the wheelhouse's listing links, or None."""
    found = []
    for href in re.findall(r"""href=["']?([^"' >]+)""", listing):
        name = urllib.parse.unquote(href.split("?")[0].rstrip("/").rsplit("/", 1)[-1])
        match = re.fullmatch(r"pip-([0-9]+(?:\.[0-9]+)*)-py3[^/]*-none-any\.whl", name)
        if match:
            found.append((tuple(int(p) for p in match.group(1).split(".")), name, href))
    return (max(found)[1], urllib.parse.urljoin(url, max(found)[2])) if found else None


def wheelhouse(src, work):
    listing = fetch(src["url"]).decode("utf-8", "replace")
    venv = os.path.join(PREFIX, "salt")
    os.makedirs(PREFIX, exist_ok=True)
    wheel = pip_wheel(src["url"], listing)
    if wheel is not None:
        # Stock Debian and Ubuntu images have no python3-venv (ensurepip): a
        # venv without pip, and pip run from its own wheel file.
        run([sys.executable, "-m", "venv", "--without-pip", venv], "python3 -m venv --without-pip")
        whl = os.path.join(work, wheel[0])
        fetch(wheel[1], whl)
        pip, extra = [os.path.join(venv, "bin", "python3"), os.path.join(whl, "pip")], ["pip"]
    elif subprocess.run([sys.executable, "-c", "import ensurepip"], capture_output=True).returncode:
        die(f"{src['url']} lists no pip wheel (pip-*.whl) and the image has no python3-venv "
            "to make pip: add one to the wheelhouse (pip download pip -d DIR)")
    else:
        run([sys.executable, "-m", "venv", venv], "python3 -m venv")
        pip, extra = [os.path.join(venv, "bin", "pip")], []
    want = "salt==" + src["version"] if src.get("version") else "salt"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    for name in ("PIP_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE"):
        env.pop(name, None)
    # pip ignores a plain http:// mirror unless its host is trusted by name.
    parts = urllib.parse.urlsplit(src["url"])
    trust = []
    if parts.scheme == "http":
        for name in {parts.hostname, parts.netloc}:
            trust += ["--trusted-host", name]
    run(pip + ["install", "-q", "--no-index", "--timeout", "15", "--find-links", src["url"]]
        + trust + extra + [want], f"pip install {want} from {src['url']}", env=env)
    link(os.path.join(venv, "bin", "salt-minion"))


def main():
    with open(sys.argv[1]) as handle:
        src = json.load(handle)
    if src.get("agent"):
        agent()
    work = tempfile.mkdtemp(prefix="salt-kvm-")
    try:
        {"bootstrap": bootstrap, "onedir": onedir, "wheelhouse": wheelhouse}[src["kind"]](src, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


main()
'''


def guest_files(source: SaltSource) -> list[dict]:
    """The cloud-config ``write_files`` entries that carry the install."""
    settings: dict[str, Any] = {"kind": source.kind, "url": source.url, "agent": source.agent}
    if source.version:
        settings["version"] = source.version
    if source.sha256:
        settings["sha256"] = source.sha256
    return [
        {"path": SOURCE_FILE, "permissions": "0600", "content": json.dumps(settings) + "\n"},
        {"path": INSTALLER, "permissions": "0700", "content": INSTALLER_TEXT},
    ]
