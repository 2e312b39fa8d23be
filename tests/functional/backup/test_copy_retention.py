"""Second copies keep the retention they are given, in whole chains, and never
pull a chain away from under a run that holds the copy's lock (a takeover
restoring from it, a prune or a backup there). Real stores in temporary
folders; SSH copies go to the loopback SSH server of the integration tier."""

import pytest

from salt_kvm.backup import ops as backup_ops
from salt_kvm.backup import store as bs
from salt_kvm.errors import ConflictError, SaltKvmError
from tests.functional.backup.points import commit
from tests.integration.sshserver import SshServer

PASSWORD = "s3cret-Replica!"
DOMAIN = "vm1"
# two chains: A (full, incremental), B (full, incremental)
A, A1, B, B1 = "20260101T000000Z", "20260102T000000Z", "20260108T000000Z", "20260109T000000Z"


@pytest.fixture
def source(tmp_path):
    dest = tmp_path / "backup"
    store = bs.Store(dest, DOMAIN)
    commit(store, A)
    commit(store, A1, A, A)
    commit(store, B)
    commit(store, B1, B, B)
    return str(dest)


@pytest.fixture
def server():
    with SshServer(0, "root", PASSWORD) as srv:
        yield srv


def held_copy(where):
    """The copy's store lock, as a restore from it on that host holds it."""
    return bs.Store(where, DOMAIN).locked("restore of vm1 (takeover)")


def on_copy(where):
    return [p["id"] for p in backup_ops.list_points(str(where), DOMAIN)]


def test_a_folder_copy_keeps_whole_chains_and_waits_for_a_run_holding_it(source, tmp_path):
    copy = tmp_path / "copy"
    backup_ops.replicate(source, DOMAIN, str(copy))
    with held_copy(copy), pytest.raises(ConflictError, match="holds the backup lock"):
        backup_ops.replicate(source, DOMAIN, str(copy), keep=1)
    assert on_copy(copy) == [A, A1, B, B1]  # nothing pulled from under the run
    sent = backup_ops.replicate(source, DOMAIN, str(copy), keep=1)
    assert sent["pruned"] == [A, A1] and on_copy(copy) == [B, B1]


def test_an_ssh_copy_is_pruned_in_whole_chains_never_under_a_run_holding_it(
    source, server, tmp_path
):
    remote = tmp_path / "remote"
    url = f"ssh://root@127.0.0.1:{server.port}{remote}"
    trust = {"password": PASSWORD, "host_key": server.fingerprint}
    assert backup_ops.replicate(source, DOMAIN, url, **trust)["copied"] == [A, A1, B, B1]
    with held_copy(remote), pytest.raises(ConflictError, match="another run holds its backup"):
        backup_ops.replicate(source, DOMAIN, url, keep=1, **trust)
    assert on_copy(remote) == [A, A1, B, B1]  # the chain a takeover reads is still there
    sent = backup_ops.replicate(source, DOMAIN, url, keep=1, **trust)
    assert sent["pruned"] == [A, A1] and on_copy(remote) == [B, B1]
    assert backup_ops.verify(str(remote), DOMAIN)["ok"]  # B1's full stayed with it


@pytest.fixture
def blake2b_source(tmp_path):
    """A chain whose images carry BLAKE2b digests (a host without SHA-256
    instructions wrote it), the incremental's image changed after its run."""
    dest = tmp_path / "b2"
    store = bs.Store(dest, DOMAIN)
    commit(store, A, algorithm=bs.BLAKE2B)
    commit(store, A1, A, A, algorithm=bs.BLAKE2B)
    return dest, store


def _tamper(store, pid):
    with open(store.path(pid, "vda.qcow2"), "r+b") as handle:
        handle.seek(60000)  # in the header cluster, past its end: still a sound image
        handle.write(b"\xff")


def test_a_blake2b_chain_is_copied_and_checked_in_its_own_algorithm(
    blake2b_source, server, tmp_path
):
    dest, store = blake2b_source
    assert store.point(A1).disks["vda"].algorithm == bs.BLAKE2B
    assert backup_ops.verify(str(dest), DOMAIN)["ok"]
    remote = tmp_path / "remote"
    url = f"ssh://root@127.0.0.1:{server.port}{remote}"
    trust = {"password": PASSWORD, "host_key": server.fingerprint}
    assert backup_ops.replicate(str(dest), DOMAIN, str(tmp_path / "copy"))["copied"] == [A, A1]
    assert backup_ops.replicate(str(dest), DOMAIN, url, **trust)["copied"] == [A, A1]  # b2sum
    for where in (tmp_path / "copy", remote):
        assert backup_ops.verify(str(where), DOMAIN)["ok"]
        assert bs.Store(where, DOMAIN).point(A1).disks["vda"].algorithm == bs.BLAKE2B

    _tamper(store, A1)
    report = backup_ops.verify(str(dest), DOMAIN)
    assert report["ok"] is False
    assert report["problems"][A1] == [f"{A1}/vda.qcow2: checksum mismatch"]
    for target in (str(tmp_path / "copy2"), f"ssh://root@127.0.0.1:{server.port}{remote}2"):
        with pytest.raises(SaltKvmError, match=f"copy of {A1}/vda.qcow2"):
            backup_ops.replicate(str(dest), DOMAIN, target, **(trust if "ssh" in target else {}))
