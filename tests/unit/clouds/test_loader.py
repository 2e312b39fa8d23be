"""The driver through Salt's loader: why it does not load, -a/-f checks,
library errors as SaltCloudConfigError (a profile's or provider's value) or
SaltCloudSystemExit (anything else) with their message, and the minion's
files made by Salt's own helpers without touching ``vm_``."""

import pytest
import salt.config
from salt.exceptions import SaltCloudConfigError, SaltCloudSystemExit

from salt_kvm import saltutil
from salt_kvm.cloud import actions
from salt_kvm.cloud.spec import build_spec
from salt_kvm.clouds import libvirt as driver
from salt_kvm.errors import ConflictError, NotFoundError, SaltKvmError
from tests.unit.loader import never, no_connection, raising

PROVIDER = {"driver": "libvirt", "url": "test:///default"}


@pytest.fixture
def opts(tmp_path):
    return {
        "pki_dir": str(tmp_path / "pki"),
        "cachedir": str(tmp_path / "cache"),
        "sock_dir": str(tmp_path / "sock"),
        "profiles": {"web": {"provider": "local:libvirt", "base_domain": "base"}},
        "providers": {"local": {"libvirt": dict(PROVIDER)}},
    }


@pytest.fixture
def configure_loader_modules(opts):
    return {
        driver: {
            "__opts__": opts,
            "__utils__": {"cloud.fire_event": lambda *a, **k: None},
            "__active_provider_name__": "local:libvirt",
            "connected": no_connection,
        }
    }


def test_without_libvirt_it_does_not_load_and_says_why(monkeypatch):
    monkeypatch.setattr(driver, "HAS_LIBS", False)
    monkeypatch.setattr(driver, "_IMPORT_ERROR", "No module named 'libvirt'", raising=False)
    loaded, why = driver.__virtual__()
    assert loaded is False and "libvirt-python" in why


def test_it_loads_as_libvirt():
    assert driver.__virtual__() == "libvirt"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: driver.show_instance("vm1"), "show_instance is an action"),
        (lambda: driver.start("vm1", call="function"), "start is an action"),
        (lambda: driver.destroy("vm1", call="function"), "destroy is an action"),
        (lambda: driver.list_nodes(call="action"), "list_nodes is a function"),
        (lambda: driver.avail_images(call="action"), "avail_images is a function"),
        (lambda: driver.image_list(call="action"), "image_list is a function"),
        (lambda: driver.cleanup(call="action"), "cleanup is a function"),
        (lambda: driver.image_delete({}, call="function"), "image_delete needs name="),
    ],
)
def test_the_wrong_kind_of_call_is_refused(call, message):
    with pytest.raises(SaltCloudSystemExit, match=message):
        call()


def test_a_library_error_in_an_action_is_a_system_exit_with_its_message(monkeypatch):
    monkeypatch.setattr(actions, "on_managed", raising(NotFoundError("no domain vm9")))
    with pytest.raises(SaltCloudSystemExit, match="^no domain vm9$"):
        driver.start("vm9", call="action")
    monkeypatch.setattr(actions, "describe", raising(SaltKvmError("libvirtd went away")))
    with pytest.raises(SaltCloudSystemExit, match="^libvirtd went away$"):
        driver.show_instance("vm1", call="action")
    monkeypatch.setattr(driver.images, "delete_image", raising(ConflictError("vm2 uses it")))
    with pytest.raises(SaltCloudSystemExit, match="^vm2 uses it$"):
        driver.image_delete({"name": "image-x"}, call="function")


def test_a_bad_provider_value_is_a_configuration_error_by_key(opts):
    opts["providers"]["local"]["libvirt"]["stop_timeout"] = "a while"
    with pytest.raises(SaltCloudConfigError, match="^stop_timeout: "):
        driver.stop("vm1", call="action")


