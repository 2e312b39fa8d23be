"""Salt finds salt-kvm's loader modules through the salt.loader entry point:
the cloud driver in salt-cloud (3008 and 3007, where it replaces Salt's own
libvirt driver), execution and state modules in salt-call, and the classic
salt://_modules sync."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_3008 = Path(sys.executable).parent.parent
VENV_3007 = Path(os.environ.get("SALT_KVM_VENV_3007", "/opt/salt-kvm/venv-3007"))


def salt_config(tmp_path: Path, name: str, settings: dict) -> Path:
    conf = tmp_path / "etc"
    conf.mkdir(exist_ok=True)
    base = {
        "root_dir": str(tmp_path / "root"),
        "pki_dir": str(tmp_path / "pki"),
        "cachedir": str(tmp_path / "cache"),
        "sock_dir": str(tmp_path / "sock"),
        "log_file": str(tmp_path / "log"),
        "user": "root",
    }
    (conf / name).write_text(yaml.safe_dump({**base, **settings}))
    return conf


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


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


def minion_config(tmp_path, **extra):
    return salt_config(tmp_path, "minion", {"file_client": "local", "id": "hv", **extra})


def salt_call(conf, *args):
    out = run(
        [
            str(VENV_3008 / "bin" / "salt-call"),
            "--local",
            "-c",
            str(conf),
            "--out=json",
            "--log-level=quiet",
            *args,
        ]
    )
    return json.loads(out)["local"]


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
