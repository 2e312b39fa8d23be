"""kvm_backup execution module through Salt's loader: why it does not load,
arguments refused before anything runs, library errors as
CommandExecutionError with their message. (Passwords: tests/unit/test_secret_args.py.)"""

import pytest
from salt.exceptions import CommandExecutionError

from salt_kvm.errors import ConflictError, NotFoundError, SaltKvmError, SpecError
from tests.unit.loader import load, never, no_connection, raising

kvm_backup = load("modules", "kvm_backup")


@pytest.fixture
def configure_loader_modules():
    return {
        kvm_backup: {
            "__opts__": {},
            "__pillar__": {},
            "__salt__": {"config.get": lambda key, default=None: default},
            "connection_for": no_connection,
        }
    }


def test_without_libvirt_it_does_not_load_and_says_why(monkeypatch):
    monkeypatch.setattr(kvm_backup, "HAS_LIBS", False)
    monkeypatch.setattr(kvm_backup, "_IMPORT_ERROR", "No module named 'libvirt'", raising=False)
    loaded, why = kvm_backup.__virtual__()
    assert loaded is False and "libvirt-python" in why


def test_without_qemu_img_it_does_not_load_and_says_why(monkeypatch):
    monkeypatch.setattr(kvm_backup.qemuimg, "available", lambda: False)
    assert kvm_backup.__virtual__() == (
        False,
        "kvm_backup needs qemu-img (Debian package qemu-utils)",
    )


def test_library_errors_keep_their_message(monkeypatch):
    monkeypatch.setattr(kvm_backup.backup_ops, "list_points", raising(SaltKvmError("bad store")))
    with pytest.raises(CommandExecutionError, match="^bad store$"):
        kvm_backup.list_("web1", "/srv/backup")
    monkeypatch.setattr(kvm_backup.snapshots, "delete", raising(NotFoundError("no snapshot s1")))
    with pytest.raises(CommandExecutionError, match="^no snapshot s1$"):
        kvm_backup.snapshot_delete("web1", "s1")
    monkeypatch.setattr(kvm_backup.backup_ops, "verify", raising(SpecError("point", "not an id")))
    with pytest.raises(CommandExecutionError, match="^point: not an id$"):
        kvm_backup.verify("web1", "/srv/backup", point="x")


def test_a_bad_copy_target_is_refused_by_name_before_the_backup(monkeypatch):
    monkeypatch.setattr(kvm_backup.backup, "create", never)
    with pytest.raises(CommandExecutionError, match="^copies: "):
        kvm_backup.create("web1", "/srv/backup", copies=["ftp://nas/backup"])
    with pytest.raises(CommandExecutionError, match="^copies: 42 is not a copy destination"):
        kvm_backup.create("web1", "/srv/backup", copies=[42])


def test_a_failed_copy_after_the_backup_keeps_its_message(monkeypatch):
    monkeypatch.setattr(kvm_backup.backup, "create", lambda conn, *a, **k: {"point": "p1"})
    monkeypatch.setattr(kvm_backup.backup_ops, "replicate", raising(SaltKvmError("disk full")))
    with pytest.raises(CommandExecutionError, match="^disk full$"):
        kvm_backup.create("web1", "/srv/backup", copies=["/mnt/copy"])


def test_prune_test_true_is_passed_to_the_library(monkeypatch):
    seen = {}

    def prune(dest, domain, keep, test, conn=None):
        seen.update(keep=keep, test=test)
        return {"deleted": []}

    monkeypatch.setattr(kvm_backup.backup_ops, "prune", prune)
    assert kvm_backup.prune("web1", "/srv/backup", 4, test=True) == {"deleted": []}
    assert seen == {"keep": 4, "test": True}


@pytest.fixture
def recorded(monkeypatch):
    """What create did, in order: the backup, the prune of dest, each copy."""
    calls = []
    monkeypatch.setattr(
        kvm_backup.backup, "create", lambda conn, *a, **k: calls.append("backup") or {"point": "p"}
    )

    def prune(dest, domain, keep, test, conn=None):
        calls.append(("prune", dest, keep))
        return {"deleted": ["old"]}

    def replicate(dest, domain, target, **kwargs):
        calls.append(("copy", target, kwargs.get("keep")))
        return {"target": target, "copied": ["p"]}

    monkeypatch.setattr(kvm_backup.backup_ops, "prune", prune)
    monkeypatch.setattr(kvm_backup.backup_ops, "replicate", replicate)
    return calls


def test_copies_are_pruned_with_the_retention_of_dest_unless_they_say_their_own(recorded):
    copies = ["/mnt/a", {"target": "/mnt/b"}, {"target": "/mnt/c", "keep": 30}]
    made = kvm_backup.create("web1", "/srv/backup", copies=copies, keep=7)
    assert recorded == [
        "backup",
        ("prune", "/srv/backup", 7),  # first: the copies then receive only the kept chains
        ("copy", "/mnt/a", 7),
        ("copy", "/mnt/b", 7),
        ("copy", "/mnt/c", 30),
    ]
    assert made["pruned"] == ["old"] and len(made["copies"]) == 3


def test_without_keep_nothing_is_pruned_but_a_copy_with_its_own_keep(recorded):
    made = kvm_backup.create("web1", "/srv/backup", copies=["/mnt/a", {"target": "/b", "keep": 2}])
    assert recorded == ["backup", ("copy", "/mnt/a", None), ("copy", "/b", 2)]
    assert "pruned" not in made


@pytest.mark.parametrize(
    "args,match",
    [
        ({"keep": 0}, r"^keep: 0 is not a number of chains \(accepted: an integer of 1 or more"),
        ({"keep": "7"}, r"^keep: '7' is not a number of chains"),
        ({"copies": [{"target": "/b", "keep": -1}]}, r"^copies: keep: -1 is not a number"),
    ],
)
def test_a_bad_retention_is_refused_before_the_backup(recorded, args, match):
    with pytest.raises(CommandExecutionError, match=match):
        kvm_backup.create("web1", "/srv/backup", **args)
    assert recorded == []


def test_a_refused_prune_of_dest_still_sends_the_copies_and_then_fails(recorded, monkeypatch):
    # The new point exists in dest: a prune refused there (something stands on
    # a chain it would delete) must not keep it from the second place.
    monkeypatch.setattr(
        kvm_backup.backup_ops, "prune", raising(ConflictError("vm2's disk stands on chain c1"))
    )
    with pytest.raises(CommandExecutionError, match="pruning /srv/backup was refused") as err:
        kvm_backup.create("web1", "/srv/backup", copies=["/mnt/a"], keep=7)
    assert recorded == ["backup", ("copy", "/mnt/a", 7)]
    assert "vm2's disk stands on chain c1" in str(err.value)
    assert err.value.info["copies"] == [{"target": "/mnt/a", "copied": ["p"]}]
