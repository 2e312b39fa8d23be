"""salt-cloud's SSH deploy, in one SSH session.

salt-cloud's protocol is kept: the minion config, keys, grains and the
deploy script are uploaded into a private temporary directory and the deploy
command runs there. What differs is the transport: one paramiko connection
for every upload and command instead of one ssh/sftp process per file.
"""

from __future__ import annotations

import logging
import posixpath
import shlex
import uuid
from dataclasses import dataclass, field

from salt_kvm import redact
from salt_kvm.errors import SaltKvmError
from salt_kvm.ssh import Session

log = logging.getLogger(__name__)

DEFAULT_TMP_DIR = "/tmp/.saltcloud"
SCRIPT_NAME = "deploy.sh"


class DeployError(SaltKvmError):
    """The deploy command failed in the guest."""


@dataclass
class Bundle:
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    script: bytes | None = None
    deploy_command: str | None = None
    script_args: str | None = None
    bootstrap_style: bool = False  # bootstrap-salt.sh takes -c DIR (and -F)
    force_minion_config: bool = False
    tmp_dir: str = DEFAULT_TMP_DIR
    keep_tmp: bool = False
    sudo: bool = False
    sudo_password: str | None = None
    hostname: str | None = None


def working_dir(tmp_dir: str, deploy_command: str | None) -> str:
    """The directory the files go to.

    salt-cloud appends a random suffix to ``tmp_dir``; a ``deploy_command`` that
    names ``<tmp_dir>/...`` itself (as in Salt's old libvirt docs:
    ``sh /tmp/.saltcloud/deploy.sh``) gets exactly ``tmp_dir`` so it works.
    """
    tmp_dir = tmp_dir.rstrip("/") or DEFAULT_TMP_DIR
    if names_tmp_dir(tmp_dir, deploy_command):
        return tmp_dir
    return f"{tmp_dir}-{uuid.uuid4()}"


def names_tmp_dir(tmp_dir: str, deploy_command: str | None) -> bool:
    """Whether ``deploy_command`` names ``tmp_dir`` itself: the deploy then
    works in (and empties, then removes) exactly ``tmp_dir``."""
    tmp_dir = tmp_dir.rstrip("/") or DEFAULT_TMP_DIR
    return bool(deploy_command) and f"{tmp_dir}/" in str(deploy_command)


def command_line(bundle: Bundle, workdir: str, shown: bool = False) -> str:
    """The deploy command; ``shown=True``: as logs and errors carry it, with
    ``script_args`` (which may hold secrets) masked."""
    command = bundle.deploy_command or posixpath.join(workdir, SCRIPT_NAME)
    if bundle.bootstrap_style:
        command += f" -c {shlex.quote(workdir)}"
        if bundle.force_minion_config:
            command += " -F"
    if bundle.script_args:
        command += f" {redact.MASK if shown else bundle.script_args}"
    return command if not shown else redact.text(command, secrets(bundle))


def secrets(bundle: Bundle) -> list[str]:
    """What the bundle knows to be secret, never in a log line or an error: the
    sudo password, ``script_args`` and each of its longer words (a script may
    echo one back)."""
    found = [s for s in (bundle.script_args, bundle.sudo_password) if s]
    for word in (bundle.script_args or "").split():
        value = word.split("=", 1)[1] if word.startswith("-") and "=" in word else word
        if len(value) >= 6 and not value.startswith("-"):
            found.append(value)
    return found


def _as_root(bundle: Bundle, command: str) -> str:
    if not bundle.sudo:
        return command
    if bundle.sudo_password:
        return f"sudo -S -p '' sh -c {shlex.quote(command)}"
    return f"sudo -n sh -c {shlex.quote(command)}"


def _run(session: Session, bundle: Bundle, command: str) -> tuple[int, str, str]:
    full = _as_root(bundle, command)
    if bundle.sudo and bundle.sudo_password:
        stdin, stdout, stderr = session.client.exec_command(full, timeout=900)
        stdin.write(bundle.sudo_password + "\n")
        stdin.flush()
        out, err = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
        return stdout.channel.recv_exit_status(), out, err
    return session.run(full, timeout=900)


# Printed on stdout when the hostname could not be set (the deploy goes on).
HOSTNAME_FAILED = "salt-kvm: the hostname was not set"


def hostname_command(hostname: str) -> str:
    name = shlex.quote(hostname)
    return (
        f"{{ hostnamectl set-hostname {name} 2>/dev/null || "
        f"{{ echo {name} > /etc/hostname && hostname {name}; }}; }} >&2 "
        f"|| echo {shlex.quote(HOSTNAME_FAILED)}"
    )


def run(session: Session, bundle: Bundle) -> str:
    """Upload the bundle and run the deploy command; return its output."""
    workdir = working_dir(bundle.tmp_dir, bundle.deploy_command)
    quoted = shlex.quote(workdir)
    user = session.client.get_transport().get_username()
    # A fresh private directory owned by the login user (keys go in there).
    prepare = f"rm -rf {quoted} && mkdir -m 700 -p {quoted}"
    if bundle.sudo:
        prepare += f" && chown {shlex.quote(user)} {quoted}"
    if bundle.hostname:
        # One command (each costs the guest a session) for both, before the
        # minion starts: its grains read the hostname.
        prepare = f"{prepare} || exit 1; {hostname_command(bundle.hostname)}"
    code, out, err = _run(session, bundle, prepare)
    if code != 0:
        output = redact.text(err or out, secrets(bundle))
        raise DeployError(f"cannot create {workdir} in the guest: {output}")
    if HOSTNAME_FAILED in out:
        log.warning(
            "could not set the hostname to %s: %s",
            bundle.hostname,
            redact.text(err.strip() or "no output", secrets(bundle)),
        )
    for name, (data, mode) in bundle.files.items():
        session.put(data, posixpath.join(workdir, name), mode)
    if bundle.script is not None:
        session.put(bundle.script, posixpath.join(workdir, SCRIPT_NAME), 0o700)
    command = command_line(bundle, workdir)
    shown = command_line(bundle, workdir, shown=True)
    log.info("running the deploy command: %s", shown)
    code, out, err = _run(session, bundle, command)
    if not bundle.keep_tmp:
        _run(session, bundle, f"rm -rf {quoted}")
    if code != 0:
        output = redact.text((err or out)[-2000:], secrets(bundle))
        raise DeployError(f"the deploy command {shown!r} failed with exit code {code}:\n{output}")
    return out
