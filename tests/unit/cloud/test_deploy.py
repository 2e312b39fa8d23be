from salt_kvm.cloud import deploy as cloud_deploy
from salt_kvm.cloud.sshdeploy import Bundle


def plan():
    files = {
        "minion.pem": (b"PRIVATE", 0o600),
        "minion.pub": (b"PUBLIC", 0o600),
        "minion": (b"master: 192.0.2.1\n", 0o600),
    }
    return cloud_deploy.Plan(Bundle(files=files), "vm1", "PUBLIC", 60)


def test_keys_and_config_become_write_files_with_private_modes():
    files = {f["path"]: f for f in cloud_deploy.cloud_config(plan())["write_files"]}
    assert files["/etc/salt/pki/minion/minion.pem"]["permissions"] == "0600"
    assert files["/etc/salt/pki/minion/minion.pem"]["content"] == "PRIVATE"
    assert files["/etc/salt/minion"]["content"] == "master: 192.0.2.1\n"


def test_minion_starts_after_cloud_inits_first_stage_once_files_are_written():
    config = cloud_deploy.cloud_config(plan())
    # The marker the early start waits for is written last.
    assert config["write_files"][-1]["path"] == cloud_deploy.SEEDED
    (early,) = config["bootcmd"]
    assert early[:3] == ["cloud-init-per", "instance", "salt-kvm-minion-start"]
    assert "--no-block" in early and "--property=DefaultDependencies=no" in early
    assert "$" not in early[-1]
    assert f"[ -e {cloud_deploy.SEEDED} ]" in early[-1]
    assert early[-1].endswith(f"exec /bin/sh {cloud_deploy.START_SCRIPT}")
    # The start script is written before the marker, and...
    paths = [f["path"] for f in config["write_files"]]
    assert paths.index(cloud_deploy.START_SCRIPT) < paths.index(cloud_deploy.SEEDED)
    # ...salt-minion's own ordering would wait for all of cloud-init's first stage.
    assert (
        "restart --no-block --job-mode=ignore-dependencies salt-minion.service"
        in cloud_deploy.START_SCRIPT_TEXT
    )


# ---- the guest-side start script, run here with stand-ins for systemd ------------

STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
case "$(basename "$0") $1" in
  "systemctl cat") [ -e "{unit}" ] ;;
  "systemctl is-failed") [ -e "{failed}" ] ;;
  *) exit 0 ;;
esac
"""


def run_start_script(tmp_path, unit=False, binary=True, failed=False):
    """The start script with its paths moved under tmp_path and systemctl,
    systemd-run, journalctl, sleep stubbed; returns (status, calls, root)."""
    import subprocess

    root, bin_dir, log = tmp_path / "root", tmp_path / "bin", tmp_path / "calls"
    (root / "run/salt-kvm").mkdir(parents=True)
    bin_dir.mkdir()
    paths = {"unit": tmp_path / "has-unit", "failed": tmp_path / "failed", "log": log}
    if unit:
        paths["unit"].write_text("")
    if failed:
        paths["failed"].write_text("")
    for tool in ("systemctl", "systemd-run", "journalctl", "sleep"):
        (bin_dir / tool).write_text(STUB.format(**paths))
        (bin_dir / tool).chmod(0o755)
    if binary:
        (bin_dir / "salt-minion").write_text("#!/bin/sh\n")
        (bin_dir / "salt-minion").chmod(0o755)
    script = cloud_deploy.START_SCRIPT_TEXT.replace("/run/", f"{root}/run/")
    script = script.replace("/etc/systemd/", f"{root}/etc/systemd/").replace(
        "/dev/console", "/dev/null"
    )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["/bin/sh", "-c", script], env=env, check=False, timeout=60)
    status = (root / "run/salt-kvm/minion-status").read_text()
    calls = log.read_text().splitlines() if log.exists() else []
    return status, calls, root


def test_image_with_the_unit_restarts_it_ignoring_its_ordering(tmp_path):
    status, calls, root = run_start_script(tmp_path, unit=True)
    assert status == "started salt-minion.service\n"
    assert (
        "systemctl restart --no-block --job-mode=ignore-dependencies salt-minion.service" in calls
    )
    assert not any(c.startswith("systemd-run") for c in calls)
    assert not (root / "etc/systemd/system/salt-minion.service").exists()
    # The start is queued first: each systemctl costs a TCG guest 0.1-0.2 s,
    # and the CPU weight and the link for the next boots need not come before.
    restart = calls.index(
        "systemctl restart --no-block --job-mode=ignore-dependencies salt-minion.service"
    )
    later = [c for c in calls if c.startswith(("systemctl set-property", "systemctl --no-reload"))]
    assert len(later) == 2 and all(calls.index(c) > restart for c in later)


def test_image_without_the_unit_runs_the_minion_as_a_transient_unit(tmp_path):
    status, calls, root = run_start_script(tmp_path, unit=False)
    assert status == f"started {cloud_deploy.TRANSIENT_UNIT}\n"
    (run,) = [c for c in calls if c.startswith("systemd-run")]
    assert f"--unit={cloud_deploy.TRANSIENT_UNIT}" in run
    assert run.endswith(f"{tmp_path}/bin/salt-minion")
    # ...and the next boots start it from a unit of its own.
    unit = (root / "etc/systemd/system/salt-minion.service").read_text()
    assert f"ExecStart={tmp_path}/bin/salt-minion" in unit
    assert (root / "etc/systemd/system/multi-user.target.wants/salt-minion.service").exists()


def test_no_unit_and_no_binary_is_reported_as_the_cause(tmp_path):
    status, calls, _ = run_start_script(tmp_path, unit=False, binary=False)
    assert status.startswith(
        "failed: the image has no salt-minion.service unit and no salt-minion on PATH"
    )
    assert not any(c.startswith(("systemd-run", "systemctl restart")) for c in calls)


def test_a_unit_that_fails_at_once_is_reported(tmp_path):
    status, _, _ = run_start_script(tmp_path, unit=True, failed=True)
    assert status.startswith("failed: salt-minion.service failed")


# ---- the host side: fail fast on the guest's word --------------------------------


class Listener:
    def get_event(self, wait, tag, full):
        return None


def test_wait_for_minion_stops_at_the_guests_failure(monkeypatch):
    import time

    import pytest

    from salt_kvm.cloud.provision import Guest
    from salt_kvm.errors import SaltKvmError

    monkeypatch.setattr(cloud_deploy, "CHECK_EVERY", 0.0)
    statuses = iter([None, "failed: no salt-minion\x1b[31m on PATH\n"])
    monkeypatch.setattr(cloud_deploy.guestagent, "read_file", lambda dom, path: next(statuses))
    guest = Guest("vm1", None, [])
    started = time.monotonic()
    with pytest.raises(SaltKvmError) as err:
        cloud_deploy._wait_for_minion(
            Listener(), "vm1", 300, lambda: cloud_deploy.check_minion_start(guest)
        )
    assert time.monotonic() - started < 10
    assert str(err.value) == "the minion cannot start in the guest vm1: no salt-minion [31m on PATH"
