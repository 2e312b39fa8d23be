"""The userspace relay of a forward (``[::1]``, IPv6 to an IPv4-only guest)
against loopback sockets: the supervised runner (no systemd) started and
stopped through ``relays.sync``, as the forwards do. The "guest" is an echo
server on 127.0.0.1."""

import contextlib
import os
import pwd
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from salt_kvm.errors import SaltKvmError
from salt_kvm.nat import relays

pytestmark = pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this host")


def free_port(family=socket.AF_INET6, address="::1"):
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


@pytest.fixture
def echo():
    """A TCP echo server on 127.0.0.1 (the guest's IPv4 side); its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def _echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


@pytest.fixture
def runner(tmp_path):
    run_dir = tmp_path / "relay"
    backend = relays.Supervised(run_dir, max_connections=2)
    yield backend
    relays.sync([], backend)  # nothing left behind by a failing test


def talk(port, payload=b"hello through the relay", timeout=10):
    with socket.create_connection(("::1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while data := sock.recv(65536):
            received += data
    return received


def wait_listening(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            talk(port, b"x", timeout=2)
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing answers on [::1]:{port}")


def pid_of(backend, relay):
    return int((backend.run_dir / f"{relay.name}.pid").read_text())


def refused(port):
    with pytest.raises(OSError):
        socket.create_connection(("::1", port), timeout=2).close()
    return True


def test_a_relay_carries_tcp_from_ipv6_loopback_to_the_guests_ipv4(runner, echo):
    relay = relays.Relay("vm1", "::1", free_port(), "127.0.0.1", echo)
    done = relays.sync([relay], runner)
    assert done == [f"relay {relay} started"]
    wait_listening(relay.port)
    payload = os.urandom(300_000)  # more than one read: the pump loops, both ways
    assert talk(relay.port, payload) == payload
    # the listening socket is exactly [::1]:port, IPv6 only: not 127.0.0.1:port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()


@pytest.mark.skipif(os.getuid() != 0, reason="dropping root needs root")
def test_the_relay_runs_as_nobody_and_its_files_are_roots_only(runner, echo):
    relay = relays.Relay("vm1", "::1", free_port(), "127.0.0.1", echo)
    relays.sync([relay], runner)
    wait_listening(relay.port)
    status = Path(f"/proc/{pid_of(runner, relay)}/status").read_text()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    groups = next(line.split()[1:] for line in status.splitlines() if line.startswith("Groups:"))
    nobody = pwd.getpwnam("nobody").pw_uid
    assert uids == [str(nobody)] * 4 and groups == []
    assert runner.run_dir.stat().st_mode & 0o777 == 0o700
    pidfile = runner.run_dir / f"{relay.name}.pid"
    assert pidfile.stat().st_mode & 0o777 == 0o600
    # no shell in between: the process is the relay itself
    cmdline = Path(f"/proc/{pid_of(runner, relay)}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"-I", str(Path(relays.__file__).with_name("relay.py")).encode()]


def test_the_relay_goes_with_its_forward(runner, echo):
    relay = relays.Relay("vm1", "::1", free_port(), "127.0.0.1", echo)
    relays.sync([relay], runner)
    wait_listening(relay.port)
    pid = pid_of(runner, relay)
    assert relays.sync([], runner) == [f"relay {relay.name} stopped"]
    assert not Path(f"/proc/{pid}").exists() or not relays._alive(pid, relay.name)
    assert refused(relay.port)
    assert list(runner.run_dir.iterdir()) == []


def test_a_relay_that_died_is_started_again_by_the_next_sync(runner, echo):
    relay = relays.Relay("vm1", "::1", free_port(), "127.0.0.1", echo)
    relays.sync([relay], runner)
    wait_listening(relay.port)
    os.kill(pid_of(runner, relay), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while relay.name in runner.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relays.sync([relay], runner) == [f"relay {relay} started"]
    wait_listening(relay.port)
    assert talk(relay.port) == b"hello through the relay"


def test_a_new_target_replaces_the_relay(runner, echo):
    port = free_port()
    old = relays.Relay("vm1", "::1", port, "127.0.0.1", free_port(socket.AF_INET, "127.0.0.1"))
    relays.sync([old], runner)
    new = relays.Relay("vm1", "::1", port, "127.0.0.1", echo)
    assert relays.sync([new], runner) == [f"relay {old.name} stopped", f"relay {new} started"]
    wait_listening(port)
    assert runner.running() == {new.name}


def test_connections_are_bounded(runner, echo):
    relay = relays.Relay("vm1", "::1", free_port(), "127.0.0.1", echo)
    relays.sync([relay], runner)
    wait_listening(relay.port)
    held = [socket.create_connection(("::1", relay.port), timeout=5) for _ in range(2)]
    try:
        for sock in held:  # both relayed
            sock.sendall(b"ping")
            assert sock.recv(16) == b"ping"
        with socket.create_connection(("::1", relay.port), timeout=5) as third:
            third.sendall(b"ping")
            try:
                answer = third.recv(16)
            except ConnectionResetError:  # closed with our bytes unread
                answer = b""
            assert answer == b""  # closed at once: over the limit
    finally:
        for sock in held:
            sock.close()


def test_a_port_taken_on_ipv6_loopback_is_an_error_and_nothing_runs(runner, echo):
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as taken:
        relay = relays.Relay("vm1", "::1", taken.getsockname()[1], "127.0.0.1", echo)
        with pytest.raises(SaltKvmError, match=r"cannot listen"):
            relays.sync([relay], runner)
    assert runner.running() == set()


@pytest.mark.skipif(os.getuid() != 0, reason="dropping root needs root")
def test_a_relay_that_cannot_drop_root_is_an_error_and_leaves_nothing(tmp_path, echo):
    backend = relays.Supervised(tmp_path / "relay", user="skrl-no-such-user")
    relay = relays.Relay("vm1", "::1", free_port(), "127.0.0.1", echo)
    with pytest.raises(SaltKvmError, match="did not start"):
        relays.sync([relay], backend)
    assert backend.running() == set() and list(backend.run_dir.iterdir()) == []
    assert refused(relay.port)
