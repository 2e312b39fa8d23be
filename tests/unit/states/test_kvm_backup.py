"""kvm_backup states through Salt's loader: test=True takes nothing, a bad
argument or a failed call is result False with its message."""

import pytest
from salt.exceptions import CommandExecutionError

from tests.unit.loader import load, never, raising

kvm_backup = load("states", "kvm_backup")
OLD = [{"id": "20200101T000000Z", "created": "2020-01-01T00:00:00Z"}]


@pytest.fixture
def salt():
    return {
        "kvm_backup.create": never,
        "kvm_backup.prune": never,
        "kvm_backup.list": lambda name, dest: list(OLD),
        "kvm_backup.snapshot": never,
        "kvm_backup.snapshot_delete": never,
        "kvm_backup.snapshot_list": lambda name, uri=None: [{"name": "s1"}],
    }


@pytest.fixture
def configure_loader_modules(salt):
    return {kvm_backup: {"__salt__": salt, "__opts__": {"test": False}}}


@pytest.fixture
def test_mode(monkeypatch):
    monkeypatch.setitem(kvm_backup.__opts__, "test", True)


def test_without_the_execution_module_it_does_not_load(salt):
    salt.pop("kvm_backup.create")
    assert kvm_backup.__virtual__() == (False, "the kvm_backup execution module is not available")


def test_a_bad_max_age_is_result_false_naming_it(salt):
    ret = kvm_backup.backed_up("web1", "/srv/backup", max_age="soon")
    assert ret["result"] is False and ret["comment"].startswith("max_age: ")


def test_a_bad_method_is_result_false_naming_it(salt):
    ret = kvm_backup.backed_up("web1", "/srv/backup", method="rsync")
    assert ret["result"] is False and ret["comment"].startswith("method: ")


def test_backed_up_test_true_takes_no_backup(salt, test_mode):
    ret = kvm_backup.backed_up("web1", "/srv/backup", max_age="1h")
    assert ret["result"] is None
    assert ret["changes"] == {"backup": {"old": "20200101T000000Z", "new": "new"}}
    assert ret["comment"] == "A backup of web1 would be taken into /srv/backup"


def test_a_failed_backup_is_result_false_with_its_message(salt):
    salt["kvm_backup.create"] = raising(CommandExecutionError("web1 has no disks"))
    ret = kvm_backup.backed_up("web1", "/srv/backup", max_age="1h")
    assert (ret["result"], ret["comment"]) == (False, "Backup of web1 failed: web1 has no disks")


def test_an_unreadable_store_is_result_false_with_its_message(salt):
    salt["kvm_backup.list"] = raising(CommandExecutionError("manifest: bad field"))
    ret = kvm_backup.backed_up("web1", "/srv/backup")
    assert (ret["result"], ret["comment"]) == (False, "manifest: bad field")


def test_snapshot_present_test_true_takes_nothing(salt, test_mode):
    ret = kvm_backup.snapshot_present("web1", "s2")
    assert ret["result"] is None
    assert ret["changes"] == {"snapshot": {"old": None, "new": "s2"}}


def test_snapshot_absent_test_true_deletes_nothing(salt, test_mode):
    ret = kvm_backup.snapshot_absent("web1", "s1")
    assert ret["result"] is None
    assert ret["changes"] == {"snapshot": {"old": "s1", "new": None}}


def test_snapshot_absent_failure_is_result_false_with_its_message(salt):
    salt["kvm_backup.snapshot_delete"] = raising(CommandExecutionError("block commit failed"))
    ret = kvm_backup.snapshot_absent("web1", "s1")
    assert (ret["result"], ret["comment"], ret["changes"]) == (False, "block commit failed", {})


def test_snapshot_present_existing_is_left_alone(salt):
    ret = kvm_backup.snapshot_present("web1", "s1")
    assert (ret["result"], ret["changes"]) == (True, {})
    assert ret["comment"] == "Snapshot s1 of web1 exists"


def test_backed_up_prunes_dest_and_copies_with_its_keep(salt):
    got = {}

    def create(name, dest, **kwargs):
        got.update(kwargs)
        return {
            "point": "p2",
            "kind": "full",
            "bytes": 1,
            "frozen": True,
            "pruned": ["20200101T000000Z"],
            "copies": [{"target": "/mnt/nas", "copied": ["p2"], "pruned": ["20200101T000000Z"]}],
        }

    salt["kvm_backup.create"] = create
    ret = kvm_backup.backed_up("web1", "/srv/backup", max_age="1h", keep=3, copies=["/mnt/nas"])
    assert ret["result"] is True, ret
    assert got["keep"] == 3 and got["copies"] == ["/mnt/nas"]
    assert ret["changes"]["pruned"] == ["20200101T000000Z"]
    assert ret["changes"]["copies"] == {"/mnt/nas": ["p2"]}
