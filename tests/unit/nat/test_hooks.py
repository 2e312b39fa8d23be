"""The libvirt hooks (issue #13 item 5, #18 item 3): sh scripts that hand over
to salt-kvm's Python through a root-owned hook.conf, always exit 0, log their
failures where kvm_nat can show them; and whether libvirtd runs them."""

import os
import subprocess
import sys
import time
from pathlib import Path

import salt_kvm
from salt_kvm.nat import hookfiles as hookscript
from salt_kvm.nat import hooks as nathook

# ---- item 5: the sh hooks --------------------------------------------------------


def run_hook(tmp_path, driver="qemu", args=("vm1", "stopped", "end", "-")):
    hook = tmp_path / "hooks" / f"{driver}.d" / hookscript.HOOK_NAME
    return subprocess.run(
        [str(hook), *args],
        input="<domain/>",
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def install(tmp_path, python, path=""):
    return hookscript.install(
        python, path, tmp_path / "nat.json", tmp_path / "hooks", log=tmp_path / "log" / "hook.log"
    )


def test_hooks_are_sh_and_need_no_python_to_be_installed(tmp_path):
    written = install(tmp_path, "/nonexistent/bin/python")
    assert len(written) == 4  # hook.conf, the launcher, two hooks
    launcher = tmp_path / "hooks" / hookscript.LAUNCHER_NAME
    assert launcher.read_text().startswith("#!/bin/sh\n")
    assert os.stat(launcher).st_mode & 0o777 == 0o755
    assert subprocess.run(["sh", "-n", str(launcher)]).returncode == 0
    for driver in hookscript.DRIVERS:
        hook = tmp_path / "hooks" / f"{driver}.d" / hookscript.HOOK_NAME
        assert hook.read_text().startswith("#!/bin/sh\n")
        assert os.stat(hook).st_mode & 0o777 == 0o755
    assert subprocess.run(["sh", "-n", str(hook)]).returncode == 0
    assert install(tmp_path, "/nonexistent/bin/python") == []


def test_hook_without_salt_kvms_python_logs_and_exits_0(tmp_path):
    install(tmp_path, "/nonexistent/bin/python")
    proc = run_hook(tmp_path)
    assert proc.returncode == 0
    log = (tmp_path / "log" / "hook.log").read_text()
    assert "ERROR qemu vm1 stopped: salt-kvm's python '/nonexistent/bin/python'" in log
    assert os.stat(tmp_path / "log" / "hook.log").st_mode & 0o077 == 0
    assert nathook.problems({"vm1"}, tmp_path / "log" / "hook.log")
    assert nathook.problems({"vm2"}, tmp_path / "log" / "hook.log") == []


def test_hook_without_its_launcher_logs_and_exits_0(tmp_path):
    install(tmp_path, sys.executable)
    launcher = tmp_path / "hooks" / hookscript.LAUNCHER_NAME
    launcher.unlink()
    proc = run_hook(tmp_path, "network", ("net1", "started", "begin", "-"))
    assert proc.returncode == 0
    log = (tmp_path / "log" / "hook.log").read_text()
    assert f"ERROR network net1 started: no {launcher}" in log
    assert nathook.problems({"net1"}, tmp_path / "log" / "hook.log")


def test_the_hook_itself_runs_nothing_but_its_launcher_and_the_log_tools(tmp_path):
    """What the distribution's AppArmor profile must let the hook run (see
    tests/integration/test_hooks_apparmor.py): the launcher, in /usr/sbin."""
    assert hookscript.LAUNCHER.parent == Path("/usr/sbin")
    hook = hookscript.script("qemu")
    assert f"LAUNCHER='{hookscript.LAUNCHER}'" in hook
    assert "python" not in hook.replace("Python", "")
    status = hookscript.status(tmp_path / "hooks")
    assert status[0] is False and "not installed" in status[1]


def test_hook_refuses_a_conf_others_can_write(tmp_path):
    install(tmp_path, sys.executable)
    os.chmod(tmp_path / "hooks" / "salt-kvm-hook.conf", 0o666)
    assert run_hook(tmp_path).returncode == 0
    assert "is not root's alone" in (tmp_path / "log" / "hook.log").read_text()


def test_hook_hands_over_to_salt_kvm_and_logs_its_failures(tmp_path):
    package_parent = str(Path(salt_kvm.__file__).resolve().parent.parent)
    install(tmp_path, sys.executable, package_parent)
    proc = run_hook(tmp_path)  # qemu stopped: nothing to do
    assert proc.returncode == 0, proc.stderr
    assert (
        not (tmp_path / "log" / "hook.log").exists()
        or "ERROR" not in (tmp_path / "log" / "hook.log").read_text()
    )
    # A state file that is not JSON: the handler fails, the hook still exits 0.
    (tmp_path / "nat.json").write_text("{not json")
    proc = run_hook(tmp_path, "qemu", ("vm1", "release", "end", "-"))
    assert proc.returncode == 0
    log = (tmp_path / "log" / "hook.log").read_text()
    assert "ERROR qemu vm1 release" in log and "unreadable" in log


def test_status_says_whether_libvirtd_runs_the_hooks(tmp_path, monkeypatch):
    hooks = tmp_path / "hooks"
    active, why = hookscript.status(hooks)
    assert not active and "not installed" in why and "install_hooks" in why
    install(tmp_path, sys.executable)
    started = time.time() - 3600
    monkeypatch.setattr(hookscript, "daemon_started", lambda: ("libvirtd", started))
    active, why = hookscript.status(hooks)
    assert not active and "written after libvirtd started" in why and "restart" in why
    monkeypatch.setattr(hookscript, "daemon_started", lambda: ("libvirtd", time.time() + 5))
    assert hookscript.status(hooks)[0] is True
    monkeypatch.setattr(hookscript, "daemon_started", lambda: None)
    assert hookscript.status(hooks) == (
        False,
        "libvirtd is not running: the hooks load when it starts",
    )


def test_installed_hooks_import_this_package(tmp_path):
    """kvm_nat.install_hooks writes the folder holding salt_kvm (wherever the
    module doing the writing sits in the package) and the hook can import it."""
    hooks = tmp_path / "hooks"
    nathook.install(hooks, state=tmp_path / "nat.json", log=tmp_path / "log" / "hook.log")
    conf = dict(
        line.split("=", 1)
        for line in (hooks / "salt-kvm-hook.conf").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert conf["path"] == str(Path(salt_kvm.__file__).resolve().parent.parent)
    proc = run_hook(tmp_path)  # qemu stopped: nothing to do
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "log" / "hook.log"
    assert not log.exists() or "ERROR" not in log.read_text()
