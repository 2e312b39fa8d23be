"""kvm_nat execution module through Salt's loader: why it does not load,
settings and library errors as CommandExecutionError with their message."""

import pytest
from salt.exceptions import CommandExecutionError

from salt_kvm.errors import ConflictError
from tests.unit.loader import load, never, no_connection, raising

kvm_nat = load("modules", "kvm_nat")


@pytest.fixture
def configure_loader_modules():
    return {kvm_nat: {"__opts__": {}, "__pillar__": {}, "connection_for": no_connection}}


@pytest.fixture
def hooks_active(monkeypatch):
    monkeypatch.setattr(kvm_nat.hookfiles, "status", lambda *a: (True, "active"))
    monkeypatch.setattr(kvm_nat.hooks, "problems", lambda names: [])


def test_without_libvirt_it_does_not_load_and_says_why(monkeypatch):
    monkeypatch.setattr(kvm_nat, "HAS_LIBS", False)
    monkeypatch.setattr(kvm_nat, "_IMPORT_ERROR", "No module named 'libvirt'", raising=False)
    loaded, why = kvm_nat.__virtual__()
    assert loaded is False and "libvirt-python" in why


def test_without_nftables_it_does_not_load_and_says_why(monkeypatch):
    monkeypatch.setattr(kvm_nat.hostnet, "available", lambda: "nft is not installed")
    assert kvm_nat.__virtual__() == (False, "kvm_nat: nft is not installed")
    monkeypatch.setattr(kvm_nat.hostnet, "available", lambda: None)
    assert kvm_nat.__virtual__() == "kvm_nat"


def test_a_bad_max_rules_setting_is_refused_by_its_key(monkeypatch):
    monkeypatch.setattr(kvm_nat.forwards, "add", never)
    monkeypatch.setitem(kvm_nat.__pillar__, "kvm", {"nat": {"max_rules": "many"}})
    with pytest.raises(CommandExecutionError, match="^kvm:nat:max_rules: "):
        kvm_nat.add("vm1", 22)


def test_a_library_error_is_a_command_execution_error_with_its_message(monkeypatch):
    refused = ConflictError("host port 10022/tcp is already forwarded to vm2")
    monkeypatch.setattr(kvm_nat.forwards, "add", raising(refused))
    with pytest.raises(CommandExecutionError, match="^host port 10022/tcp is already forwarded"):
        kvm_nat.add("vm1", 22)
    monkeypatch.setattr(kvm_nat.forwards, "listing", raising(ConflictError("nft failed")))
    with pytest.raises(CommandExecutionError, match="^nft failed$"):
        kvm_nat.list_()


def test_hooks_that_cannot_be_written_say_so(monkeypatch):
    monkeypatch.setattr(kvm_nat.hooks, "install", raising(PermissionError("/etc/libvirt")))
    with pytest.raises(CommandExecutionError, match="^cannot install the hooks: /etc/libvirt$"):
        kvm_nat.install_hooks()


def test_apply_test_true_changes_nothing_and_passes_test_on(monkeypatch, hooks_active):
    seen = {}

    def apply(conn, name, rules, max_rules, test=False):
        seen.update(test=test, rules=rules)
        return {"old": [], "new": [22]}

    monkeypatch.setattr(kvm_nat.forwards, "apply", apply)
    assert kvm_nat.apply("vm1", rules=[22], test=True) == {"old": [], "new": [22]}
    assert seen == {"test": True, "rules": [22]}


def test_add_warns_when_the_hooks_are_not_active(monkeypatch):
    monkeypatch.setattr(kvm_nat.forwards, "add", lambda *a, **k: {"added": 1})
    monkeypatch.setattr(kvm_nat.hookfiles, "status", lambda *a: (False, "not installed"))
    monkeypatch.setattr(kvm_nat.hooks, "problems", lambda names: [])
    monkeypatch.setattr(kvm_nat, "_names", lambda domain=None: {domain})
    assert kvm_nat.add("vm1", 22) == {"added": 1, "warning": "not installed"}


def test_apply_without_rules_is_refused_and_removes_nothing(monkeypatch):
    # "kvm_nat.apply vm1" alone used to remove every forward of vm1: a
    # destructive call needs its intent said (remove_all=True).
    monkeypatch.setattr(kvm_nat.forwards, "apply", never)
    with pytest.raises(CommandExecutionError, match=r"^rules: .*remove_all=True"):
        kvm_nat.apply("vm1")


@pytest.mark.parametrize("rules", [[], "", " ", 0, False, (), None])
def test_apply_with_no_rules_is_refused_without_remove_all(monkeypatch, rules):
    # An empty set (a pillar lookup that found nothing, rules=0, rules='')
    # would remove every forward of the domain: that needs remove_all=True.
    monkeypatch.setattr(kvm_nat.forwards, "apply", never)
    with pytest.raises(CommandExecutionError, match=r"^rules: .*remove_all=True"):
        kvm_nat.apply("vm1", rules=rules)
    with pytest.raises(CommandExecutionError, match=r"^rules: .*remove_all=True"):
        kvm_nat.apply("vm1", rules=rules, test=True)


@pytest.mark.parametrize("rules", [None, []])
def test_apply_with_remove_all_removes_every_forward(monkeypatch, hooks_active, rules):
    seen = {}

    def apply(conn, name, rules, max_rules, test=False):
        seen["rules"] = rules
        return {"old": [22], "new": []}

    monkeypatch.setattr(kvm_nat.forwards, "apply", apply)
    assert kvm_nat.apply("vm1", rules=rules, remove_all=True)["new"] == []
    assert seen["rules"] == []
    assert kvm_nat.apply("vm1", rules=rules, remove_all="yes")["new"] == []


def test_apply_with_rules_and_remove_all_is_refused(monkeypatch):
    monkeypatch.setattr(kvm_nat.forwards, "apply", never)
    with pytest.raises(CommandExecutionError, match=r"^remove_all: "):
        kvm_nat.apply("vm1", rules=[22], remove_all=True)
    with pytest.raises(CommandExecutionError, match=r"^remove_all: "):
        kvm_nat.apply("vm1", rules=[22], remove_all="perhaps")
