"""A real salt-master (and salt-cloud config) in a temporary directory.

The master listens on the test network's host address, on ports of its own,
so guests on that network reach it and nothing else does.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TEST_NET_PREFIX = os.environ.get("SALT_KVM_TEST_NET_PREFIX", "192.168.213")
MASTER_ADDRESS = f"{TEST_NET_PREFIX}.1"
# Every host port a test process listens on is PORT_BASE + an offset from
# this table, so two processes whose bases are PORT_SPAN apart (a worktree
# beside another, scripts/run-integration's streams) never share a port.
# tests/unit/test_testbed_ports.py checks the ranges and their users.
PORT_BASE = int(os.environ.get("SALT_KVM_TEST_PORT_BASE", "45505"))
PORT_SPAN = 100
PORT_RANGES = {  # name: (first offset, how many ports)
    "master": (0, 2),  # this master: publish, ret
    "master_3007": (10, 2),  # test_cloud's Salt 3007 master
    "backup_ssh": (20, 1),  # test_backup's SSH server
    "nat_forwards": (30, 4),  # test_nat's forwards
    "cloud_forward": (40, 1),  # test_cloud's forward
    "takeover_master": (50, 2),  # test_backup's master (the takeover's minion)
    "mirror": (60, 1),  # test_salt_source's wheelhouse
    "migration": (72, 2),  # test_multihost's migration stream and its disks' NBD
    "migration_forward": (74, 1),  # test_multihost's forward to the migrated guest's sshd
    "migration_firmware": (76, 2),  # test_firmware's migration stream and its disks' NBD
    "nat_ipv6": (86, 2),  # test_nat_ipv6's forwards
}


def offset(name: str) -> int:
    """The first offset of ``name``'s ports (for a master's ``port_offset``)."""
    return PORT_RANGES[name][0]


def port(name: str, index: int = 0) -> int:
    """Port ``index`` of ``name``'s range."""
    first, count = PORT_RANGES[name]
    if not 0 <= index < count:
        raise IndexError(f"{name} has {count} port(s), not {index + 1}")
    return PORT_BASE + first + index


PUBLISH_PORT, RET_PORT = port("master"), port("master", 1)


