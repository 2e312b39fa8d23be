"""cloud_init profile key: validation, user_data rendering, and how user_data
merges with salt-kvm's own cloud-config and the minion preseed."""

import email

import pytest
import yaml

from salt_kvm.cloud import cloudinit
from salt_kvm.cloud import deploy as cloud_deploy
from salt_kvm.cloud.spec import NicSpec, build_spec
from salt_kvm.errors import SpecError
from tests.unit.cloud.test_seed import read_iso

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdTkEaG7sL1HcH1X3oUqXzFZrxvRvaqZ0ZkE1E2bYtM test@host"
MINION = {
    "write_files": [{"path": "/etc/salt/minion", "content": "master: 10.0.0.1\n"}],
    "runcmd": [["sh", "-c", "systemctl restart salt-minion"]],
}
CONTEXT = cloudinit.context(
    "web1.lan",
    [NicSpec(network="n", mac="52:54:00:00:00:09", ip="192.168.213.9")],
    {"role": "web"},
    minion_id="web1.lan",
)


def cloud_config(data: bytes) -> dict:
    assert data.startswith(b"#cloud-config\n"), data[:60]
    return yaml.safe_load(data)


def parts(data: bytes) -> list[tuple[str, str]]:
    message = email.message_from_bytes(data)
    assert message.is_multipart()
    return [
        (p.get_content_type(), p.get_payload(decode=True).decode())
        for p in message.walk()
        if not p.is_multipart()
    ]


# ---- parsing ----------------------------------------------------------------


def test_full_cloud_init_parses(tmp_path):
    pub = tmp_path / "id.pub"
    pub.write_text(KEY + "\n")
    blob = tmp_path / "blob"
    blob.write_bytes(b"\xff\x00binary")
    spec = cloudinit.parse(
        {
            "user_data": "#!/bin/sh\necho hi\n",
            "meta_data": {"local-hostname": "other"},
            "network_config": "version: 2\nethernets: {eth0: {dhcp4: true}}",
            "authorized_keys": [KEY, str(pub)],
            "files": {
                "/etc/motd": "hello\n",
                "/opt/data": {"content": "x", "mode": 640, "owner": "app:app"},  # unquoted 0640
                "/opt/blob": {"source": str(blob), "mode": "600"},
            },
            "packages": ["htop"],
            "runcmd": ["echo one", ["echo", "two"]],
        }
    )
    assert spec.authorized_keys == [KEY, KEY]
    assert spec.network_config["version"] == 2
    assert [(f.path, f.mode, f.owner) for f in spec.files] == [
        ("/etc/motd", None, None),
        ("/opt/data", "0640", "app:app"),
        ("/opt/blob", "0600", None),
    ]
    assert spec.files[2].content == b"\xff\x00binary"


def test_user_data_from_a_file_and_template_by_suffix(tmp_path):
    path = tmp_path / "ud.yaml.j2"
    path.write_text("#cloud-config\nhostname: {{ hostname }}\n")
    spec = cloudinit.parse({"user_data": str(path)})
    assert spec.template and spec.user_data_origin == str(path)
    assert cloudinit.render(spec, CONTEXT) == "#cloud-config\nhostname: web1\n"


@pytest.mark.parametrize(
    "value,key",
    [
        ("text", "cloud_init"),
        ({"userdata": "x"}, "cloud_init"),
        ({"template": "mako"}, "cloud_init.template"),
        ({"user_data": ""}, "cloud_init.user_data"),
        ({"user_data": "/no/such/file"}, "cloud_init.user_data"),
        ({"meta_data": {"instance-id": "i-1"}}, "cloud_init.meta_data"),
        ({"meta_data": "- a list"}, "cloud_init.meta_data"),
        ({"network_config": {"ethernets": {}}}, "cloud_init.network_config"),
        ({"authorized_keys": "not a key"}, "cloud_init.authorized_keys"),
        ({"authorized_keys": []}, "cloud_init.authorized_keys"),
        ({"authorized_keys": ["/no/such.pub"]}, "cloud_init.authorized_keys"),
        ({"files": ["/etc/motd"]}, "cloud_init.files"),
        ({"files": {"etc/motd": "x"}}, "cloud_init.files[etc/motd]"),
        ({"files": {"/a/../b": "x"}}, "cloud_init.files[/a/../b]"),
        ({"files": {"/a": {"mode": "0640"}}}, "cloud_init.files[/a]"),
        ({"files": {"/a": {"content": "x", "source": "/b"}}}, "cloud_init.files[/a]"),
        ({"files": {"/a": {"content": 5}}}, "cloud_init.files[/a].content"),
        ({"files": {"/a": {"content": "x", "mode": "rw"}}}, "cloud_init.files[/a].mode"),
        ({"files": {"/a": {"content": "x", "mode": "0999"}}}, "cloud_init.files[/a].mode"),
        ({"files": {"/a": {"content": "x", "owner": "a b"}}}, "cloud_init.files[/a].owner"),
        ({"files": {"/a": {"source": "/no/such"}}}, "cloud_init.files[/a].source"),
        ({"packages": "htop"}, "cloud_init.packages"),
        ({"runcmd": [1]}, "cloud_init.runcmd"),
    ],
)
def test_bad_values_name_the_key(value, key):
    with pytest.raises(SpecError) as err:
        cloudinit.parse(value)
    assert err.value.key == key and err.value.accepted, str(err.value)


def test_the_profile_key_reaches_the_spec():
    base = {"name": "vm1", "base_domain": "b", "password": "pw"}
    assert build_spec(base).cloud_init is None
    spec = build_spec({**base, "cloud_init": {"runcmd": ["true"]}})
    assert spec.cloud_init.runcmd == ["true"]
    with pytest.raises(SpecError, match="cloud_init: unknown key"):
        build_spec({**base, "cloud_init": {"bogus": 1}})


