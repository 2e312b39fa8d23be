from salt_kvm import cloud_deploy
from salt_kvm.deploy import Bundle


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
    assert "--no-block" in early and "--property=After=cloud-init.service" in early
    assert f"[ -e {cloud_deploy.SEEDED} ]" in early[-1]
    assert early[-1].endswith(cloud_deploy.MINION_START)
