"""kvm_nat states through Salt's loader: test=True changes nothing, a refusal
is result False with its message."""

import pytest
from salt.exceptions import CommandExecutionError

from tests.unit.loader import load, never, raising

kvm_nat = load("states", "kvm_nat")


@pytest.fixture
def salt():
    return {
        "kvm_nat.hooks_status": lambda hooks_dir=None: {"active": True, "errors": []},
    }


@pytest.fixture
def configure_loader_modules(salt):
    return {kvm_nat: {"__salt__": salt, "__opts__": {"test": False}}}


def only_test_runs(would):
    def apply(name, rules=None, test=False, uri=None, remove_all=False):
        if not test:
            raise AssertionError("applied for real")
        return would

    return apply


def test_without_the_execution_module_it_does_not_load():
    assert kvm_nat.__virtual__() == (False, "the kvm_nat execution module is not available")


def test_forwarded_test_true_shows_the_changes_and_applies_nothing(salt, monkeypatch):
    salt["kvm_nat.apply"] = only_test_runs({"old": [], "new": [22]})
    monkeypatch.setitem(kvm_nat.__opts__, "test", True)
    ret = kvm_nat.forwarded("vm1", rules=[22])
    assert ret["result"] is None
    assert ret["changes"] == {"old": [], "new": [22]}
    assert ret["comment"] == "Forwards of vm1 would be made as listed (22)"


def test_forwarded_already_so_changes_nothing(salt):
    salt["kvm_nat.apply"] = only_test_runs({})
    ret = kvm_nat.forwarded("vm1", rules=True)
    assert (ret["result"], ret["changes"]) == (True, {})
    assert ret["comment"] == "Forwards of vm1 are as listed (22 80 443)"


def test_a_refusal_is_result_false_with_its_message(salt):
    salt["kvm_nat.apply"] = raising(CommandExecutionError("rules[0]: 70000 is not a port"))
    ret = kvm_nat.forwarded("vm1", rules=[70000])
    assert ret["result"] is False
    assert ret["comment"] == "Forwards of vm1 not changed: rules[0]: 70000 is not a port"


def test_forwarded_applies_and_reports_inactive_hooks_in_the_comment(salt):
    def apply(name, rules=None, test=False, uri=None, remove_all=False):
        return {"old": [], "new": [22], **({} if test else {"warning": "w", "hook_errors": ["e"]})}

    salt["kvm_nat.apply"] = apply
    salt["kvm_nat.hooks_status"] = lambda hooks_dir=None: {
        "active": False,
        "status": "off",
        "errors": [],
    }
    ret = kvm_nat.forwarded("vm1", rules=[22])
    assert ret["result"] is True
    assert ret["changes"] == {"old": [], "new": [22]}
    assert ret["comment"] == "Forwards of vm1 are as listed (22) (warning: off)"


def test_hooks_installed_test_true_writes_nothing(salt, monkeypatch):
    def install(hooks_dir, test=False):
        if not test:
            raise AssertionError("written for real")
        return ["/etc/libvirt/hooks/qemu"]

    salt["kvm_nat.install_hooks"] = install
    monkeypatch.setitem(kvm_nat.__opts__, "test", True)
    ret = kvm_nat.hooks_installed()
    assert ret["result"] is None
    assert ret["changes"] == {"written": ["/etc/libvirt/hooks/qemu"]}


def test_absent_removes_every_forward(salt):
    calls = []

    def apply(name, rules=None, test=False, uri=None, remove_all=False):
        calls.append((rules, test, remove_all))
        return {"old": [22], "new": []}

    salt["kvm_nat.apply"] = apply
    salt["kvm_nat.hooks_status"] = never  # no rules: the hooks do not matter
    ret = kvm_nat.absent("vm1")
    assert ret["result"] is True and ret["comment"] == "Forwards of vm1 are absent"
    assert calls == [(None, True, True), (None, False, True)]


@pytest.mark.parametrize("rules", [[], None, "", 0, False])
def test_forwarded_with_no_rules_is_refused_and_removes_nothing(salt, rules):
    # rules: {{ pillar.get('ports') }} that found nothing would remove every
    # forward; kvm_nat.absent says that intent.
    salt["kvm_nat.apply"] = never
    ret = kvm_nat.forwarded("vm1", rules=rules)
    assert ret["result"] is False and ret["changes"] == {}
    assert ret["comment"].startswith("Forwards of vm1 not changed: rules: ")
    assert "kvm_nat.absent" in ret["comment"]


def test_hooks_that_cannot_be_written_are_result_false_with_the_message(salt):
    def install(hooks_dir, test=False):
        if test:
            return ["/etc/libvirt/hooks/qemu"]
        raise CommandExecutionError("cannot install the hooks: read-only file system")

    salt["kvm_nat.install_hooks"] = install
    ret = kvm_nat.hooks_installed()
    assert ret["result"] is False
    assert ret["comment"] == "cannot install the hooks: read-only file system"
