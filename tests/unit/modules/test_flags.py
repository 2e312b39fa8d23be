"""Yes/no arguments of the execution modules as the CLI may pass them: a
quoted ``'false'`` arrives as a string, which Python finds true. Each flag
reads the usual spellings strictly and refuses anything else by its name,
before the library is called."""

import pytest
from salt.exceptions import CommandExecutionError

from tests.unit.loader import load, never, no_connection

kvm_backup = load("modules", "kvm_backup")
kvm_nat = load("modules", "kvm_nat")

NO = [False, "false", "False", "no", "off", "0", 0]
YES = [True, "true", "True", "yes", "on", "1", 1]
NOT_A_FLAG = ["maybe", "", [], {}, 2, "flase"]


@pytest.fixture
def configure_loader_modules():
    opts = {"__opts__": {}, "__pillar__": {}, "connection_for": no_connection}
    return {
        kvm_backup: {**opts, "__salt__": {"config.get": lambda key, default=None: default}},
        kvm_nat: opts,
    }


def seen_by(monkeypatch, module, attr):
    """Replace library function ``attr`` of ``module``; returns the args it got."""
    seen = {}
    owner, _, name = attr.rpartition(".")

    def record(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return {"old": [], "new": [], "deleted": []}

    monkeypatch.setattr(getattr(module, owner), name, record)
    return seen


# (call, flag, library function, where the library gets it: position or keyword)
CALLS = [
    (lambda v: kvm_backup.snapshot("web1", "s1", disk_only=v), "disk_only", "snapshots.create", 3),
    (
        lambda v: kvm_backup.snapshot_revert("web1", "s1", force=v),
        "force",
        "snapshots.revert",
        3,
    ),
    (lambda v: kvm_backup.create("web1", "/srv/b", full=v), "full", "backup.create", "full"),
    (lambda v: kvm_backup.verify("web1", "/srv/b", deep=v), "deep", "backup_ops.verify", 3),
    (lambda v: kvm_backup.restore("web1", "/srv/b", force=v), "force", "restoring.restore", 5),
    (lambda v: kvm_backup.restore("web1", "/srv/b", start=v), "start", "restoring.restore", 7),
    (
        lambda v: kvm_backup.restore("web1", "/srv/b", target="w2", new_identity=v),
        "new_identity",
        "restoring.restore",
        8,
    ),
    (lambda v: kvm_nat.apply("vm1", rules=[22], test=v), "test", "forwards.apply", "test"),
]


def got(seen, where):
    return seen["kwargs"][where] if isinstance(where, str) else seen["args"][where]


@pytest.mark.parametrize("call,flag,attr,where", CALLS)
def test_flags_read_the_usual_spellings(monkeypatch, call, flag, attr, where):
    module = kvm_nat if attr.startswith("forwards") else kvm_backup
    monkeypatch.setattr(kvm_nat, "_hooks_warning", lambda changes, name=None: changes)
    seen = seen_by(monkeypatch, module, attr)
    for value in NO:
        call(value)
        assert got(seen, where) is False, (flag, value)
    for value in YES:
        call(value)
        assert got(seen, where) is True, (flag, value)


@pytest.mark.parametrize("value", NOT_A_FLAG)
@pytest.mark.parametrize("call,flag,attr,where", CALLS)
def test_anything_else_is_refused_by_the_flags_name(monkeypatch, call, flag, attr, where, value):
    module = kvm_nat if attr.startswith("forwards") else kvm_backup
    owner, _, name = attr.rpartition(".")
    monkeypatch.setattr(getattr(module, owner), name, never)
    with pytest.raises(CommandExecutionError, match=f"^{flag}: "):
        call(value)


def test_prune_and_install_hooks_read_test_strictly(monkeypatch):
    seen = {}

    def prune(dest, domain, keep, test, conn=None):
        seen["test"] = test
        return {"deleted": []}

    monkeypatch.setattr(kvm_backup.backup_ops, "prune", prune)
    kvm_backup.prune("web1", "/srv/b", 2, test="false")
    assert seen["test"] is False
    with pytest.raises(CommandExecutionError, match="^test: "):
        kvm_backup.prune("web1", "/srv/b", 2, test="perhaps")
    monkeypatch.setattr(kvm_nat.hooks, "install", lambda d, test=False: seen.update(hooks=test))
    kvm_nat.install_hooks(test="no")
    assert seen["hooks"] is False
    with pytest.raises(CommandExecutionError, match="^test: "):
        kvm_nat.install_hooks(test="nope")


def test_takeover_reads_force_and_start_strictly(monkeypatch):
    seen = {}
    monkeypatch.setattr(kvm_backup, "_hosts", lambda: {})
    monkeypatch.setattr(kvm_backup.takeovers, "takeover", lambda *a, **k: seen.update(k))
    kvm_backup.takeover("web1", dest="/srv/r", force="false", start="no")
    assert (seen["force"], seen["start"]) == (False, False)
    for flag in ("force", "start"):
        with pytest.raises(CommandExecutionError, match=f"^{flag}: "):
            kvm_backup.takeover("web1", dest="/srv/r", **{flag: "sure"})
