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
