"""Salt finds salt-kvm's loader modules through the salt.loader entry point:
the cloud driver in salt-cloud (3008 and 3007, where it replaces Salt's own
libvirt driver), execution and state modules in salt-call, and the classic
salt://_modules sync."""

import json
import shutil

import pytest
import yaml

from .saltenv import REPO, VENV_3007, VENV_3008, minion_config, run, salt_call, salt_config


@pytest.mark.parametrize("venv", [VENV_3008, VENV_3007], ids=["salt3008", "salt3007"])
def test_salt_cloud_loads_salt_kvm_libvirt_driver(venv, tmp_path):
    assert (venv / "bin" / "salt-cloud").exists(), f"{venv} has no salt-cloud"
    conf = salt_config(tmp_path, "master", {})
    providers = conf / "cloud.providers.d"
    providers.mkdir()
    (providers / "kvm.conf").write_text(
        yaml.safe_dump({"testhv": {"driver": "libvirt", "url": "test:///default"}})
    )
    version = run([str(venv / "bin" / "salt-cloud"), "--version"])
    out = json.loads(
        run(
            [
                str(venv / "bin" / "salt-cloud"),
                "-c",
                str(conf),
                "--list-locations",
                "testhv",
                "--out=json",
                "--log-level=quiet",
            ]
        )
    )
    facts = out["testhv"]["libvirt"]["test:///default"]
    assert facts["driver"].startswith("salt-kvm "), (version, facts)
    assert facts["hypervisor"] == "TEST"


def test_salt_call_loads_module_and_state_from_the_package(tmp_path):
    conf = minion_config(tmp_path)
    facts = salt_call(conf, "kvm_host.info", "uri=test:///default")
    assert facts["hypervisor"] == "TEST" and "default-pool" in facts["pools"]
    state = salt_call(
        conf,
        "state.single",
        "kvm_host.pool_present",
        "name=images",
        f"path={tmp_path / 'images'}",
        "uri=test:///default",
    )
    (result,) = state.values()
    assert result["result"] is True and result["changes"]["new"]["active"] is True


def test_classic_sync_from_salt_underscore_dirs(tmp_path):
    srv = tmp_path / "srv"
    for kind in ("_modules", "_states"):
        shutil.copytree(REPO / kind, srv / kind)
    conf = minion_config(tmp_path, file_roots={"base": [str(srv)]})
    synced = salt_call(conf, "saltutil.sync_all")
    assert "modules.kvm_host" in synced["modules"]
    assert "states.kvm_host" in synced["states"]
    assert salt_call(conf, "kvm_host.info", "uri=test:///default")["hypervisor"] == "TEST"
