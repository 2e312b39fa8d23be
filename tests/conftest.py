"""Every test is marked with its tier from the folder it lives in."""

import os
import sys
from pathlib import Path

import pytest

TIERS = ("unit", "functional", "integration")


def pytest_configure(config):
    """Importing Salt before any logging is configured (pytest-salt-factories'
    plugin imports it while pytest loads its conftests) makes Salt queue every
    record of the run in a deferred handler writing to the sys.stderr of that
    moment: pytest's capture stream, closed before the handler flushes at exit
    ("--- Logging error ---" tracebacks). Hand what it queued to the handlers
    now configured and drop it: records go through pytest's logging capture,
    shown with a failing test as any other."""
    impl = sys.modules.get("salt._logging.impl")
    if impl is not None:
        impl.shutdown_temp_handler()


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