def _terminal_signals() -> None:
    """SIGHUP and SIGINT at their defaults, whatever started the tests: under
    nohup SIGHUP is ignored, in a shell's background job SIGINT, a child
    inherits that, and salt-kvm rightly keeps an ignored signal ignored."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class SaltEnv:
    root: Path
    conf: Path
    process: subprocess.Popen
    bin: Path = BIN
    ret_port: int = RET_PORT

    def minion_settings(self) -> dict:
        return {"master": MASTER_ADDRESS, "master_port": self.ret_port}

    @property
    def pki(self) -> Path:
        return self.root / "pki" / "master"

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(self.bin / cmd[0]), "-c", str(self.conf), *cmd[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    CLOUD_ARGS = ("-y", "--out=json", "--log-level=info")

    def cloud(self, *args: str, check: bool = True, timeout: float = 900):
        proc = self.run("salt-cloud", *self.CLOUD_ARGS, *args, check=check, timeout=timeout)
        return proc

    def cloud_started(self, *args: str) -> subprocess.Popen:
        """salt-cloud running in the background (to interrupt it), with a hangup
        and Ctrl-C acting as from a terminal."""
        return subprocess.Popen(
            [str(self.bin / "salt-cloud"), "-c", str(self.conf), *self.CLOUD_ARGS, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_terminal_signals,
        )

    def salt(self, target: str, *args: str, timeout: int = 60):
        proc = self.run(
            "salt",
            "--out=json",
            "--static",
            f"--timeout={timeout}",
            target,
            *args,
            check=False,
            timeout=timeout + 60,
        )
        try:
            return json.loads(proc.stdout or "{}")
        except json.JSONDecodeError:
            return {"_error": proc.stdout + proc.stderr}

    def watch_events(self, tagmatch: str) -> subprocess.Popen:
        """``salt-run state.event``: one ``tag<TAB>json`` line per matching event."""
        proc = subprocess.Popen(
            [
                str(self.bin / "salt-run"),
                "-c",
                str(self.conf),
                "state.event",
                f"tagmatch={tagmatch}",
                "pretty=False",
                "--log-level=quiet",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        time.sleep(3)  # let it subscribe before anything fires
        return proc

    @staticmethod
    def next_event(proc: subprocess.Popen, timeout: float) -> str | None:
        """The tag of the next event a ``watch_events`` process prints, or None."""
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            return None
        return proc.stdout.readline().partition("\t")[0] or None

    @staticmethod
    def collected_events(proc: subprocess.Popen) -> list[tuple[str, dict]]:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        events = []
        for line in out.splitlines():
            tag, _, data = line.partition("\t")
            try:
                events.append((tag, json.loads(data)))
            except json.JSONDecodeError:
                continue
        return events

    def accepted_keys(self) -> set[str]:
        return {p.name for p in (self.pki / "minions").glob("*")}

    def write_profiles(self, profiles: dict, name: str = "test.conf") -> None:
        _write_private(self.conf / "cloud.profiles.d" / name, yaml.safe_dump(profiles))

    def write_providers(self, providers: dict, name: str = "test.conf") -> None:
        _write_private(self.conf / "cloud.providers.d" / name, yaml.safe_dump(providers))


def _write_private(path: Path, text: str) -> None:
    """Profiles and providers hold passwords: written 0600, as an operator keeps
    them (the secrets test reads every world-readable file under the root)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that existed keeps no wider mode
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def start_master(root: Path, bin_dir: Path = BIN, port_offset: int = 0) -> SaltEnv:
    """Start a salt-master from ``bin_dir`` (a virtualenv's bin: Salt 3008 or 3007),
    on the test ports shifted by ``port_offset`` (so two masters can run)."""
    conf = root / "etc"
    for sub in ("cloud.profiles.d", "cloud.providers.d", "cloud.maps.d", "cloud.deploy.d"):
        (conf / sub).mkdir(parents=True, exist_ok=True)
    master = {
        "root_dir": str(root),
        "pki_dir": str(root / "pki" / "master"),
        "cachedir": str(root / "cache"),
        "sock_dir": str(root / "sock"),
        "log_file": str(root / "master.log"),
        "log_level_logfile": "info",
        "interface": MASTER_ADDRESS,
        "publish_port": PUBLISH_PORT + port_offset,
        "ret_port": RET_PORT + port_offset,
        "user": "root",
        "auto_accept": False,
        "worker_threads": 2,
    }
    (conf / "master").write_text(yaml.safe_dump(master))
    (conf / "cloud").write_text(
        yaml.safe_dump(
            {
                "deploy_scripts_search_path": [str(conf / "cloud.deploy.d")],
                "log_file": str(root / "cloud.log"),
                "log_level_logfile": "debug",
                # What users with salt-ssh's cloud roster set: the driver keeps it.
                "update_cachedir": True,
            }
        )
    )
    deploy_d = conf / "cloud.deploy.d"
    script = REPO / "profiles.example" / "cloud.deploy.d" / "salt-preinstalled.sh"
    shutil.copy(script, deploy_d / "salt-preinstalled.sh")
    # No internet here: salt-cloud's default script name runs the offline one.
    shutil.copy(script, deploy_d / "bootstrap-salt.sh")
    process = subprocess.Popen(
        [str(bin_dir / "salt-master"), "-c", str(conf), "--log-level=warning"],
        stdout=open(root / "master.stdout", "w"),
        stderr=subprocess.STDOUT,
    )
    env = SaltEnv(root, conf, process, bin_dir, RET_PORT + port_offset)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"salt-master died:\n{(root / 'master.stdout').read_text()}")
        if env.run("salt-key", "-L", check=False).returncode == 0 and (root / "sock").exists():
            if any((root / "sock").glob("master_event_pub*")):
                return env
        time.sleep(0.5)
    raise AssertionError("salt-master did not come up within 120 s")


def stop_master(env: SaltEnv) -> None:
    env.process.send_signal(signal.SIGTERM)
    try:
        env.process.wait(30)
    except subprocess.TimeoutExpired:
        env.process.kill()


def provider(name: str = "test-kvm") -> dict:
    return {name: {"driver": "libvirt", "url": "qemu:///system"}}


# ---- salt-call --local with a config of its own (no master) ---------------------

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


def minion_config(tmp_path, **extra):
    return salt_config(tmp_path, "minion", {"file_client": "local", "id": "hv", **extra})


def salt_call_cmd(conf, venv: Path = VENV_3008, quiet: bool = True) -> list[str]:
    """``salt-call --local`` of ``venv`` with the config folder ``conf``, JSON out."""
    cmd = [str(venv / "bin" / "salt-call"), "--local", "-c", str(conf), "--out=json"]
    return [*cmd, "--log-level=quiet"] if quiet else cmd


def salt_call_proc(conf, *args, venv: Path = VENV_3008, timeout: float = 300):
    """The finished ``salt-call``, whatever its exit status."""
    return subprocess.run(
        [*salt_call_cmd(conf, venv), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def salt_call(conf, *args):
    """What ``salt-call`` returned; it must succeed."""
    out = run([*salt_call_cmd(conf), *args])
    return json.loads(out)["local"]
