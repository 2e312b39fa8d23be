"""Passwords never travel as kvm_backup arguments (they land in the job cache
and on the event bus), and the SSH deploy never logs script_args or the sudo
password."""

import importlib.util
import logging
from pathlib import Path

import pytest
from salt.exceptions import CommandExecutionError

from salt_kvm.cloud import sshdeploy

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret-Pw-77"


def _module(salt):
    spec = importlib.util.spec_from_file_location("kvm_backup_mod", REPO / "_modules/kvm_backup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__salt__ = salt
    module.__opts__ = {}
    module.__pillar__ = {}
    return module


def _never(*_args, **_kwargs):
    raise AssertionError("nothing may run")


def test_replicate_refuses_a_password_argument(monkeypatch):
    mod = _module({})
    monkeypatch.setattr(mod.backup_ops, "replicate", _never)
    with pytest.raises(CommandExecutionError) as err:
        mod.replicate("vm", "/b", "ssh://root@kvm2/r", password=SECRET)
    assert "password" in str(err.value) and "password_pillar" in str(err.value)
    assert SECRET not in str(err.value)
    with pytest.raises(CommandExecutionError, match="unknown argument.*pasword"):
        mod.replicate("vm", "/b", "ssh://root@kvm2/r", pasword=SECRET)


def test_create_refuses_a_copy_with_a_password_before_any_backup(monkeypatch):
    mod = _module({})
    monkeypatch.setattr(mod, "_with_conn", _never)
    copy = {"target": "ssh://root@kvm2/r", "password": SECRET}
    with pytest.raises(CommandExecutionError) as err:
        mod.create("vm", "/b", copies=[copy])
    assert "copies.password" in str(err.value) and SECRET not in str(err.value)
    url = {"target": f"ssh://root:{SECRET}@kvm2/r"}
    with pytest.raises(CommandExecutionError) as err:
        mod.create("vm", "/b", copies=[url])
    assert "target" in str(err.value) and SECRET not in str(err.value)
    with pytest.raises(CommandExecutionError, match="unknown key.*passwd"):
        mod.create("vm", "/b", copies=[{"target": "/mnt/c", "passwd": SECRET}])


def test_the_password_comes_from_pillar_or_config_by_key_name(monkeypatch):
    looked = []

    def config_get(key):
        looked.append(key)
        return {"kvm:backup:ssh": SECRET}.get(key, "")

    mod = _module({"config.get": config_get})
    got = {}
    monkeypatch.setattr(mod.backup_ops, "replicate", lambda *a, **kw: got.update(kw) or {})
    mod.replicate(
        "vm", "/b", "ssh://root@kvm2/r", password_pillar="kvm:backup:ssh", host_key="SHA256:x"
    )
    assert got["password"] == SECRET and got["host_key"] == "SHA256:x"
    with pytest.raises(CommandExecutionError, match="password_pillar: no password under 'nope'"):
        mod.replicate("vm", "/b", "ssh://root@kvm2/r", password_pillar="nope")
    assert looked == ["kvm:backup:ssh", "nope"]


class _Session:
    """Answers every command; remembers what ran and was uploaded."""

    def __init__(self, code=0):
        self.code, self.ran, self.client = code, [], self

    def get_transport(self):
        return self

    def get_username(self):
        return "debian"

    def run(self, command, timeout=600):
        self.ran.append(command)
        return (self.code if "deploy.sh" in command else 0), f"echo {SECRET}", ""

    def exec_command(self, command, timeout=None):
        raise AssertionError("sudo with a password is not tested here")

    def put(self, data, path, mode=0o600):
        self.ran.append(f"put {path}")


@pytest.mark.parametrize("code", [0, 3])
def test_deploy_never_logs_script_args(caplog, code):
    bundle = sshdeploy.Bundle(script=b"#!/bin/sh\n", script_args=f"-P {SECRET}")
    session = _Session(code)
    with caplog.at_level(logging.DEBUG, logger="salt_kvm"):
        if code:
            with pytest.raises(sshdeploy.DeployError) as err:
                sshdeploy.run(session, bundle)
            assert SECRET not in str(err.value) and "exit code 3" in str(err.value)
        else:
            sshdeploy.run(session, bundle)
    assert any(SECRET in c for c in session.ran)  # the guest still gets them
    assert "running the deploy command" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"password": [SECRET]}, "password"),
        ({"password": {"pw": SECRET}}, "password"),
        ({"cloud_init": {"meta_data": f"token: [{SECRET}\n  - x: ]"}}, "meta_data"),
        ({"cloud_init": {"user_data": ["root", SECRET]}}, "user_data"),
        ({"cloud_init": {"files": {"/etc/t": {"content": {"token": SECRET}}}}}, "content"),
        ({"cloud_init": {"files": {"/etc/t": [SECRET]}}}, "/etc/t"),
        ({"image": f"ftp://u:{SECRET}@h/x.img?token={SECRET}"}, "image"),
    ],
)
def test_refusals_never_quote_a_secret(values, key):
    from salt_kvm.cloud.spec import build_spec
    from salt_kvm.errors import SpecError

    base = {"name": "vm1", "base_domain": "base", "deploy": False}
    if "image" in values:
        base.pop("base_domain")
    with pytest.raises(SpecError) as err:
        build_spec({**base, **values})
    assert key in str(err.value) and SECRET not in str(err.value)
