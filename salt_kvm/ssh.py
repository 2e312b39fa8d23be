"""SSH with paramiko: probe until sshd answers, then one session for every
upload and command (one TCP connection and one authentication).

Host keys: a :class:`HostTrust` says which keys a host may present. It is
checked after the key exchange and before any credential is sent, so a
refused host never sees a password or a signature and nothing is written
there. Without one (``trust=None``) the key is accepted: only for a guest
salt-kvm has just created, whose key is new by design (see docs/security.rst).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import socket
import time
from dataclasses import dataclass

import paramiko

from salt_kvm.errors import SaltKvmError, SpecError, TimeoutError_

log = logging.getLogger(__name__)
# How long a connected probe waits for sshd's greeting: a TCG guest's sshd
# forks and re-executes itself first; probing faster must not cut this short.
GREETING_WAIT = 2.0


class AuthError(SaltKvmError):
    """sshd answered but refused the credentials: waiting longer will not help."""


class HostKeyError(SaltKvmError):
    """The host presented a key that is unknown or differs from the trusted one."""


FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}\Z")
HOST_KEY_ACCEPTED = "SHA256:<43 base64 characters> as ssh-keygen -lf prints it, or a list of them"
KNOWN_HOSTS_ACCEPTED = "an absolute path of a readable known_hosts file, or a list of them"
SYSTEM_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "~/.ssh/known_hosts")


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:...`` of a public key, the form ``ssh-keygen -lf`` prints."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _as_list(value: object) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass(frozen=True)
class HostTrust:
    """Pinned fingerprints (when given, only they count), else known_hosts files."""

    pins: tuple[str, ...] = ()
    known_hosts: tuple[str, ...] = ()

    @classmethod
    def build(cls, host_key: object = None, known_hosts: object = None) -> HostTrust:
        """Validate a caller's ``host_key`` and ``known_hosts`` (defaults: the
        system's and the user's known_hosts files)."""
        pins = _as_list(host_key)
        for pin in pins:
            if not isinstance(pin, str) or not FINGERPRINT_RE.match(pin):
                raise SpecError("host_key", f"{pin!r} is not a key fingerprint", HOST_KEY_ACCEPTED)
        files = _as_list(known_hosts)
        for path in files:
            if not isinstance(path, str) or not os.path.isabs(path) or "\n" in path:
                raise SpecError("known_hosts", f"{path!r} is not a file path", KNOWN_HOSTS_ACCEPTED)
            if not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise SpecError("known_hosts", f"cannot read {path!r}", KNOWN_HOSTS_ACCEPTED)
        if not files:
            files = [os.path.expanduser(p) for p in SYSTEM_KNOWN_HOSTS]
        return cls(tuple(pins), tuple(files))

    def apply(self, client: paramiko.SSHClient) -> None:
        if not self.pins:
            for path in self.known_hosts:
                if os.path.isfile(path):
                    client.load_system_host_keys(path)  # read only, never written
        client.set_missing_host_key_policy(_Refuse(self))

    def where(self) -> str:
        if self.pins:
            return "the pinned host_key " + ", ".join(self.pins)
        return "known_hosts (" + ", ".join(self.known_hosts) + ")"


class _Refuse(paramiko.MissingHostKeyPolicy):
    """A key not in known_hosts: accepted only when it matches a pin."""

    def __init__(self, trust: HostTrust):
        self.trust = trust

    def missing_host_key(self, client, hostname, key) -> None:
        found = fingerprint(key)
        if found in self.trust.pins:
            return
        if self.trust.pins:
            raise HostKeyError(
                f"host_key: {hostname} presented {key.get_name()} {found}, not "
                f"{self.trust.where()}; refused before logging in"
            )
        raise HostKeyError(
            f"{hostname} presented an unknown host key {key.get_name()} {found}: it is not in "
            f"{self.trust.where()}; refused before logging in (add the key to known_hosts "
            f"once you have checked it, or pin it with host_key={found})"
        )


class Session:
    def __init__(self, client: paramiko.SSHClient):
        self.client = client
        self._sftp: paramiko.SFTPClient | None = None

    def run(self, command: str, timeout: float = 600) -> tuple[int, str, str]:
        _, stdout, stderr = self.client.exec_command(command, timeout=timeout)
        out = stdout.read().decode(errors="replace")
        err = stderr.read().decode(errors="replace")
        return stdout.channel.recv_exit_status(), out, err

    def check(self, command: str, timeout: float = 600) -> str:
        code, out, err = self.run(command, timeout)
        if code != 0:
            raise SaltKvmError(f"command {command!r} failed with exit code {code}: {err or out}")
        return out

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Write ``data`` to ``path`` with ``mode`` set before any content lands."""
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
        with self._sftp.open(path, "wb") as handle:
            handle.chmod(mode)
            handle.write(data)

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _greeted(host: str, port: int, timeout: float) -> socket.socket | None:
    """A connection to ``host:port`` whose peer has greeted as an SSH server,
    None when nothing greets within ``timeout``. The greeting is peeked, not
    read: the login runs on this same connection (sshd forks and re-executes
    itself for each one, a cost under TCG)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        sock.settimeout(timeout)
        if sock.recv(4, socket.MSG_PEEK).startswith(b"SSH-"):
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _drop(client: paramiko.SSHClient, sock: socket.socket) -> None:
    client.close()
    sock.close()  # closed already when paramiko got as far as a transport


def connect(
    host: str,
    username: str,
    password: str | None = None,
    key_filename: str | None = None,
    allow_agent: bool = False,
    port: int = 22,
    timeout: float = 300,
    interval: float = 0.5,
    trust: HostTrust | None = None,
) -> Session:
    """Wait until sshd on ``host`` greets (probing every ``interval``), check its
    host key against ``trust``, then log in."""
    deadline = time.monotonic() + timeout
    while True:
        sock = _greeted(host, port, max(GREETING_WAIT, interval * 4))
        if sock is None:
            if time.monotonic() >= deadline:
                raise TimeoutError_(f"sshd on {host}:{port} did not answer within {timeout:g}s")
            time.sleep(interval)
            continue
        client = paramiko.SSHClient()
        if trust is None:
            # A guest salt-kvm has just created: its key is new by design.
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # noqa: S507
        else:
            trust.apply(client)
        try:
            client.connect(
                host,
                port=port,
                username=username,
                password=password,
                key_filename=key_filename,
                allow_agent=allow_agent,
                look_for_keys=False,
                sock=sock,
                timeout=10,
                banner_timeout=30,
                auth_timeout=30,
            )
            return Session(client)
        except HostKeyError:
            _drop(client, sock)
            raise
        except paramiko.BadHostKeyException as exc:
            _drop(client, sock)
            where = trust.where() if trust else "the known key"
            raise HostKeyError(
                f"{host}:{port} presented {exc.key.get_name()} {fingerprint(exc.key)}, which "
                f"differs from {where} ({fingerprint(exc.expected_key)}); refused before "
                "logging in"
            ) from None
        except paramiko.AuthenticationException as exc:
            _drop(client, sock)
            raise AuthError(f"SSH login as {username!r} on {host} was refused: {exc}") from exc
        except (paramiko.SSHException, OSError) as exc:
            _drop(client, sock)
            if time.monotonic() >= deadline:
                raise TimeoutError_(f"SSH to {host}:{port} failed: {exc}") from exc
            log.debug("SSH to %s not ready: %s", host, exc)
            time.sleep(interval)
