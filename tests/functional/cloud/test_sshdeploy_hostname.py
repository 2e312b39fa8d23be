"""The SSH deploy's first command, run for real in private mount and UTS
namespaces (this host's name and /etc/hostname are not touched): it makes the
private directory and sets the guest's hostname in one session, and a hostname
that cannot be set is a warning, not a failed deploy."""

import os
import shutil
import subprocess

import pytest

from salt_kvm.cloud import sshdeploy

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1)",
)


class _Shell:
    """A Session whose commands run in new namespaces, /etc/hostname bound to
    a file of the test's (read-only with ``frozen``)."""

    def __init__(self, tmp_path, frozen=False):
        # hostnamectl would reach this host's systemd-hostnamed (outside any
        # namespace): one that fails stands in, and the fallback runs.
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        (self.bin / "hostnamectl").write_text("#!/bin/sh\nexit 1\n")
        (self.bin / "hostnamectl").chmod(0o755)
        self.etc_hostname = tmp_path / "hostname"
        self.etc_hostname.write_text("before\n")
        self.frozen, self.client, self.ran = frozen, self, []

    def get_transport(self):
        return self

    def get_username(self):
        return "root"

    def run(self, command, timeout=600):
        self.ran.append(command)
        ro = " && mount -o remount,ro,bind /etc/hostname" if self.frozen else ""
        inner = f'mount --bind {self.etc_hostname} /etc/hostname{ro} && exec sh -c "$1"'
        proc = subprocess.run(
            [
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                inner,
                "sh",
                command,
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        return proc.returncode, proc.stdout, proc.stderr

    def put(self, data, path, mode=0o600):
        self.ran.append(f"put {path}")


def bundle(tmp_path):
    return sshdeploy.Bundle(
        deploy_command="true", tmp_dir=str(tmp_path / "work"), hostname="vm-new"
    )


def test_one_command_makes_the_directory_and_sets_the_hostname(tmp_path, caplog):
    shell = _Shell(tmp_path)
    sshdeploy.run(shell, bundle(tmp_path))
    first = shell.ran[0]
    assert "mkdir -m 700" in first and "vm-new" in first
    assert shell.etc_hostname.read_text().strip() == "vm-new"
    assert "could not set the hostname" not in caplog.text
    assert len(shell.ran) == 3  # prepare + hostname, the deploy command, the cleanup


def test_a_hostname_that_cannot_be_set_is_a_warning(tmp_path, caplog):
    shell = _Shell(tmp_path, frozen=True)
    sshdeploy.run(shell, bundle(tmp_path))
    assert shell.etc_hostname.read_text() == "before\n"
    assert "could not set the hostname to vm-new" in caplog.text


def test_a_directory_that_cannot_be_made_fails_before_anything_else(tmp_path):
    (tmp_path / "file").write_text("")
    shell = _Shell(tmp_path)
    b = bundle(tmp_path)
    b.deploy_command = f"{tmp_path}/file/sub/x.sh"
    b.tmp_dir = str(tmp_path / "file" / "sub")
    with pytest.raises(sshdeploy.DeployError, match="cannot create"):
        sshdeploy.run(shell, b)
    assert shell.etc_hostname.read_text() == "before\n"
    assert len(shell.ran) == 1
