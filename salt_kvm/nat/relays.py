"""Userspace relays for what the kernel cannot DNAT, kept in step with the forwards.

nft carries a forward on 127.0.0.1, on the host's IPv4 addresses and (to a
guest with a DHCPv6 lease) on the host's IPv6 addresses. Two cases it cannot:

- ``[::1]``: the kernel drops a packet with a loopback source that would leave
  ``lo``, and IPv6 has no ``route_localnet``;
- IPv6 to an IPv4-only guest: nft does not translate between the families.

For those, a TCP relay listens on exactly the forward's address and port and
connects to the guest's IPv4 address. ``planned`` decides which (pure), and
``sync`` makes the running set match, from the same code path that writes
the table (``forwards.sync_kernel``: every apply, add, remove, reapply and
libvirt hook), so a relay starts and goes with its forward. Who runs them:

- systemd (``/run/systemd/system`` exists): a transient socket unit and
  ``systemd-socket-proxyd`` behind it (``systemd-run --socket-property``),
  with a dynamic user; systemd binds the address, the proxy never is root.
- otherwise: ``relay.py`` under this module's supervision; this process binds
  (as root) and hands the socket over, the relay drops to ``nobody``; a
  pidfile per relay under ``/run/salt-kvm/relay`` (0700, files 0600). A relay
  that died is started again by the next ``sync`` (``kvm_nat.reapply``, a hook).

UDP forwards get no relay (TCP only).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from salt_kvm.errors import SaltKvmError
from salt_kvm.nat import rules as nat

log = logging.getLogger(__name__)

PREFIX = "salt-kvm-relay-"
RUN_DIR = Path("/run/salt-kvm/relay")
USER = "nobody"
MAX_CONNECTIONS = 64
SYSTEMD_MARKER = Path("/run/systemd/system")
PROXYD = ("/usr/lib/systemd/systemd-socket-proxyd", "/lib/systemd/systemd-socket-proxyd")
STOP_WAIT = 5.0
START_WAIT = 10.0


@dataclass(frozen=True, order=True)
class Relay:
    """``[listen]:port`` on the host → ``target:target_port`` (the guest's IPv4)."""

    domain: str
    listen: str
    port: int
    target: str
    target_port: int

    @property
    def name(self) -> str:
        """Unique per relay and changes with anything in it: a changed target is
        a new relay (the old one is stopped, the new one started)."""
        spec = f"{self.domain}|{self.listen}|{self.port}|{self.target}|{self.target_port}"
        digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.domain)[:40]
        return f"{PREFIX}{safe}-{self.port}-{digest}"

    @property
    def to(self) -> str:
        return f"{self.target}:{self.target_port}"

    def __str__(self) -> str:
        return f"[{self.listen}]:{self.port} -> {self.to}"


def planned(forwards: Iterable[nat.Forward], bridge6: dict[str, list[str]]) -> list[Relay]:
    """The relays the forwards need.

    ``[::1]`` for every TCP forward that listens on 127.0.0.1 (the default, or
    every address); for a default forward to a guest without an IPv6 address,
    also the IPv6 host addresses of its own network's bridge (``bridge6``:
    bridge → addresses), the IPv6 addresses that forward would answer on from
    the host and that network's guests. Other IPv6 addresses of the host are
    relayed only when the operator names one (``host_address``) or ``::``:
    a listening socket there answers other machines too.
    """
    found = set()
    for forward in forwards:
        rule = forward.rule
        if rule.proto != "tcp":
            continue
        for address in _listens(forward, bridge6):
            found.add(Relay(forward.domain, address, rule.host, forward.address, rule.guest))
    return sorted(found)


def _listens(forward: nat.Forward, bridge6: dict[str, list[str]]) -> list[str]:
    """The IPv6 addresses a relay of ``forward`` listens on: ``::1`` where the
    forward listens on loopback, and what the ip6 table cannot DNAT for a
    guest without an IPv6 address (its bridge's addresses for a default
    forward; the one IPv6 host_address, or every one for ``::``)."""
    address = forward.rule.host_address
    if address in (None, nat.EVERY):
        dual = bool(forward.address6) or address == nat.EVERY
        return [nat.LOOPBACK6, *([] if dual else bridge6.get(forward.bridge, []))]
    if not forward.rule.ipv6_only:
        return []  # one IPv4 address
    if address == nat.LOOPBACK6 or not forward.address6:
        return [address]  # [::1]; or [::] (::1 with it) / [A] to an IPv4-only guest
    return [nat.LOOPBACK6] if address == nat.EVERY6 else []


