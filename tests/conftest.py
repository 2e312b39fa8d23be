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


class RecordedRelays:
    """The relay runner of unit and functional tests: remembers, starts nothing."""

    def __init__(self):
        self.names: set[str] = set()
        self.started: list = []

    def running(self):
        return set(self.names)

    def start(self, relay):
        self.names.add(relay.name)
        self.started.append(relay)

    def stop(self, name):
        self.names.discard(name)


@pytest.fixture(autouse=True)
def relay_runner(request, monkeypatch):
    """Unit and functional tests never start a real relay on the host's
    ``[::1]`` (or read its bridges): the forwards' relays go to a recorder.
    Tests of the relay itself hand ``relays.sync`` a runner of their own."""
    if request.node.get_closest_marker("integration") is not None:
        return None
    from salt_kvm.nat import firewall, relays

    recorded = RecordedRelays()
    monkeypatch.setattr(relays, "runner", lambda: recorded)
    monkeypatch.setattr(firewall, "bridge_addresses6", lambda bridges: {})
    return recorded
