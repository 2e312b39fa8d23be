"""The one redaction helper: URLs lose userinfo and query, secret keys are
masked, known secrets vanish from free text."""

import pytest

from salt_kvm import redact

SECRET = "hunter2-Xy9"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"https://bob:{SECRET}@images.example/d.qcow2?token={SECRET}",
            "https://images.example/d.qcow2",
        ),
        (f"http://{SECRET}@127.0.0.1:8080/a/b.img#frag", "http://127.0.0.1:8080/a/b.img"),
        (f"ssh://root:{SECRET}@[::1]:2222/srv", "ssh://[::1]:2222/srv"),
        ("https://images.example/plain.qcow2", "https://images.example/plain.qcow2"),
        ("/var/lib/images/a.qcow2", "/var/lib/images/a.qcow2"),
        ("file:///var/lib/images/a.qcow2", "file:///var/lib/images/a.qcow2"),
    ],
)
def test_url_keeps_where_and_drops_credentials(url, shown):
    assert redact.url(url) == shown


def test_an_unparsable_url_is_masked_whole():
    assert redact.url(f"http://u:{SECRET}@host:notaport/x") == redact.MASK


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "sudo_password",
        "libvirt_password",
        "Password",
        "priv_key",
        "minion.pem",
        "api_token",
        "client-secret",
        "script_args",
        "passphrase",
        "user_data",
    ],
)
def test_secret_keys(key):
    assert redact.is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["name", "image", "pub_key", "private_key", "key_filename", "author", "tokenizer", 5, None],
)
def test_other_keys_are_shown(key):
    assert not redact.is_secret_key(key)


def test_text_masks_known_secrets_and_urls_in_prose():
    line = (
        f"running /tmp/d/deploy.sh -x {SECRET}; fetching "
        f"https://bob:pw@img.example/a.qcow2?sig={SECRET}&x=1 now"
    )
    out = redact.text(line, [SECRET, None, ""])
    assert SECRET not in out and "bob" not in out and "pw@" not in out
    assert "https://***@img.example/a.qcow2?***" in out


def test_mapping_masks_nested_values_and_leaves_the_input_alone():
    data = {
        "name": "vm1",
        "password": SECRET,
        "deploy": {"script_args": f"-P {SECRET}", "args": [f"x {SECRET}"]},
        "image": f"https://u:{SECRET}@h/i.qcow2?t={SECRET}",
        "empty_password": "",
    }
    out = redact.mapping(data, [SECRET])
    assert SECRET not in repr(out)
    assert out["name"] == "vm1" and out["password"] == redact.MASK
    assert out["deploy"]["script_args"] == redact.MASK
    assert out["empty_password"] == ""
    assert data["password"] == SECRET  # a copy
