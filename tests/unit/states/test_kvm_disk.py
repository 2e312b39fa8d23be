"""kvm_disk states through Salt's loader: test=True runs only the real call's
checks and changes nothing, refusals are result False with their message."""

import pytest
from salt.exceptions import CommandExecutionError

from tests.unit.loader import load, never, raising

kvm_disk = load("states", "kvm_disk")
DATA = {"target": "vdb", "size": 1 << 30, "source": "/p/vm1-data.qcow2", "format": "qcow2"}


@pytest.fixture
def salt():
    return {"kvm_disk.list": lambda domain, uri=None: {}, "kvm_disk.detach": never}


@pytest.fixture
def configure_loader_modules(salt):
    return {kvm_disk: {"__salt__": salt, "__opts__": {"test": False}}}


@pytest.fixture
def test_mode(monkeypatch):
    monkeypatch.setitem(kvm_disk.__opts__, "test", True)


def test_without_the_execution_module_it_does_not_load(salt):
    salt.pop("kvm_disk.list")
    assert kvm_disk.__virtual__() == (False, "the kvm_disk execution module is not available")


def test_attached_test_true_checks_and_attaches_nothing(salt, test_mode):
    calls = []

    def attach(domain, name, **kwargs):
        calls.append(kwargs)
        if not kwargs.get("test"):
            raise AssertionError("attached for real")
        return {}

    salt["kvm_disk.attach"] = attach
    ret = kvm_disk.attached("data", "vm1", size="1G")
    assert ret["result"] is None
    assert ret["comment"] == "Disk data (1G volume) would be attached to vm1"
    assert ret["changes"]["old"] is None and ret["changes"]["new"]["domain"] == "vm1"
    assert [c["test"] for c in calls] == [True]


def test_attached_test_true_refusal_is_the_real_runs(salt, test_mode):
    salt["kvm_disk.attach"] = raising(CommandExecutionError("path: /etc is outside allowed_dirs"))
    ret = kvm_disk.attached("data", "vm1", path="/etc/passwd")
    assert (ret["result"], ret["comment"]) == (False, "path: /etc is outside allowed_dirs")
    assert ret["changes"] == {}


def test_attached_bad_arguments_are_result_false_naming_the_key(salt):
    salt["kvm_disk.attach"] = never
    ret = kvm_disk.attached("data", "vm1", size="lots")
    assert ret["result"] is False and ret["comment"].startswith("size: ")


def test_attached_a_missing_domain_is_result_false_with_the_message(salt):
    salt["kvm_disk.list"] = raising(CommandExecutionError("no domain vm9"))
    ret = kvm_disk.attached("data", "vm9", size="1G")
    assert (ret["result"], ret["comment"]) == (False, "no domain vm9")


def test_attached_grows_a_smaller_disk_only_outside_test(salt, test_mode, monkeypatch):
    salt["kvm_disk.list"] = lambda domain, uri=None: {"data": dict(DATA)}
    salt["kvm_disk.resize"] = never
    monkeypatch.setattr(kvm_disk.disks, "differences", lambda current, spec: ([], 2 << 30))
    ret = kvm_disk.attached("data", "vm1", size="2G")
    assert ret["result"] is None
    assert ret["changes"] == {"old": {"size": 1 << 30}, "new": {"size": 2 << 30}}


def test_attached_a_different_disk_is_reported_not_changed(salt, monkeypatch):
    salt["kvm_disk.list"] = lambda domain, uri=None: {"data": dict(DATA)}
    salt["kvm_disk.attach"] = never
    monkeypatch.setattr(
        kvm_disk.disks, "differences", lambda c, s: (["bus virtio, not sata"], None)
    )
    ret = kvm_disk.attached("data", "vm1", size="1G", bus="sata")
    assert ret["result"] is False
    assert ret["comment"] == "Disk data of vm1 differs: bus virtio, not sata. Detach it first"


def test_detached_test_true_checks_and_detaches_nothing(salt, test_mode):
    calls = []
    salt["kvm_disk.list"] = lambda domain, uri=None: {"data": dict(DATA)}
    salt["kvm_disk.detach"] = lambda domain, name, **kwargs: calls.append(kwargs) or {}
    ret = kvm_disk.detached("data", "vm1", delete=True)
    assert ret["result"] is None
    assert ret["comment"] == "Disk data would be detached from vm1 and its volume deleted"
    assert ret["changes"] == {"old": DATA, "new": None}
    assert [c["test"] for c in calls] == [True]


def test_detached_refusal_is_result_false_with_its_message(salt):
    salt["kvm_disk.list"] = lambda domain, uri=None: {"vda": dict(DATA)}
    salt["kvm_disk.detach"] = raising(CommandExecutionError("vda is the boot disk"))
    ret = kvm_disk.detached("vda", "vm1")
    assert (ret["result"], ret["comment"]) == (False, "vda is the boot disk")


def test_detached_an_absent_disk_is_left_alone(salt):
    ret = kvm_disk.detached("data", "vm1")
    assert ret == {
        "name": "data",
        "result": True,
        "changes": {},
        "comment": "vm1 has no disk named data",
    }
