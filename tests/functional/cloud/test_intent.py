"""After a SIGKILL no rollback runs: what the killed create wrote down before
making each thing is undone by the next create of the name (issue #13 item 11)."""

import subprocess
import sys

import pytest

from salt_kvm.cloud import intent, provision
from salt_kvm.errors import ConflictError, SaltKvmError
from salt_kvm.virt.rollback import Rollback
from tests.functional.cloud.test_provision import spec, state

NIC = {"network": "default", "mac": "52:54:00:12:34:56", "ip": "192.168.122.60"}


def killed(journal):
    """Make ``journal`` look like a run whose process is gone."""
    owner, records = journal.read()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [f'{{"owner": {{"pid": {int(dead.stdout)}, "start": "1"}}}}']
    journal.path.write_text("\n".join(lines) + "\n" + journal.path.read_text().split("\n", 1)[1])
    return records


def test_every_step_is_written_down_before_it_is_made(conn, pool, base, tmp_path):
    journal = intent.Journal(tmp_path, "vm1")
    journal.begin()
    rollback = Rollback(journal=journal)
    provision.create(conn, spec(nics=[NIC]), rollback, lambda *a: None)
    _, records = journal.read()
    # (the test driver cannot upload a seed: the integration tier covers it)
    assert [r["kind"] for r in records] == ["reservation", "volume", "domain"]
    assert {r.get("name") for r in records} >= {"vm1", "vm1.qcow2"}
    rollback.forget()  # success: nothing for a later run
    assert not journal.path.exists()


def test_what_a_killed_create_left_is_undone_by_the_next_one(conn, pool, base, tmp_path):
    before = state(conn, pool)
    journal = intent.Journal(tmp_path, "vm1")
    journal.begin()
    provision.create(conn, spec(nics=[NIC]), Rollback(journal=journal), lambda *a: None)
    assert state(conn, pool) != before  # domain, root volume, reservation
    killed(journal)  # SIGKILL: no rollback ran, the journal stays

    again = intent.Journal(tmp_path, "vm1")
    again.begin(keep=again.stale())
    undone = again.recover(conn)
    assert state(conn, pool) == before, undone
    assert any("domain vm1" in u for u in undone)
    # and the name can be created again
    rollback = Rollback(journal=again)
    provision.create(conn, spec(nics=[NIC]), rollback, lambda *a: None)
    rollback.forget()
    assert not again.path.exists()


def test_a_create_of_the_name_running_now_is_not_touched(conn, pool, base, tmp_path):
    journal = intent.Journal(tmp_path, "vm1")
    journal.begin()  # this (live) process owns it
    journal.intend("domain", name="vm1")
    other = intent.Journal(tmp_path, "vm1")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        text = journal.path.read_text().split("\n", 1)[1]
        start = intent._start_time(live.pid)
        journal.path.write_text(f'{{"owner": {{"pid": {live.pid}, "start": "{start}"}}}}\n' + text)
        with pytest.raises(ConflictError, match=f"pid {live.pid}"):
            other.stale()
    finally:
        live.kill()
        live.wait()


def test_a_domain_without_salt_kvms_tag_is_never_removed(conn, pool, base, tmp_path):
    """A journal is a claim, not proof: the domain must carry salt-kvm's metadata."""
    done = intent.undo(
        conn, [{"kind": "domain", "name": "base"}, {"kind": "domain", "name": "test"}]
    )
    assert done == []
    assert {"base", "test"} <= {d.name() for d in conn.listAllDomains(0)}


def test_a_rollback_that_undid_everything_leaves_no_journal(conn, pool, base, tmp_path):
    journal = intent.Journal(tmp_path, "vm1")
    journal.begin()
    rollback = Rollback(journal=journal)
    with pytest.raises(RuntimeError):
        with rollback:
            provision.create(conn, spec(nics=[NIC]), rollback, lambda *a: None)
            raise RuntimeError("deploy failed")
    assert not journal.path.exists()
    assert journal.dir.stat().st_mode & 0o777 == 0o700


def test_a_killed_creates_domain_is_not_listed_as_a_node(conn, pool, base, tmp_path):
    """salt-cloud refuses to create a name it lists ("already exists"): the
    half-made domain must not be listed, so the next create can clear it."""
    journal = intent.Journal(tmp_path, "vm1")
    journal.begin()
    provision.create(conn, spec(), Rollback(journal=journal), lambda *a: None)
    assert intent.killed({"cachedir": str(tmp_path)}) == set()  # its process runs: a create
    killed(journal)
    assert intent.killed({"cachedir": str(tmp_path)}) == {"vm1"}


@pytest.mark.parametrize("how", ["symlink", "other-owner", "open-mode"])
def test_a_planted_journal_directory_is_refused_and_never_read(conn, pool, base, tmp_path, how):
    """salt-cloud's cachedir path may be reachable by a local user (a careless
    ``cachedir``): a journal directory that is a link, another user's or open
    to others is refused before a journal is written, and its planted journals
    are never undone (they would remove any salt-kvm guest by name)."""
    import os

    if how == "other-owner" and os.geteuid() != 0:
        pytest.skip("only root can give a directory away")
    before = state(conn, pool)
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "base.jsonl").write_text(
        '{"owner": {"pid": 1, "start": "0"}}\n{"kind": "domain", "name": "base"}\n'
    )
    (tmp_path / "salt-kvm").mkdir(mode=0o700)
    creating = tmp_path / intent.SUBDIR
    if how == "symlink":
        creating.symlink_to(planted)
    else:
        os.rename(planted, creating)
        if how == "other-owner":
            os.chown(creating, 65534, 65534)
        else:
            os.chmod(creating, 0o777)
    journal = intent.Journal(tmp_path, "vm1")
    with pytest.raises(SaltKvmError, match=rf"{creating} .*refusing"):
        journal.begin(keep=journal.stale())
    assert not (creating / "vm1.jsonl").exists()
    opts = {"cachedir": str(tmp_path)}
    with pytest.raises(SaltKvmError, match="refusing to read create journals"):
        list(intent.journals(opts))
    with pytest.raises(SaltKvmError, match="refusing to read create journals"):
        intent.killed(opts)
    assert state(conn, pool) == before


def test_the_journal_directory_is_made_root_only(tmp_path):
    import os
    import stat

    journal = intent.Journal(tmp_path, "vm1")
    journal.begin(keep=journal.stale())
    for folder in (tmp_path / "salt-kvm", tmp_path / intent.SUBDIR):
        info = os.lstat(folder)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()


def test_a_journal_folder_an_earlier_version_made_0755_is_closed_not_refused(tmp_path):
    import os
    import stat

    (tmp_path / "salt-kvm").mkdir(mode=0o755)
    os.chmod(tmp_path / "salt-kvm", 0o755)
    journal = intent.Journal(tmp_path, "vm1")
    assert list(intent.journals({"cachedir": str(tmp_path)})) == []
    journal.begin(keep=journal.stale())
    assert stat.S_IMODE(os.lstat(tmp_path / "salt-kvm").st_mode) == 0o700
