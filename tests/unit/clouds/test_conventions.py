"""Salt conventions a driver user expects (issue #14 item 6): the cache
directory kept by ``update_cachedir``, a load failure's reason at warning
level, and each create step at info level."""

import logging

import pytest

from salt_kvm.cloud import provision
from salt_kvm.clouds import libvirt as driver


@pytest.fixture
def utils(monkeypatch, tmp_path):
    calls = []

    def record(name):
        return lambda *args: calls.append((name, args))

    fake = {
        name: record(name)
        for name in ("cloud.cachedir_index_add", "cloud.cache_node", "cloud.delete_minion_cachedir")
    }
    monkeypatch.setattr(driver, "__utils__", fake, raising=False)
    monkeypatch.setattr(driver, "__active_provider_name__", "local:libvirt", raising=False)
    return calls


def test_destroy_removes_the_minion_cachedir_when_update_cachedir_is_on(monkeypatch, utils):
    opts = {"update_cachedir": True, "pki_dir": "/nonexistent"}
    monkeypatch.setattr(driver, "__opts__", opts, raising=False)
    monkeypatch.setattr(driver, "_fire", lambda *a: None)

    # The hypervisor part is not this test's business: only what follows it.
    monkeypatch.setattr(driver, "_destroy_on_hypervisor", lambda name, kwargs: {"x": 1})
    monkeypatch.setattr(driver.salt.utils.cloud, "remove_key", lambda *a: None)
    result = driver.destroy("vm1", {}, call="action")
    assert result["destroyed"] is True
    assert utils == [("cloud.delete_minion_cachedir", ("vm1", "local", opts))]


def test_destroy_leaves_the_cachedir_alone_by_default(monkeypatch, utils):
    monkeypatch.setattr(driver, "__opts__", {"pki_dir": "/nonexistent"}, raising=False)
    monkeypatch.setattr(driver, "_fire", lambda *a: None)
    monkeypatch.setattr(driver, "_destroy_on_hypervisor", lambda name, kwargs: {})
    monkeypatch.setattr(driver.salt.utils.cloud, "remove_key", lambda *a: None)
    driver.destroy("vm1", {}, call="action")
    assert utils == []


def test_a_driver_that_cannot_load_says_why_at_warning_level(monkeypatch, caplog):
    monkeypatch.setattr(driver, "HAS_LIBS", False)
    monkeypatch.setattr(driver, "_IMPORT_ERROR", "No module named 'libvirt'", raising=False)
    with caplog.at_level(logging.WARNING, logger=driver.__name__):
        ok, why = driver.__virtual__()
    assert ok is False and "libvirt" in why
    assert any(
        r.levelno == logging.WARNING and "No module named 'libvirt'" in r.getMessage()
        for r in caplog.records
    )


def test_each_create_step_is_told_at_info_level(caplog):
    guest = provision.Guest(name="vm1", domain=None, macs=[])
    with caplog.at_level(logging.INFO, logger=provision.__name__):
        guest.mark("clone")
        guest.mark("ip")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 2 and lines[0].startswith("vm1: clone done at")
