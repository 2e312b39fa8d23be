"""Replication over SSH checks the other host's key before it logs in: an
unknown key, a wrong pin or a changed known_hosts entry is refused with no
credential sent and nothing written there. Against the loopback SSH server
of the integration tier (paramiko, a new host key per server)."""

import paramiko
import pytest

from salt_kvm import ssh
from salt_kvm.backup import ops as backup_ops
from salt_kvm.backup import store as bs
from salt_kvm.errors import SpecError
from tests.functional.backup.points import commit
from tests.integration.sshserver import SshServer

PASSWORD = "s3cret-Replica!"
DOMAIN = "vm1"


@pytest.fixture
def store(tmp_path):
    """One complete point with a small image, as a backup would leave it."""
    dest = tmp_path / "backup"
    store = bs.Store(dest, DOMAIN)
    commit(store, "20260101T000000Z")
    return str(dest)


@pytest.fixture
def server():
    with SshServer(0, "root", PASSWORD) as srv:
        yield srv


@pytest.fixture
def remote(tmp_path):
    return tmp_path / "remote"


def _url(server, remote):
    return f"ssh://root@127.0.0.1:{server.port}{remote}"


def _refused(server, remote):
    """Nothing reached the other host: no login attempt, no folder."""
    assert server.auth_attempts == []
    assert not remote.exists()


def test_an_unknown_host_key_is_refused_before_logging_in(store, server, remote, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(ssh.HostKeyError) as err:
        backup_ops.replicate(
            store, DOMAIN, _url(server, remote), password=PASSWORD, known_hosts=str(empty)
        )
    assert "unknown host key" in str(err.value) and server.fingerprint in str(err.value)
    assert str(empty) in str(err.value)
    _refused(server, remote)


def test_the_default_known_hosts_do_not_know_a_new_host(store, server, remote):
    with pytest.raises(ssh.HostKeyError, match="unknown host key"):
        backup_ops.replicate(store, DOMAIN, _url(server, remote), password=PASSWORD)
    _refused(server, remote)


def test_a_wrong_pin_is_refused_before_logging_in(store, server, remote):
    other = paramiko.RSAKey.generate(1024)
    wrong = ssh.fingerprint(other)
    with pytest.raises(ssh.HostKeyError) as err:
        backup_ops.replicate(store, DOMAIN, _url(server, remote), password=PASSWORD, host_key=wrong)
    assert "host_key" in str(err.value) and wrong in str(err.value)
    assert server.fingerprint in str(err.value)
    _refused(server, remote)


def test_a_changed_key_in_known_hosts_is_refused(store, server, remote, tmp_path):
    other = paramiko.RSAKey.generate(1024)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} ssh-rsa {other.get_base64()}\n")
    with pytest.raises(ssh.HostKeyError, match="differs from known_hosts"):
        backup_ops.replicate(
            store, DOMAIN, _url(server, remote), password=PASSWORD, known_hosts=str(known)
        )
    _refused(server, remote)


def test_a_pinned_or_known_key_is_trusted(store, server, remote, tmp_path):
    sent = backup_ops.replicate(
        store, DOMAIN, _url(server, remote), password=PASSWORD, host_key=[server.fingerprint]
    )
    assert sent["copied"] == ["20260101T000000Z"]
    assert (remote / DOMAIN / "20260101T000000Z" / bs.MANIFEST).is_file()
    known = tmp_path / "known_hosts"
    known.write_text(server.known_hosts_line())
    again = backup_ops.replicate(
        store, DOMAIN, _url(server, remote), password=PASSWORD, known_hosts=str(known)
    )
    assert again["copied"] == [] and again["already_there"] == ["20260101T000000Z"]


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"host_key": "MD5:aa:bb"}, "host_key"),
        ({"host_key": "SHA256:short"}, "host_key"),
        ({"host_key": ["SHA256:" + "A" * 43, 5]}, "host_key"),
        ({"known_hosts": "relative/known_hosts"}, "known_hosts"),
        ({"known_hosts": "/nonexistent/known_hosts"}, "known_hosts"),
    ],
)
def test_bad_trust_arguments_are_refused_by_name(store, server, remote, args, key):
    with pytest.raises(SpecError) as err:
        backup_ops.replicate(store, DOMAIN, _url(server, remote), password=PASSWORD, **args)
    assert err.value.key == key and err.value.accepted
    _refused(server, remote)


def test_a_password_in_the_target_url_is_refused(store, server, remote):
    url = f"ssh://root:{PASSWORD}@127.0.0.1:{server.port}{remote}"
    with pytest.raises(SpecError) as err:
        backup_ops.replicate(store, DOMAIN, url, host_key=server.fingerprint)
    assert err.value.key == "target" and PASSWORD not in str(err.value)
    _refused(server, remote)


def test_a_deploy_with_known_hosts_file_checks_the_guest_key(server, tmp_path):
    """salt-cloud's ``known_hosts_file``: the guest's key must be in it."""
    from salt_kvm.cloud import deploy as cloud_deploy
    from salt_kvm.cloud.spec import build_spec

    known = tmp_path / "known_hosts"
    known.write_text("")
    values = {"name": "vm1", "base_domain": "base", "password": PASSWORD}
    spec = build_spec({**values, "known_hosts_file": str(known), "ssh_port": server.port})
    trust = cloud_deploy.host_trust(spec)
    with pytest.raises(ssh.HostKeyError, match="unknown host key"):
        ssh.connect("127.0.0.1", "root", PASSWORD, port=server.port, timeout=5, trust=trust)
    assert server.auth_attempts == []
    known.write_text(server.known_hosts_line())
    with ssh.connect("127.0.0.1", "root", PASSWORD, port=server.port, timeout=5, trust=trust):
        pass
    assert cloud_deploy.host_trust(build_spec(values)) is None  # a fresh guest: new key
    from salt.exceptions import SaltCloudConfigError

    from salt_kvm.errors import SpecError
    from salt_kvm.saltutil import cloud_errors

    missing = build_spec({**values, "known_hosts_file": str(tmp_path / "nope")})
    with pytest.raises(SpecError, match="known_hosts_file: cannot read"):
        cloud_deploy.host_trust(missing)
    # the driver's translation: a configuration error, by the profile's key
    with pytest.raises(SaltCloudConfigError, match="known_hosts_file: cannot read"):
        with cloud_errors():
            cloud_deploy.host_trust(missing)
