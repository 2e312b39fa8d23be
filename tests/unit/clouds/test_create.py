"""The driver's create: a failure of any type, before anything is made, still
removes the minion key salt-cloud accepted for it (issue #13 item 11)."""

import pytest
from salt.exceptions import SaltCloudConfigError

from salt_kvm.cloud import cloudinit
from salt_kvm.clouds import libvirt as driver
from salt_kvm.errors import SpecError


@pytest.fixture
def accepted(tmp_path, monkeypatch):
    """A master pki dir holding vm1's accepted key, as salt-cloud leaves it
    before it calls the driver's create."""
    pki = tmp_path / "pki"
    (pki / "minions").mkdir(parents=True)
    key = pki / "minions" / "vm1"
    key.write_text("-----BEGIN PUBLIC KEY-----\n")
    opts = {
        "pki_dir": str(pki),
        "cachedir": str(tmp_path / "cache"),
        "profiles": {"web": {}},
        "providers": {"local": {"libvirt": {}}},
    }
    monkeypatch.setattr(driver, "__opts__", opts, raising=False)
    return key


def failing(exc):
    def spec(vm_):
        raise exc

    return spec


VM = {
    "name": "vm1",
    "profile": "web",
    "driver": "local:libvirt",
    "provider": "local:libvirt",
    "pub_key": "pub",
    "priv_key": "priv",
}


@pytest.mark.parametrize(
    "exc",
    [
        OverflowError("cannot convert float infinity to integer"),
        TypeError("can only concatenate str (not 'int') to str"),
        RuntimeError("anything"),
    ],
)
def test_an_unexpected_error_is_a_failure_that_removes_the_key(accepted, monkeypatch, exc):
    monkeypatch.setattr(driver, "_spec", failing(exc))
    with pytest.raises(SaltCloudConfigError, match=type(exc).__name__):
        driver.create(dict(VM))
    assert not accepted.exists()


def test_ctrl_c_before_anything_is_made_removes_the_key_and_stops(accepted, monkeypatch):
    monkeypatch.setattr(driver, "_spec", failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        driver.create(dict(VM))
    assert not accepted.exists()


def test_a_jinja_type_error_in_user_data_names_the_key():
    spec = cloudinit.parse({"user_data": "#cloud-config\nx: {{ name + 1 }}\n", "template": "jinja"})
    with pytest.raises(SpecError) as err:
        cloudinit.render(spec, {"name": "vm1"})
    assert err.value.key == "cloud_init.user_data"
    assert "TypeError" in str(err.value) or "concatenate" in str(err.value)


def test_disk_allowed_dirs_in_a_profile_is_refused_by_name(accepted, monkeypatch):
    """Which host directories guests may open is the hypervisor operator's
    choice (provider or minion configuration), not a profile writer's."""
    driver.__opts__["profiles"]["web"] = {"disk_allowed_dirs": ["/"], "base_domain": "b"}
    with pytest.raises(SaltCloudConfigError, match=r"profile 'web': disk_allowed_dirs: .*provider"):
        driver.create(dict(VM, disk_allowed_dirs=["/"]))
    assert not accepted.exists()


def test_image_allowed_dirs_in_a_profile_is_refused_by_name(accepted, monkeypatch):
    """Which host files may become a guest's base image is the operator's
    choice, like disk_allowed_dirs."""
    driver.__opts__["profiles"]["web"] = {"image_allowed_dirs": ["/"], "image": "/etc/shadow"}
    with pytest.raises(
        SaltCloudConfigError, match=r"profile 'web': image_allowed_dirs: .*provider"
    ):
        driver.create(dict(VM, image_allowed_dirs=["/"], image="/etc/shadow"))
    assert not accepted.exists()
    driver.__opts__["profiles"]["web"] = {"image": "/etc/shadow"}
    with pytest.raises(
        SaltCloudConfigError, match=r"image: '/etc/shadow' is outside image_allowed"
    ):
        driver.create(dict(VM, image="/etc/shadow"))
    assert not accepted.exists()
