"""kvm_host execution module through Salt's loader: why it does not load,
and library errors as CommandExecutionError with their message."""

import pytest
from salt.exceptions import CommandExecutionError

from salt_kvm.errors import NotFoundError, SaltKvmError
from tests.unit.loader import load, no_connection, raising

kvm_host = load("modules", "kvm_host")


@pytest.fixture
def configure_loader_modules():
    return {kvm_host: {"__opts__": {}, "__pillar__": {}, "connection_for": no_connection}}


def test_without_libvirt_it_does_not_load_and_says_why(monkeypatch):
    monkeypatch.setattr(kvm_host, "HAS_LIBS", False)
    monkeypatch.setattr(kvm_host, "_IMPORT_ERROR", "No module named 'libvirt'", raising=False)
    loaded, why = kvm_host.__virtual__()
    assert loaded is False
    assert "libvirt-python" in why and "No module named 'libvirt'" in why


def test_it_loads_as_kvm_host():
    assert kvm_host.__virtual__() == "kvm_host"


def test_a_library_error_is_a_command_execution_error_with_its_message(monkeypatch):
    monkeypatch.setattr(kvm_host.host, "info", raising(SaltKvmError("libvirtd is not running")))
    with pytest.raises(CommandExecutionError, match="^libvirtd is not running$"):
        kvm_host.info()
    monkeypatch.setattr(kvm_host.host, "ensure_dir_pool", raising(NotFoundError("no dir /x")))
    with pytest.raises(CommandExecutionError, match="^no dir /x$"):
        kvm_host.ensure_pool("default", "/x")


def test_the_uri_comes_from_the_argument_pillar_or_config(monkeypatch):
    seen = []
    monkeypatch.setattr(
        kvm_host, "connection_for", lambda opts, pillar, uri: seen.append(uri) or no_connection()
    )
    monkeypatch.setattr(kvm_host.host, "pool_state", lambda conn, name: None)
    assert kvm_host.pool_info("default", uri="test:///default") is None
    assert seen == ["test:///default"]


def test_migrate_refuses_bad_input_naming_the_key_before_connecting(monkeypatch):
    monkeypatch.setattr(kvm_host, "connected", raising(AssertionError("no connection")))
    with pytest.raises(CommandExecutionError, match="^migrate vm1: uri: is required"):
        kvm_host.migrate("vm1", "")
    with pytest.raises(CommandExecutionError, match=r"^migrate vm1: port: 99999 is out of range"):
        kvm_host.migrate("vm1", "qemu+ssh://hv2/system", port=99999)
    with pytest.raises(CommandExecutionError, match="^migrate vm1: copy_base: 'sure' is not a"):
        kvm_host.migrate("vm1", "qemu+ssh://hv2/system", copy_base="sure")


@pytest.mark.parametrize(
    "uri", ["qemu+ssh://root@hv2/system\n", " qemu+ssh://root@hv2/system", "qemu+ssh://hv 2/system"]
)
def test_migrate_refuses_a_target_uri_with_whitespace_by_name(monkeypatch, uri):
    from tests.unit.loader import never

    monkeypatch.setattr(kvm_host, "connected", never)
    with pytest.raises(CommandExecutionError, match="^migrate vm1: uri: .*not a libvirt URI"):
        kvm_host.migrate("vm1", uri)
