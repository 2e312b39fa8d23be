"""kvm_backup's other hypervisors by name (``kvm:hosts``) through Salt's
loader: replicate and copies to a host name, takeover's replica folder and
the hosts it asks; unknown names refused listing the configured ones, before
anything runs; the SSH password read from the key an entry names."""

import pytest
from salt.exceptions import CommandExecutionError

from tests.unit.loader import load, never, no_connection

kvm_backup = load("modules", "kvm_backup")

SECRET = "s3cret-from-pillar"
HOSTS = {
    "kvm1": {"uri": "qemu+ssh://root@kvm1/system", "backup": "ssh://root@kvm1/srv/replica"},
    "kvm2": {
        "uri": "qemu+ssh://root@kvm2/system",
        "backup": "ssh://backup@kvm2:2222/srv/replica",
        "host_key": "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s",
        "password_pillar": "kvm:backup:ssh_password",
    },
    "kvm3": "qemu+ssh://root@kvm3/system",
}


def _config_get(key, default=None):
    return {"kvm:backup:ssh_password": SECRET}.get(key, default)


@pytest.fixture
def configure_loader_modules():
    return {
        kvm_backup: {
            "__opts__": {"id": "kvm2"},
            "__pillar__": {"kvm": {"hosts": HOSTS}},
            "__salt__": {"config.get": _config_get},
            "connection_for": no_connection,
        }
    }


@pytest.fixture
def sent(monkeypatch):
    calls = []

    def replicate(dest, domain, target, **kwargs):
        calls.append({"target": target, **kwargs})
        return {"target": target, "copied": []}

    monkeypatch.setattr(kvm_backup.backup_ops, "replicate", replicate)
    return calls


def test_replicate_to_a_host_by_name_takes_its_entry(sent):
    kvm_backup.replicate("web1", "/srv/backup", host="kvm2")
    (call,) = sent
    assert call["target"] == "ssh://backup@kvm2:2222/srv/replica"
    assert call["host_key"] == HOSTS["kvm2"]["host_key"] and call["password"] == SECRET
    kvm_backup.replicate("web1", "/srv/backup", "kvm1", key_filename="/root/.ssh/k")
    assert sent[1]["target"] == "ssh://root@kvm1/srv/replica"
    assert sent[1]["key_filename"] == "/root/.ssh/k" and sent[1]["password"] is None


def test_an_unknown_host_or_one_without_a_replica_folder_is_refused_by_name(sent):
    with pytest.raises(
        CommandExecutionError,
        match=r"^host: 'kvm9' is not a host of kvm:hosts \(accepted: kvm1, kvm2, kvm3\)$",
    ):
        kvm_backup.replicate("web1", "/srv/backup", host="kvm9")
    with pytest.raises(CommandExecutionError, match=r"^kvm:hosts:kvm3:backup: host kvm3 has no"):
        kvm_backup.replicate("web1", "/srv/backup", host="kvm3")
    with pytest.raises(CommandExecutionError, match=r"give target or host, not both"):
        kvm_backup.replicate("web1", "/srv/backup", "/mnt/x", host="kvm1")
    with pytest.raises(CommandExecutionError, match=r"^replicate: no target"):
        kvm_backup.replicate("web1", "/srv/backup")
    assert sent == []


def test_copies_name_hosts_and_an_unknown_one_is_refused_before_the_backup(sent, monkeypatch):
    monkeypatch.setattr(kvm_backup.backup, "create", never)
    with pytest.raises(CommandExecutionError, match=r"^copies: host: 'kvm9' is not a host"):
        kvm_backup.create("web1", "/srv/backup", copies=["kvm1", {"host": "kvm9"}])
    monkeypatch.setattr(kvm_backup.backup, "create", lambda conn, *a, **k: {"point": "p"})
    kvm_backup.create("web1", "/srv/backup", copies=["kvm1", {"host": "kvm2", "keep": 30}], keep=7)
    assert [(c["target"], c["keep"]) for c in sent] == [
        ("ssh://root@kvm1/srv/replica", 7),
        ("ssh://backup@kvm2:2222/srv/replica", 30),
    ]
    assert sent[1]["password"] == SECRET and "password_pillar" not in sent[1]


@pytest.fixture
def taken(monkeypatch):
    calls = []

    def takeover(conn, domain, dest, **kwargs):
        calls.append({"domain": domain, "dest": dest, **kwargs})
        return {"domain": domain}

    monkeypatch.setattr(kvm_backup.takeovers, "takeover", takeover)
    return calls


def test_takeover_reads_this_hosts_replica_folder_and_asks_the_others(taken):
    kvm_backup.takeover("web1")
    (call,) = taken
    assert call["dest"] == "/srv/replica"  # kvm2's own backup folder (its minion id)
    assert call["peers"] == {
        "kvm1": "qemu+ssh://root@kvm1/system",
        "kvm3": "qemu+ssh://root@kvm3/system",
    }
    assert call["force"] is False and call["timeout"] == 10 and call["start"] is True
    kvm_backup.takeover("web1", dest="/mnt/other", host="kvm1", timeout=3)
    assert taken[1]["dest"] == "/mnt/other" and set(taken[1]["peers"]) == {"kvm2", "kvm3"}


def test_takeover_refuses_an_unknown_host_and_a_bad_timeout_first(taken):
    with pytest.raises(CommandExecutionError, match=r"^host: 'kvm9' is not a host"):
        kvm_backup.takeover("web1", host="kvm9")
    with pytest.raises(CommandExecutionError, match=r"^timeout: -1 is not a number of seconds"):
        kvm_backup.takeover("web1", timeout=-1)
    with pytest.raises(CommandExecutionError, match=r"^kvm:hosts:kvm3:backup: host kvm3 has no"):
        kvm_backup.takeover("web1", host="kvm3")
    assert taken == []


def test_a_password_in_a_hosts_entry_is_refused_and_never_shown(sent, monkeypatch):
    monkeypatch.setitem(
        kvm_backup.__pillar__,
        "kvm",
        {"hosts": {"kvm2": {"backup": "ssh://root@kvm2/srv/r", "password": SECRET}}},
    )
    with pytest.raises(CommandExecutionError) as err:
        kvm_backup.replicate("web1", "/srv/backup", host="kvm2")
    assert "kvm:hosts:kvm2:password" in str(err.value) and "password_pillar" in str(err.value)
    assert SECRET not in str(err.value)
    assert sent == []
