"""salt-kvm's libvirt hooks under the distribution's AppArmor profile for
libvirtd (issue #18 item 3).

This kernel has no AppArmor (no /sys/kernel/security/apparmor), so nothing
can be denied for real here. The test runs the real hook chain (hook file ->
launcher -> salt-kvm's Python) under ``strace -f``, maps every executed file
onto where ``kvm_nat.install_hooks`` installs it, and checks each exec made
while still confined against the exec rules of the profile(s) the installed
libvirt packages ship (``tests/apparmor.py``: rule globs, deny rules, exec
modes). A Salt onedir's Python (/opt/saltstack/salt/bin/python3.X) is the
case that matters: no rule of Debian's profile lets libvirtd execute it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import salt_kvm
from salt_kvm.nat import hookfiles
from tests import apparmor

pytestmark = pytest.mark.integration

PACKAGE_PARENT = str(Path(salt_kvm.__file__).resolve().parent.parent)
PROFILES = Path("/etc/apparmor.d")
# libvirt's hook environment (it clears the environment and sets PATH).
HOOK_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def installed_profiles():
    """The profiles of the daemons that run network/qemu hooks, as installed."""
    found = {}
    for daemon in hookfiles.DAEMONS:
        path = PROFILES / f"usr.sbin.{daemon}"
        if path.exists():
            found[daemon] = apparmor.load(path)
    return found


def all_profiles():
    profiles = []
    for path in PROFILES.iterdir():
        if path.is_file():
            try:
                profiles += apparmor.load(path)
            except (ValueError, UnicodeDecodeError):
                continue
    return profiles


def trace_hook(tmp_path, python, driver="qemu", args=("vm1", "stopped", "end", "-")):
    """Install the hooks into a fake root and run one under strace; (trace, mapper, log)."""
    root = tmp_path / "root"
    hooks = root / "etc" / "libvirt" / "hooks"
    log = tmp_path / "log" / "hook.log"
    hookfiles.install(
        python,
        PACKAGE_PARENT,
        tmp_path / "nat.json",
        hooks,
        conf=root / "etc" / "salt-kvm" / "hook.conf",
        log=log,
        launcher=root / hookfiles.LAUNCHER.relative_to("/"),
    )
    out = tmp_path / "trace"
    hook = hooks / f"{driver}.d" / hookfiles.HOOK_NAME
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-s", "512", "-o", str(out), "-e",
         "trace=execve,fork,vfork,clone,clone3", str(hook), *args],
        input="<domain/>", capture_output=True, text=True, timeout=120, env=HOOK_ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    def where(path):
        real = os.path.realpath(path)
        if real.startswith(str(root) + "/"):
            return "/" + os.path.relpath(real, root)
        return real

    return out.read_text(), where, log


def onedir_python(tmp_path):
    """A Salt onedir's interpreter, as far as the kernel's exec sees it: a file
    at /opt/saltstack/salt/bin/python3.10 (in the fake root) that runs Python."""
    path = tmp_path / "root" / "opt" / "saltstack" / "salt" / "bin" / "python3.10"
    path.parent.mkdir(parents=True)
    path.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("kind", ["venv", "onedir"])
def test_every_exec_of_the_hook_chain_is_allowed_by_the_distributions_profile(tmp_path, kind):
    assert shutil.which("strace"), "strace is needed (Debian package strace)"
    profiles = installed_profiles()
    assert profiles, f"no libvirt AppArmor profile in {PROFILES} (package libvirt-daemon)"
    python = sys.executable if kind == "venv" else onedir_python(tmp_path)
    trace, where, log = trace_hook(tmp_path, python)
    # The hand-over worked: salt-kvm's Python ran (no error logged).
    assert not log.exists() or " ERROR " not in log.read_text(), log.read_text()
    others = all_profiles()
    for daemon, loaded in profiles.items():
        profile = next(p for p in loaded if p.attach == f"/usr/sbin/{daemon}")
        steps = apparmor.confined_execs(trace, profile, others, where)
        assert steps and steps[0].path.startswith("/etc/libvirt/hooks/"), steps
        denied = [s.outcome.why for s in steps if not s.outcome.allowed]
        assert denied == [], f"{daemon}'s profile denies: {denied}"
        # The chain leaves the profile before salt-kvm's Python starts.
        assert not steps[-1].outcome.confined, [s.outcome.why for s in steps]
        assert all("python" not in s.path for s in steps), [s.path for s in steps]


def test_the_check_denies_a_hook_that_starts_a_onedir_python_itself(tmp_path):
    """The shape of the hook before issue #18 (it ran hook.conf's Python itself):
    the check must catch it, or the test above proves nothing."""
    python = onedir_python(tmp_path)
    hook = tmp_path / "root" / "etc" / "libvirt" / "hooks" / "qemu.d" / "old-style"
    hook.parent.mkdir(parents=True)
    hook.write_text(f"#!/bin/sh\nmkdir -p {tmp_path}/log\nexec {python} -c pass\n")
    hook.chmod(0o755)
    out = tmp_path / "trace"
    subprocess.run(
        ["strace", "-f", "-qq", "-o", str(out), "-e", "trace=execve,fork,vfork,clone,clone3",
         str(hook)], check=True, env=HOOK_ENV, timeout=60,
    )  # fmt: skip
    root = str(tmp_path / "root")

    def where(path):
        real = os.path.realpath(path)
        return "/" + os.path.relpath(real, root) if real.startswith(root + "/") else real

    profile = next(p for p in installed_profiles()["libvirtd"] if p.name == "libvirtd")
    steps = apparmor.confined_execs(out.read_text(), profile, all_profiles(), where)
    denied = [s.path for s in steps if not s.outcome.allowed]
    assert denied[:1] == ["/opt/saltstack/salt/bin/python3.10"], [s.outcome.why for s in steps]
