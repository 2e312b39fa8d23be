"""kvm_disk execution module through Salt's loader: why it does not load,
arguments refused by name before anything runs, library and libvirt errors
as CommandExecutionError with their message, test=True attaches nothing."""

import libvirt
import pytest
from salt.exceptions import CommandExecutionError

from salt_kvm.errors import ConflictError, NotFoundError
from tests.unit.loader import load, never, no_connection, raising

kvm_disk = load("modules", "kvm_disk")


@pytest.fixture
def configure_loader_modules():
    return {
        kvm_disk: {
            "__opts__": {},
            "__pillar__": {},
            "__salt__": {"config.get": lambda key, default=None: default},
            "connection_for": no_connection,
        }
    }


@pytest.fixture
def domain(monkeypatch):
    """vm1 exists; what would change it may not run."""
    monkeypatch.setattr(kvm_disk.lifecycle, "lookup", lambda conn, name: name)
    for name in ("attach", "detach", "resize"):
        monkeypatch.setattr(kvm_disk.diskops, name, never)


def test_without_libvirt_it_does_not_load_and_says_why(monkeypatch):
    monkeypatch.setattr(kvm_disk, "HAS_LIBS", False)
    monkeypatch.setattr(kvm_disk, "_IMPORT_ERROR", "No module named 'libvirt'", raising=False)
    loaded, why = kvm_disk.__virtual__()
    assert loaded is False and "libvirt-python" in why


def test_the_function_list_keeps_its_salt_name():
    assert kvm_disk.__func_alias__ == {"list_": "list"}
    assert kvm_disk.__virtual__() == "kvm_disk"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"size": "lots"}, "size"),
        ({}, "size"),  # neither size nor path
        ({"size": "1G", "bus": "floppy"}, "bus"),
        ({"size": "1G", "live": "maybe"}, "live"),
        ({"size": "1G", "test": "perhaps"}, "test"),
    ],
)
def test_bad_arguments_are_refused_by_name_before_anything_runs(domain, kwargs, key):
    with pytest.raises(CommandExecutionError, match=rf"^{key}: "):
        kvm_disk.attach("vm1", "data", **kwargs)


def test_resize_refuses_a_bad_size_by_name(domain):
    with pytest.raises(CommandExecutionError, match="^size: "):
        kvm_disk.resize("vm1", "data", "huge")


def test_bad_allowed_dirs_in_the_config_are_refused_by_key(domain, monkeypatch):
    monkeypatch.setitem(kvm_disk.__salt__, "config.get", lambda key, default=None: "relative")
    with pytest.raises(CommandExecutionError, match="^kvm:disk:allowed_dirs: "):
        kvm_disk.attach("vm1", "data", path="/srv/a.raw")


def test_library_and_libvirt_errors_keep_their_message(domain, monkeypatch):
    monkeypatch.setattr(kvm_disk.lifecycle, "lookup", raising(NotFoundError("no domain vm9")))
    with pytest.raises(CommandExecutionError, match="^no domain vm9$"):
        kvm_disk.list_("vm9")
    monkeypatch.setattr(kvm_disk.lifecycle, "lookup", lambda conn, name: name)
    monkeypatch.setattr(kvm_disk.diskops, "detach", raising(ConflictError("vda is the boot disk")))
    with pytest.raises(CommandExecutionError, match="^vda is the boot disk$"):
        kvm_disk.detach("vm1", "vda")
    monkeypatch.setattr(kvm_disk.diskops, "describe", raising(libvirt.libvirtError("gone")))
    with pytest.raises(CommandExecutionError, match="gone"):
        kvm_disk.list_("vm1")


def test_test_true_plans_and_attaches_nothing(domain, monkeypatch):
    class Plan:
        class spec:  # noqa: N801 - a stand-in for DiskSpec
            name, format = "data", "qcow2"

        target, source = "vdb", None

    monkeypatch.setattr(kvm_disk.diskops, "plan", lambda *args: Plan)
    planned = kvm_disk.attach("vm1", "data", size="1G", test=True)
    assert planned == {
        "name": "data",
        "target": "vdb",
        "source": None,
        "format": "qcow2",
        "new_volume": True,
    }


def test_detach_test_true_is_the_real_calls_check_only(domain, monkeypatch):
    seen = {}
    monkeypatch.setattr(kvm_disk.diskops, "detach", lambda conn, dom, name, **kw: seen.update(kw))
    kvm_disk.detach("vm1", "data", test=True)
    assert seen["check_only"] is True