# ---- systemd: a transient socket unit and systemd-socket-proxyd ------------------


def systemd_proxyd() -> str | None:
    """systemd-socket-proxyd, when systemd runs this host."""
    if not SYSTEMD_MARKER.is_dir() or shutil.which("systemd-run") is None:
        return None
    return next((p for p in PROXYD if Path(p).exists()), None)


def systemd_run_argv(
    relay: Relay, proxyd: str, max_connections: int = MAX_CONNECTIONS
) -> list[str]:
    """``systemd-run`` for one relay: systemd binds exactly ``[listen]:port``
    (IPv6 only) and starts the proxy on the first connection, as a dynamic
    user with no privileges, pointed at the one target."""
    return [
        "systemd-run",
        f"--unit={relay.name}",
        "--collect",
        "--quiet",
        f"--description=salt-kvm forward relay {relay}",
        f"--socket-property=ListenStream=[{relay.listen}]:{relay.port}",
        "--socket-property=BindIPv6Only=ipv6-only",
        "--socket-property=FreeBind=no",
        "--property=DynamicUser=yes",
        "--property=NoNewPrivileges=yes",
        "--property=ProtectSystem=strict",
        "--property=ProtectHome=yes",
        "--property=PrivateTmp=yes",
        "--property=PrivateDevices=yes",
        "--property=CapabilityBoundingSet=",
        "--property=RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        f"--property=TasksMax={max_connections + 8}",
        "--property=MemoryMax=64M",
        "--",
        proxyd,
        f"--connections-max={max_connections}",
        relay.to,
    ]


