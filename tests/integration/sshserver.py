"""A small SSH server on 127.0.0.1 (paramiko): password login, ``exec`` through
the shell and SFTP on the local file system. It stands in for a second
hypervisor's sshd in the takeover test: the test machine runs no sshd, and
the network rule keeps the tests on loopback. Its host key is new each time:
``fingerprint`` and ``known_hosts_line()`` let a test pin or know it, and
``auth_attempts`` shows whether a client ever sent credentials."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import threading

import paramiko

OK = paramiko.SFTP_OK
LOG_CHANNEL = "tests.sshserver"
logging.getLogger(LOG_CHANNEL).setLevel(logging.CRITICAL)


class _SftpHandle(paramiko.SFTPHandle):
    def stat(self):
        try:
            return paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)

    def chattr(self, attr):
        try:
            paramiko.SFTPServer.set_file_attr(self.filename, attr)
            return OK
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)


class _Sftp(paramiko.SFTPServerInterface):
    """Plain paths of the local file system, as the SSH user (root) sees them."""

    def _errno(self, exc):
        return paramiko.SFTPServer.convert_errno(exc.errno)

    def canonicalize(self, path):
        return os.path.normpath(path if os.path.isabs(path) else "/" + path)

    def list_folder(self, path):
        try:
            out = []
            for name in os.listdir(path):
                attr = paramiko.SFTPAttributes.from_stat(os.stat(os.path.join(path, name)))
                attr.filename = name
                out.append(attr)
            return out
        except OSError as exc:
            return self._errno(exc)

    def stat(self, path):
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(path))
        except OSError as exc:
            return self._errno(exc)

    lstat = stat

    def open(self, path, flags, attr):
        try:
            mode = getattr(attr, "st_mode", None) or 0o600
            fd = os.open(path, flags, mode)
        except OSError as exc:
            return self._errno(exc)
        if flags & os.O_WRONLY:
            fmode = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            fmode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            fmode = "rb"
        handle = _SftpHandle(flags)
        handle.filename = path
        handle.readfile = handle.writefile = os.fdopen(fd, fmode)
        return handle

    def remove(self, path):
        try:
            os.remove(path)
            return OK
        except OSError as exc:
            return self._errno(exc)

    def rename(self, old, new):
        try:
            os.rename(old, new)
            return OK
        except OSError as exc:
            return self._errno(exc)

    def mkdir(self, path, attr):
        try:
            os.mkdir(path, getattr(attr, "st_mode", None) or 0o700)
            return OK
        except OSError as exc:
            return self._errno(exc)

    def rmdir(self, path):
        try:
            os.rmdir(path)
            return OK
        except OSError as exc:
            return self._errno(exc)

    def chattr(self, path, attr):
        try:
            paramiko.SFTPServer.set_file_attr(path, attr)
            return OK
        except OSError as exc:
            return self._errno(exc)


def _mark_replies(transport: paramiko.Transport) -> dict[int, threading.Event]:
    """Channel id -> an event set once the transport has acknowledged a request
    on it (MSG_CHANNEL_SUCCESS). paramiko sends that reply only after
    ``check_channel_exec_request`` returns: a command thread that closed its
    channel first made the client's ``exec_command`` fail with "Channel
    closed." (about 1 exec in 400 here, more under load)."""
    replied: dict[int, threading.Event] = {}
    send = transport._send_user_message

    def send_and_mark(message: paramiko.Message) -> None:
        send(message)
        data = message.asbytes()
        if data[:1] == paramiko.common.cMSG_CHANNEL_SUCCESS:
            replied.setdefault(int.from_bytes(data[1:5], "big"), threading.Event()).set()

    transport._send_user_message = send_and_mark  # type: ignore[method-assign]
    return replied


class _Server(paramiko.ServerInterface):
    def __init__(self, user: str, password: str, attempts: list, replied: dict):
        self.user, self.password, self.attempts = user, password, attempts
        self.replied = replied

    def get_allowed_auths(self, username):
        return "password"

    def check_auth_none(self, username):
        self.attempts.append((username, None))
        return paramiko.AUTH_FAILED

    def check_auth_password(self, username, password):
        self.attempts.append((username, "password"))
        if (username, password) == (self.user, self.password):
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel, command):
        replied = self.replied.setdefault(channel.remote_chanid, threading.Event())
        replied.clear()  # set by an earlier request on a channel of the same id
        threading.Thread(target=_execute, args=(channel, command, replied), daemon=True).start()
        return True


def _execute(channel, command: bytes, replied: threading.Event) -> None:
    # Output and close only after the client has its reply to the exec request.
    replied.wait(10)
    proc = subprocess.run(command.decode(), shell=True, capture_output=True, check=False)
    channel.sendall(proc.stdout)
    channel.sendall_stderr(proc.stderr)
    channel.send_exit_status(proc.returncode)
    channel.close()


class SshServer:
    """``with SshServer(port, user, password): ...`` serves until the block ends
    (port 0: any free port, in ``port`` once entered)."""

    def __init__(self, port: int, user: str, password: str):
        self.port, self.user, self.password = port, user, password
        self.key = paramiko.RSAKey.generate(2048)
        self.auth_attempts: list[tuple[str, str | None]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.transports: list[paramiko.Transport] = []
        self.stopped = threading.Event()

    def __enter__(self) -> SshServer:
        self.sock.bind(("127.0.0.1", self.port))
        self.port = self.sock.getsockname()[1]
        self.sock.listen(5)
        self.sock.settimeout(0.5)
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        transport = paramiko.Transport(conn)
        transport.set_log_channel(LOG_CHANNEL)  # ssh.connect's probes just close: no noise
        transport.add_server_key(self.key)
        transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _Sftp)
        self.transports.append(transport)
        with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
            # ssh.connect's probes just close
            transport.start_server(
                server=_Server(
                    self.user, self.password, self.auth_attempts, _mark_replies(transport)
                )
            )

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` of the host key, as ``ssh-keygen -lf`` prints it."""
        digest = hashlib.sha256(self.key.asbytes()).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def known_hosts_line(self) -> str:
        host = "127.0.0.1" if self.port == 22 else f"[127.0.0.1]:{self.port}"
        return f"{host} {self.key.get_name()} {self.key.get_base64()}\n"

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for transport in self.transports:
            with contextlib.suppress(Exception):
                transport.close()
        self.sock.close()
