"""kvm_host states through Salt's loader: test=True changes nothing, a failed
call is result False with its message."""

import pytest
from salt.exceptions import CommandExecutionError

from tests.unit.loader import load, never, raising

kvm_host = load("states", "kvm_host")
WANTED = {"type": "dir", "path": "/srv/pool", "active": True, "autostart": True}


@pytest.fixture
def salt():
    return {"kvm_host.info": dict, "kvm_host.pool_info": lambda name, uri=None: None}


@pytest.fixture
def configure_loader_modules(salt):
    return {kvm_host: {"__salt__": salt, "__opts__": {"test": False}}}


def test_without_the_execution_module_it_does_not_load(salt):
    salt.pop("kvm_host.info")
    assert kvm_host.__virtual__() == (False, "the kvm_host execution module is not available")


def test_test_true_says_what_would_change_and_changes_nothing(salt, monkeypatch):
    salt["kvm_host.ensure_pool"] = never
    monkeypatch.setitem(kvm_host.__opts__, "test", True)
    ret = kvm_host.pool_present("default", "/srv/pool")
    assert ret["result"] is None
    assert ret["changes"] == {"old": None, "new": WANTED}
    assert ret["comment"] == "Pool default would be made present on /srv/pool"


# "/srv/pool/" (a templated path) names the same pool: libvirt stores /srv/pool.
@pytest.mark.parametrize("path", ["/srv/pool", "/srv/pool/"])
def test_present_pool_is_left_alone(salt, path):
    salt["kvm_host.pool_info"] = lambda name, uri=None: dict(WANTED)
    salt["kvm_host.ensure_pool"] = never
    ret = kvm_host.pool_present("default", path)
    assert (ret["result"], ret["changes"]) == (True, {})


def test_a_pool_elsewhere_is_reported_not_changed(salt):
    salt["kvm_host.pool_info"] = lambda name, uri=None: {**WANTED, "path": "/other"}
    salt["kvm_host.ensure_pool"] = never
    ret = kvm_host.pool_present("default", "/srv/pool")
    assert ret["result"] is False
    assert ret["comment"] == "Pool default exists on /other, not /srv/pool; not changed"


def test_a_failed_call_is_result_false_with_its_message(salt):
    salt["kvm_host.ensure_pool"] = raising(CommandExecutionError("cannot create /srv/pool"))
    ret = kvm_host.pool_present("default", "/srv/pool")
    assert (ret["result"], ret["comment"], ret["changes"]) == (
        False,
        "cannot create /srv/pool",
        {},
    )


def test_the_pool_is_made_and_its_changes_shown(salt):
    salt["kvm_host.ensure_pool"] = lambda name, path, uri=None, adopt=False: {"created": name}
    ret = kvm_host.pool_present("default", "/srv/pool")
    assert ret == {
        "name": "default",
        "result": True,
        "changes": {"created": "default"},
        "comment": "Pool default is present on /srv/pool",
    }


def test_adopt_is_passed_on(salt):
    seen = {}
    salt["kvm_host.ensure_pool"] = lambda name, path, uri=None, adopt=False: (
        seen.update(adopt=adopt) or {"created": name}
    )
    kvm_host.pool_present("default", "/srv/pool", adopt=True)
    assert seen == {"adopt": True}
