"""salt_kvm.ssh.connect against the stand-in sshd: one TCP connection per
session. sshd forks (and re-executes itself) for every connection: under TCG
a probe that greets and hangs up, then a second connection for the login,
cost a guest ~0.2 s of each deploy."""

import socket
import threading

import pytest

from salt_kvm import ssh
from salt_kvm.errors import TimeoutError_
from tests.integration.sshserver import SshServer

PASSWORD = "stand-in"


def test_the_probe_connection_is_the_session():
    with SshServer(0, "root", PASSWORD) as server:
        with ssh.connect("127.0.0.1", "root", PASSWORD, port=server.port, timeout=10) as session:
            assert session.check("echo hi") == "hi\n"
        assert len(server.transports) == 1


def test_waits_for_sshd_to_greet_then_logs_in():
    """A port that accepts but has not greeted yet (sshd starting) is probed
    again; once the real server listens the session works."""
    with SshServer(0, "root", PASSWORD) as server:
        port = server.port
    # The port is free again: nothing listens for the first probes.
    late = SshServer(port, "root", PASSWORD)
    timer = threading.Timer(1.0, late.__enter__)
    timer.start()
    try:
        with ssh.connect("127.0.0.1", "root", PASSWORD, port=port, timeout=20, interval=0.2) as s:
            assert s.check("echo late") == "late\n"
        assert len(late.transports) == 1
    finally:
        timer.join()
        late.__exit__(None, None, None)


def test_a_port_that_never_greets_times_out():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        port = silent.getsockname()[1]
        with pytest.raises(TimeoutError_, match="did not answer"):
            ssh.connect("127.0.0.1", "root", PASSWORD, port=port, timeout=1.5, interval=0.2)