# ---- rendering --------------------------------------------------------------


def test_templates_see_name_addresses_nics_and_grains():
    spec = cloudinit.parse(
        {
            "template": "jinja",
            "user_data": "#cloud-config\nfqdn: {{ name }}\nbootcmd: ['echo {{ ips[0] }} "
            "{{ nics[0].mac }} {{ grains.role }} {{ minion_id }}']\n",
        }
    )
    data = cloud_config(cloudinit.user_data(spec, "root", None, CONTEXT))
    assert data["fqdn"] == "web1.lan"
    assert data["bootcmd"] == ["echo 192.168.213.9 52:54:00:00:00:09 web web1.lan"]


def test_undefined_template_names_are_spec_errors():
    spec = cloudinit.parse({"template": "jinja", "user_data": "#cloud-config\na: {{ nope }}"})
    with pytest.raises(SpecError, match="'nope' is undefined") as err:
        cloudinit.user_data(spec, "root", None, CONTEXT)
    assert err.value.key == "cloud_init.user_data" and "grains" in err.value.accepted


def test_without_template_braces_are_kept():
    spec = cloudinit.parse({"user_data": "#!/bin/sh\necho {{ name }}\n"})
    assert cloudinit.render(spec, CONTEXT) == "#!/bin/sh\necho {{ name }}\n"


# ---- merging ----------------------------------------------------------------


def profile_spec(**extra):
    return cloudinit.parse(
        {
            "authorized_keys": KEY,
            "files": {"/etc/motd": {"content": "hi\n", "mode": "0644"}},
            "runcmd": ["echo profile"],
            **extra,
        }
    )


def test_profile_keys_and_minion_make_one_cloud_config_minion_last():
    data = cloud_config(cloudinit.user_data(profile_spec(packages=["htop"]), "root", MINION, {}))
    assert data["users"] == [
        "default",
        {"name": "root", "ssh_authorized_keys": [KEY], "lock_passwd": False},
    ]
    assert [f["path"] for f in data["write_files"]] == ["/etc/motd", "/etc/salt/minion"]
    assert data["write_files"][0]["permissions"] == "0644"
    assert data["runcmd"] == ["echo profile", MINION["runcmd"][0]]
    assert data["packages"] == ["htop"]


def test_cloud_config_user_data_merges_lists_first_and_keeps_its_scalars():
    user_data = (
        "#cloud-config\nhostname: mine\nruncmd: [echo user]\n"
        "write_files: [{path: /etc/a, content: a}]\napt: {preserve_sources_list: true}\n"
    )
    data = cloud_config(cloudinit.user_data(profile_spec(user_data=user_data), "admin", MINION, {}))
    assert data["hostname"] == "mine"
    assert data["runcmd"] == ["echo user", "echo profile", MINION["runcmd"][0]]
    assert [f["path"] for f in data["write_files"]] == ["/etc/a", "/etc/motd", "/etc/salt/minion"]
    assert data["users"][1]["name"] == "admin"
    assert data["apt"] == {"preserve_sources_list": True}


def test_a_mapping_as_user_data_is_a_cloud_config():
    spec = cloudinit.parse({"user_data": {"timezone": "UTC", "runcmd": ["a"]}})
    data = cloud_config(cloudinit.user_data(spec, "root", MINION, {}))
    assert data["timezone"] == "UTC" and data["runcmd"][0] == "a"


def test_a_script_becomes_a_multipart_with_salt_kvm_config_last():
    spec = profile_spec(user_data="#!/bin/sh\necho script\n")
    found = parts(cloudinit.user_data(spec, "root", MINION, {}))
    assert [ctype for ctype, _ in found] == ["text/plain", "text/cloud-config"]
    assert found[0][1] == "#!/bin/sh\necho script\n"
    ours = yaml.safe_load(found[1][1])
    assert ours["merge_how"] == cloudinit.MERGE_HOW
    assert ours["runcmd"][-1] == MINION["runcmd"][0]


def test_a_mime_user_data_keeps_its_parts():
    mime = (
        'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n'
        "--XX\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho a\n"
        "--XX\nContent-Type: text/cloud-config\n\n#cloud-config\nruncmd: [b]\n--XX--\n"
    )
    found = parts(cloudinit.user_data(cloudinit.parse({"user_data": mime}), "root", MINION, {}))
    assert [ctype for ctype, _ in found] == [
        "text/x-shellscript",
        "text/cloud-config",
        "text/cloud-config",
    ]


def test_no_profile_data_gives_the_minion_preseed_alone():
    assert cloud_config(cloudinit.user_data(None, "root", MINION, {})) == MINION


def test_seed_iso_carries_meta_and_network_config():
    spec = build_spec(
        {
            "name": "web1.lan",
            "base_domain": "b",
            "deploy": False,
            "cloud_init": {
                "meta_data": {"local-hostname": "front"},
                "network_config": {"version": 2},
                "runcmd": ["true"],
            },
        }
    )
    label, files = read_iso(cloud_deploy.seed_iso(spec, None, {}))
    meta = yaml.safe_load(files["meta-data"])
    assert label == "cidata" and meta["local-hostname"] == "front"
    assert meta["instance-id"].startswith("web1.lan-")
    assert yaml.safe_load(files["network-config"]) == {"version": 2}
    assert cloud_config(files["user-data"]) == {"runcmd": ["true"]}
    no_seed = build_spec({"name": "vm", "base_domain": "b", "deploy": False})
    assert cloud_deploy.seed_iso(no_seed, None, {}) is None
