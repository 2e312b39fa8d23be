"""SSH to a new guest with paramiko: probe until sshd answers, then one session
for every upload and command (one TCP connection and one authentication)."""

from __future__ import annotations

import logging
import socket
import time

import paramiko

from .errors import SaltKvmError, TimeoutError_

log = logging.getLogger(__name__)


class AuthError(SaltKvmError):
    """sshd answered but refused the credentials: waiting longer will not help."""


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


def _port_open(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def connect(
    host: str,
    username: str,
    password: str | None = None,
    key_filename: str | None = None,
    allow_agent: bool = False,
    port: int = 22,
    timeout: float = 300,
    interval: float = 0.5,
) -> Session:
    """Wait until sshd on ``host`` greets (probing every ``interval``), then log in."""
    deadline = time.monotonic() + timeout
    while not _port_open(host, port, min(2.0, interval * 4)):
        if time.monotonic() >= deadline:
            raise TimeoutError_(f"sshd on {host}:{port} did not answer within {timeout:g}s")
        time.sleep(interval)
    while True:
        client = paramiko.SSHClient()
        # New guests have new host keys by design; there is nothing to pin yet.
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # noqa: S507
        try:
            client.connect(
                host,
                port=port,
                username=username,
                password=password,
                key_filename=key_filename,
                allow_agent=allow_agent,
                look_for_keys=False,
                timeout=10,
                banner_timeout=30,
                auth_timeout=30,
            )
            return Session(client)
        except paramiko.AuthenticationException as exc:
            client.close()
            raise AuthError(f"SSH login as {username!r} on {host} was refused: {exc}") from exc
        except (paramiko.SSHException, OSError) as exc:
            client.close()
            if time.monotonic() >= deadline:
                raise TimeoutError_(f"SSH to {host}:{port} failed: {exc}") from exc
            log.debug("SSH to %s not ready: %s", host, exc)
            time.sleep(interval)
