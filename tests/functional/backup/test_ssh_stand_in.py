"""The stand-in sshd of the SSH backup tests (tests/integration/sshserver.py)
answers every command: a copy runs dozens in a row, and one lost reply failed a
whole test with "Channel closed." (1 exec in 80 under the fast lane's load,
before its command threads waited for the exec request's reply)."""

from salt_kvm import ssh
from tests.integration.sshserver import SshServer

PASSWORD = "stand-in"
RUNS = 80


def test_every_command_in_a_row_gets_its_answer():
    with SshServer(0, "root", PASSWORD) as server:
        with ssh.connect("127.0.0.1", "root", PASSWORD, port=server.port, timeout=10) as session:
            answers = [session.check(f"echo {i}") for i in range(RUNS)]
    assert answers == [f"{i}\n" for i in range(RUNS)]