def test_destroy_of_a_missing_guest_keeps_the_message_and_the_key(monkeypatch):
    monkeypatch.setattr(actions, "destroy", raising(NotFoundError("no domain vm9")))
    monkeypatch.setattr(driver.salt.utils.cloud, "remove_key", never)
    with pytest.raises(SaltCloudSystemExit, match="^no domain vm9$"):
        driver.destroy("vm9")


def test_a_bad_profile_value_is_refused_by_profile_and_key_before_anything(monkeypatch, opts):
    opts["profiles"]["web"]["memory"] = "lots"
    monkeypatch.setattr(driver.cloud_deploy, "create", never)
    vm = {"name": "vm1", "profile": "web", "provider": "local:libvirt", "driver": "libvirt"}
    with pytest.raises(SaltCloudConfigError, match="^profile 'web': memory: "):
        driver.create({**vm, **opts["profiles"]["web"], "deploy": False})


def test_the_minions_files_come_from_salts_helpers_and_vm_is_not_changed(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "bootstrap-salt.sh").write_text("#!/bin/sh\necho {{ vm['name'] }}\n")
    opts = salt.config.cloud_config("/nonexistent")  # salt-cloud's defaults
    opts.update(
        deploy_scripts_search_path=[str(scripts)],
        profiles={"web": {"sudo": True}},
        providers={"local": {"libvirt": dict(PROVIDER)}},
    )
    vm = {
        "name": "vm1.lan",
        "profile": "web",
        "provider": "local:libvirt",
        "driver": "libvirt",
        "minion": {"master": "192.0.2.1", "append_domain": "example"},
        "grains": {"role": "web"},
        "password": "pw",
        "base_domain": "base",
    }
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in vm.items()}
    spec = build_spec(saltutil.profile_values(opts, vm))
    assert spec.deploy.sudo is True and spec.deploy.script == "bootstrap-salt"
    made = saltutil.minion_files(opts, vm, spec)
    assert made.key_id == "vm1.lan.example"
    assert made.script.rstrip() == "#!/bin/sh\necho vm1.lan"  # rendered for this VM
    assert sorted(made.files) == ["grains", "minion", "minion.pem", "minion.pub"]
    minion = made.files["minion"][0].decode()
    assert "master: 192.0.2.1" in minion and "profile: web" in minion
    assert made.files["grains"][0].decode() == "role: web\n"
    assert made.pub.startswith("-----BEGIN PUBLIC KEY-----")
    assert vm == before  # new keys are the plan's, not written into vm_


def test_a_missing_deploy_script_is_refused_by_key(tmp_path):
    opts = salt.config.cloud_config("/nonexistent")
    opts.update(deploy_scripts_search_path=[str(tmp_path)], profiles={"web": {}}, providers={})
    vm = {"name": "vm1", "profile": "web", "driver": "libvirt", "minion": {"master": "m"}}
    spec = build_spec({"name": "vm1", "base_domain": "b", "password": "pw", "script": "nope"})
    with pytest.raises(SaltCloudConfigError, match="^profile 'web': script: no deploy script"):
        with saltutil.cloud_errors(saltutil.profile_prefix(vm)):
            saltutil.minion_files(opts, vm, spec)


def test_state_helpers_say_what_would_change_under_test():
    ret = saltutil.state_ret("x")
    assert saltutil.state_changed(ret, {"new": 1}, "would", test=True)["result"] is None
    assert saltutil.state_failed(saltutil.state_ret("x"), ValueError("no"), "x: ")["comment"] == (
        "x: no"
    )


def test_the_connection_comes_from_the_provider_with_libvirts_default(opts):
    provider = {"driver": "libvirt", "url": "qemu+ssh://root@kvm1/system", "libvirt_username": "u"}
    assert saltutil.connection_args(opts, provider) == {
        "uri": "qemu+ssh://root@kvm1/system",
        "username": "u",
        "password": None,
    }
    assert saltutil.connection_args(opts, {"driver": "libvirt"})["uri"] == "qemu:///system"
