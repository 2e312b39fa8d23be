"""``-a destroy``'s arguments are checked before anything is announced or
touched: a bad ``delete_disks`` fires no ``destroying`` event, opens no
connection and removes no minion key."""

import pytest
from salt.exceptions import SaltCloudConfigError

from salt_kvm.clouds import libvirt as driver


@pytest.mark.parametrize("value", ["perhaps", 2, "true\n"])
def test_a_bad_delete_disks_is_refused_before_the_destroying_event(monkeypatch, value):
    fired = []

    def nothing(*args, **kwargs):
        raise AssertionError("nothing is touched before the arguments are checked")

    monkeypatch.setattr(driver, "_fire", lambda name, step, data: fired.append(step))
    monkeypatch.setattr(driver, "_guest_connection", nothing)
    monkeypatch.setattr(driver.salt.utils.cloud, "remove_key", nothing)
    with pytest.raises(SaltCloudConfigError, match="^delete_disks: "):
        driver.destroy("vm1", {"delete_disks": value}, call="action")
    assert fired == []


def _destroy_with(monkeypatch, removed):
    keys = []
    monkeypatch.setattr(driver, "__opts__", {"pki_dir": "/etc/salt/pki/master"}, raising=False)
    monkeypatch.setattr(driver, "_fire", lambda *a: None)
    monkeypatch.setattr(driver, "_destroy_on_hypervisor", lambda name, delete: dict(removed))
    monkeypatch.setattr(driver.salt.utils.cloud, "remove_key", lambda pki, key: keys.append(key))
    driver.destroy("vm1", {}, call="action")
    return keys


def test_destroy_removes_the_recorded_minion_key_too(monkeypatch):
    # minion: {id: web1} or append_domain: the key salt-cloud accepted was not vm1's
    assert _destroy_with(monkeypatch, {"minion_id": "vm1.example.com"}) == [
        "vm1",
        "vm1.example.com",
    ]
    assert _destroy_with(monkeypatch, {}) == ["vm1"]


def test_a_recorded_minion_id_that_is_not_a_key_name_is_not_followed(monkeypatch):
    for recorded in ["../../../etc/passwd", "a/b", "", ".", "..", "x\n"]:
        assert _destroy_with(monkeypatch, {"minion_id": recorded}) == ["vm1"]