class Systemd:
    def __init__(self, proxyd: str):
        self.proxyd = proxyd

    def running(self) -> set[str]:
        proc = subprocess.run(
            ["systemctl", "list-units", "--plain", "--no-legend", "--type=socket", f"{PREFIX}*"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return {
            line.split()[0].removesuffix(".socket")
            for line in proc.stdout.splitlines()
            if line.split()
        }

    def start(self, relay: Relay) -> None:
        proc = subprocess.run(
            systemd_run_argv(relay, self.proxyd), capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            raise SaltKvmError(f"relay {relay}: systemd-run failed: {proc.stderr.strip()}")

    def stop(self, name: str) -> None:
        subprocess.run(
            ["systemctl", "stop", f"{name}.socket", f"{name}.service"],
            capture_output=True,
            timeout=60,
        )


# ---- without systemd: relay.py, supervised by pidfiles ----------------------------


def listening_socket(listen: str, port: int) -> socket.socket:
    """Exactly ``[listen]:port``, IPv6 only: what the relay is handed."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


class Supervised:
    """relay.py processes, one pidfile each; a pid counts only while its
    command line still names the relay (a reused pid is never signalled)."""

    def __init__(
        self,
        run_dir: Path | str = RUN_DIR,
        user: str = USER,
        max_connections: int = MAX_CONNECTIONS,
    ):
        self.run_dir = Path(run_dir)
        self.user = user
        self.max_connections = max_connections

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _recorded(self, name: str) -> int | None:
        try:
            return int(self._pidfile(name).read_text().strip())
        except (OSError, ValueError):
            return None

    def _pid(self, name: str) -> int | None:
        pid = self._recorded(name)
        return pid if pid is not None and _alive(pid, name) else None

    def running(self) -> set[str]:
        if not self.run_dir.is_dir():
            return set()
        found = set()
        for path in sorted(self.run_dir.glob(f"{PREFIX}*.pid")):
            name = path.name.removesuffix(".pid")
            if self._pid(name) is not None:
                found.add(name)
                continue
            # died (killed, host trouble): the next sync starts it again, once
            # the dying process has let go of its port
            pid = self._recorded(name)
            if pid is not None:
                _settle(pid)
            path.unlink(missing_ok=True)
        return found

    def argv(self, relay: Relay, fd: int, ready: int) -> list[str]:
        program = str(Path(__file__).with_name("relay.py"))
        return [
            sys.executable,
            "-I",
            program,
            "--name",
            relay.name,
            "--fd",
            str(fd),
            "--ready",
            str(ready),
            "--to",
            relay.to,
            "--user",
            self.user,
            "--max-connections",
            str(self.max_connections),
        ]

    def start(self, relay: Relay) -> None:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        try:
            sock = listening_socket(relay.listen, relay.port)
        except OSError as exc:
            raise SaltKvmError(f"relay {relay}: cannot listen: {exc}") from exc
        ready, tell = os.pipe()
        with sock, os.fdopen(ready, "rb") as answer:
            try:
                proc = subprocess.Popen(
                    self.argv(relay, sock.fileno(), tell),
                    pass_fds=(sock.fileno(), tell),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # not in the caller's session: a hook's exit leaves it
                    cwd="/",
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"},
                )
            finally:
                os.close(tell)
            _started(proc, relay, answer)
        path = self._pidfile(relay.name)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{proc.pid}\n")
        tmp.replace(path)

    def stop(self, name: str) -> None:
        pid = self._pid(name)
        if pid is not None:
            _terminate(pid, name)
        self._pidfile(name).unlink(missing_ok=True)


def _started(proc: subprocess.Popen, relay: Relay, answer: BinaryIO) -> None:
    """Wait for the relay's word that it runs as its user and serves; a relay
    that exits first (it could not drop root, say) is an error."""
    ready, _, _ = select.select([answer], [], [], START_WAIT)
    if ready and answer.read(1) == b"1":
        return
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
    raise SaltKvmError(f"relay {relay}: did not start (status {proc.returncode})")


def _alive(pid: int, name: str) -> bool:
    """``pid`` runs (not a zombie) and is the relay called ``name``."""
    _reap(pid)
    proc = Path(f"/proc/{pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and b"--name" in cmdline and name.encode() in cmdline


def _reap(pid: int) -> None:
    """Collect our own child's exit status (a relay this process started)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _exited(pid: int) -> bool:
    """Gone or a zombie: its sockets are closed. (Its command line empties
    earlier, while it exits and still holds them.)"""
    _reap(pid)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _settle(pid: int) -> None:
    """Wait (boundedly) while ``pid`` is exiting: its command line is already
    empty then, but its sockets are still open."""
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline and not _exited(pid):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes():
                return  # another process that took the pid: not ours to wait for
        except OSError:
            return
        time.sleep(0.02)


def _terminate(pid: int, name: str) -> None:
    """SIGTERM, then SIGKILL; returns once the relay's port is free again."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        if _exited(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    while not _exited(pid):
        time.sleep(0.05)


# ---- keeping the running set in step -------------------------------------------


def runner() -> Systemd | Supervised:
    """systemd where it runs the host; the supervised relay otherwise.
    ``SALT_KVM_RELAY_DIR`` moves the pidfiles (tests)."""
    proxyd = systemd_proxyd()
    if proxyd is not None and "SALT_KVM_RELAY_DIR" not in os.environ:
        return Systemd(proxyd)
    return Supervised(os.environ.get("SALT_KVM_RELAY_DIR") or RUN_DIR)


def sync(wanted: list[Relay], backend: Systemd | Supervised | None = None) -> list[str]:
    """Stop the relays not wanted (first: their ports are free again), start
    the missing ones. A relay that cannot start is an error after the rest
    is done (its forward would be dead on that address)."""
    backend = backend or runner()
    by_name = {r.name: r for r in wanted}
    running = backend.running()
    done = []
    for name in sorted(running - set(by_name)):
        backend.stop(name)
        done.append(f"relay {name} stopped")
    failed = []
    for name in sorted(set(by_name) - running):
        try:
            backend.start(by_name[name])
        except (OSError, SaltKvmError) as exc:
            failed.append(str(exc))
            continue
        done.append(f"relay {by_name[name]} started")
    if failed:
        raise SaltKvmError("; ".join(failed))
    return done
