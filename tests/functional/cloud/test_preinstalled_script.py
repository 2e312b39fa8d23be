"""profiles.example's salt-preinstalled.sh, run for real in a private mount
namespace (its /etc/salt is a tmpfs there) with a ``systemctl`` that records
its calls: what it installs, with which modes, and how it starts the minion."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "profiles.example" / "cloud.deploy.d" / "salt-preinstalled.sh"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private /etc/salt",
)

FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$CALLS"
"""


def run_script(
    tmp_path: Path, *args: str, systemctl: str = FAKE_SYSTEMCTL
) -> tuple[subprocess.CompletedProcess, Path, list[str]]:
    upload = tmp_path / "upload"
    upload.mkdir()
    for name, text in {
        "minion": "master: 192.0.2.1\nid: vm1\n",
        "minion.pem": "PRIVATE\n",
        "minion.pub": "PUBLIC\n",
        "grains": "role: web\n",
    }.items():
        (upload / name).write_text(text)
    shutil.copy(SCRIPT, upload / "deploy.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(systemctl)
    (bin_dir / "systemctl").chmod(0o755)
    calls = tmp_path / "calls"
    out = tmp_path / "etc-salt"
    # In the namespace: a tmpfs on /etc/salt with a stale minion_id, the
    # script, then a copy of what it left (the tmpfs goes with the namespace).
    inner = (
        "set -e; mkdir -p /etc/salt; mount -t tmpfs tmpfs /etc/salt; "
        "echo old-id > /etc/salt/minion_id; "
        f'sh {upload}/deploy.sh "$@"; rc=$?; cp -a /etc/salt/. {out}/; exit $rc'
    )
    out.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, "sh", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    recorded = calls.read_text().splitlines() if calls.exists() else []
    return proc, out, recorded


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("args", [(), ("-c", "UPLOAD", "-F")])
def test_installs_the_files_and_starts_the_minion_without_a_manager_reload(tmp_path, args):
    args = tuple(str(tmp_path / "upload") if a == "UPLOAD" else a for a in args)
    proc, etc, calls = run_script(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert (etc / "minion").read_text() == "master: 192.0.2.1\nid: vm1\n"
    assert (etc / "grains").read_text() == "role: web\n"
    assert (etc / "pki/minion/minion.pem").read_text() == "PRIVATE\n"
    assert mode(etc / "pki/minion/minion.pem") == 0o600
    assert mode(etc / "pki/minion") == 0o700
    assert mode(etc / "pki/minion/minion.pub") == 0o644
    assert not (etc / "minion_id").exists()  # the id comes from the new config
    # `systemctl enable` alone reloads the whole manager: ~2 s of a TCG guest's
    # vCPU on every deploy, for a unit systemd has loaded since boot.
    assert calls == ["--no-reload enable salt-minion", "restart salt-minion"]


def test_a_failed_start_fails_the_deploy(tmp_path):
    failing = FAKE_SYSTEMCTL + 'case "$1" in restart) exit 1;; esac\n'
    proc, _, calls = run_script(tmp_path, systemctl=failing)
    assert proc.returncode != 0
    assert calls[-1] == "restart salt-minion"
