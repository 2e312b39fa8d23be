"""Every test is marked with its tier from the folder it lives in."""

import os
from pathlib import Path

import pytest

TIERS = ("unit", "functional", "integration")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _private_lock_dir(request, tmp_path_factory, monkeypatch):
    """Unit and functional tests take salt-kvm's locks in a folder of their own:
    never /run/lock/salt-kvm, which a test run by another user would otherwise
    create (and salt-kvm, run by root, then rightly refuse). Integration tests
    share the host's, like the libvirt hooks they exercise."""
    if request.node.get_closest_marker("integration") is None:
        if "SALT_KVM_LOCK_DIR" not in os.environ:
            monkeypatch.setenv("SALT_KVM_LOCK_DIR", str(tmp_path_factory.mktemp("locks")))
