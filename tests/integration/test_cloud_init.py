"""The profile's ``cloud_init`` on a booted guest, through real salt-cloud: an
authorized key (the SSH deploy logs in with it: no password in the profile),
files with content and mode (the SlapOS data-to-vm use), a templated script
as user_data merged with the profile's runcmd, and the seed gone afterwards."""

import json
import subprocess

import pytest

from salt_kvm import ssh

from .cloudcheck import assert_gone, created
from .conftest import GUEST_PASSWORD, GUEST_USER, prefixed_volumes, unique


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def guest(hv, salt, base_domain, key):
    name = unique("ci")
    before = prefixed_volumes(hv)
    salt.write_profiles(
        {
            "ci": {
                "provider": "test-kvm",
                "base_domain": base_domain,
                "clone_strategy": "quick",
                "ssh_username": GUEST_USER,
                "private_key": str(key),  # only works once cloud-init installed the key
                "script": "salt-preinstalled",
                "minion": salt.minion_settings(),
                "grains": {"role": "ci-test"},
                "cloud_init": {
                    "authorized_keys": [f"{key}.pub"],
                    "files": {
                        "/srv/data-to-vm/data.txt": {"content": "from the host\n", "mode": "0640"},
                        "/etc/ski-motd": "hello\n",
                        # unquoted 755 in YAML: 0755, as file.managed reads it (was 01363)
                        "/usr/local/bin/ski-tool": {"content": "#!/bin/sh\n", "mode": 755},
                    },
                    "template": "jinja",
                    "user_data": "#!/bin/sh\necho '{{ name }} {{ grains.role }}' > /root/ud\n",
                    "runcmd": ["touch /root/runcmd-ran"],
                },
            }
        },
        "ci.conf",
    )
    info = created(salt.cloud("-p", "ci", name), name)
    yield name, info
    salt.cloud("-d", name)
    assert_gone(hv, salt, name, before, lambda: prefixed_volumes(hv))


def test_the_authorized_key_logs_in_and_the_password_still_works(guest, key):
    name, info = guest
    assert info["deploy"]["method"] == "ssh"  # the deploy itself used the key
    address = info["ip_address"]
    with ssh.connect(address, GUEST_USER, key_filename=str(key), timeout=120) as session:
        assert session.check("id -un").strip() == "root"
    with ssh.connect(address, GUEST_USER, password=GUEST_PASSWORD, timeout=120) as session:
        assert session.check("hostname").strip() == name.split(".")[0]


def test_files_have_their_content_and_mode(salt, guest):
    name, _ = guest
    out = salt.salt(name, "cmd.run", "stat -c '%a %U' /srv/data-to-vm/data.txt")[name]
    assert out == "640 root"
    out = salt.salt(name, "cmd.run", "stat -c '%a' /usr/local/bin/ski-tool")[name]
    assert out == "755"
    assert salt.salt(name, "file.read", "/srv/data-to-vm/data.txt")[name] == "from the host\n"
    assert salt.salt(name, "file.read", "/etc/ski-motd")[name] == "hello\n"


def test_templated_script_and_runcmd_both_ran(salt, guest):
    name, _ = guest
    # The final stage (scripts, runcmd) may still run after salt-cloud returned:
    # wait in the guest for the file cloud-init writes when it is over. (The
    # test image's cloud-init reports "error" only for its locale module: no
    # locales package in the minbase image.)
    finished = "/var/lib/cloud/instance/boot-finished"
    wait = f"for i in $(seq 600); do [ -f {finished} ] && break; sleep 1; done; ls {finished}"
    assert salt.salt(name, "cmd.run", wait, timeout=660)[name] == finished
    assert salt.salt(name, "file.read", "/root/ud")[name] == f"{name} ci-test\n"
    assert salt.salt(name, "file.file_exists", "/root/runcmd-ran")[name] is True


def test_the_seed_was_ejected_and_deleted(hv, guest, pool_volumes):
    name, info = guest
    assert {v for v in pool_volumes() if v.startswith(name)} == {f"{name}.qcow2"}
    shown = json.dumps(info["disks"])
    assert "seed" not in shown
    cdroms = [d for d in info["disks"] if d["device"] == "cdrom"]
    assert cdroms and all(d["path"] is None for d in cdroms)
