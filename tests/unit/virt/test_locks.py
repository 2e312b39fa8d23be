"""The one lock helper: a checked 0700 directory, no links followed, a bounded
wait, the holder named; and every lock of salt-kvm goes through it."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from salt_kvm.backup import store as bs
from salt_kvm.errors import ConflictError, SaltKvmError
from salt_kvm.images import cache as images
from salt_kvm.nat import store as natstore
from salt_kvm.virt import locks

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def lockdir(tmp_path, monkeypatch):
    folder = tmp_path / "locks"
    monkeypatch.setenv("SALT_KVM_LOCK_DIR", str(folder))
    return folder


@pytest.fixture
def victim(tmp_path):
    target = tmp_path / "precious"
    target.write_text("do not truncate me\n")
    return target


def hold(folder: Path, name: str, what: str):
    """Another process holding lock ``name`` until it is killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from salt_kvm.virt import locks
        with locks.held({name!r}, {what!r}, directory={str(folder)!r}):
            print("held", flush=True)
            time.sleep(120)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_lock_directory_is_created_root_only(lockdir):
    with locks.held("x.lock", "testing") as path:
        assert path.parent == lockdir
        assert (lockdir.stat().st_mode & 0o777) == 0o700
        assert lockdir.stat().st_uid == os.geteuid()
        assert path.read_text() == f"testing pid {os.getpid()}"


def test_symlink_at_the_backup_lock_is_refused_and_its_target_untouched(lockdir, victim):
    lockdir.mkdir(mode=0o700)
    (lockdir / "backup-uuid-1.lock").symlink_to(victim)
    with pytest.raises(SaltKvmError, match="symlink"):
        with bs.domain_locked("uuid-1", "vm", Path("/a")):
            pytest.fail("the lock was taken through a planted link")
    assert victim.read_text() == "do not truncate me\n"


def test_symlink_at_a_store_lock_is_refused(tmp_path, victim):
    store = bs.Store(tmp_path / "dest", "vm")
    store.root.mkdir(parents=True)
    (store.root / bs.LOCK).symlink_to(victim)
    with pytest.raises(SaltKvmError, match="symlink"), store.locked("backup"):
        pytest.fail("the lock was taken through a planted link")
    assert victim.read_text() == "do not truncate me\n"


def test_hard_link_at_the_lock_is_refused(lockdir, victim):
    lockdir.mkdir(mode=0o700)
    os.link(victim, lockdir / "x.lock")
    with pytest.raises(SaltKvmError, match="single link"), locks.held("x.lock", "testing"):
        pass
    assert victim.read_text() == "do not truncate me\n"


def test_lock_directory_that_is_a_symlink_is_refused(lockdir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    lockdir.symlink_to(elsewhere)
    with pytest.raises(SaltKvmError, match="not a directory"), locks.held("x.lock", "t"):
        pass
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("mode", [0o755, 0o1777, 0o770])
def test_lock_directory_open_to_others_is_refused(lockdir, mode):
    lockdir.mkdir()
    os.chmod(lockdir, mode)
    with pytest.raises(SaltKvmError, match=f"mode {mode:04o}; it must be 0700"):
        with locks.held("x.lock", "t"):
            pass
    assert list(lockdir.iterdir()) == []


def test_lock_directory_owned_by_another_user_is_refused(lockdir):
    if os.geteuid() != 0:
        pytest.skip("only root can give a directory away")
    lockdir.mkdir(mode=0o700)
    os.chown(lockdir, 65534, 65534)
    with pytest.raises(SaltKvmError, match="owned by uid 65534"), locks.held("x.lock", "t"):
        pass
    assert list(lockdir.iterdir()) == []


def test_lock_names_cannot_leave_the_directory(lockdir):
    for bad in ("../x.lock", "a/b", "", ".."):
        with pytest.raises(SaltKvmError, match="plain file name"), locks.held(bad, "t"):
            pass


def test_held_lock_times_out_naming_its_holder(lockdir):
    proc = hold(lockdir, "x.lock", "backup into /srv/b")
    try:
        started = time.monotonic()
        with pytest.raises(ConflictError, match=rf"held by backup into /srv/b pid {proc.pid}\)"):
            with locks.held("x.lock", "t", timeout=0.5, busy="busy"):
                pass
        assert 0.5 <= time.monotonic() - started < 5
    finally:
        proc.kill()
        proc.wait()
    with locks.held("x.lock", "t", timeout=5):  # its death released it
        pass


def test_image_cache_lock_is_in_the_lock_directory_and_bounded(lockdir, monkeypatch):
    monkeypatch.setattr(images, "FETCH_LOCK_TIMEOUT", 0.3)
    with images._local_lock("qemu:///system", "default", "k1"):
        [path] = lockdir.iterdir()
        assert "fetching image k1 into pool default" in path.read_text()
    proc = hold(lockdir, path.name, "fetching image k1 into pool default")
    try:
        with pytest.raises(ConflictError, match=rf"fetching image k1 .* pid {proc.pid}\) after"):
            with images._local_lock("qemu:///system", "default", "k1"):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_nat_store_lock_is_in_the_lock_directory(lockdir, tmp_path, victim):
    store = natstore.Store(tmp_path / "nat.json")
    (tmp_path / "nat.lock").symlink_to(victim)  # where the lock used to be
    with store.locked():
        [path] = lockdir.iterdir()
        assert f"writing {store.path}" in path.read_text()
    assert victim.read_text() == "do not truncate me\n"


def test_a_store_lock_owned_by_nobody_works_as_on_a_root_squashing_nas(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can give a file away")
    store = bs.Store(tmp_path / "dest", "vm")
    store.root.mkdir(parents=True)
    (store.root / bs.LOCK).touch()
    os.chown(store.root / bs.LOCK, 65534, 65534)
    with store.locked("backup"):
        assert (store.root / bs.LOCK).read_text() == f"backup pid {os.getpid()}"
