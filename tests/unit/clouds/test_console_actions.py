"""The driver's console and screenshot actions: salt-cloud's -a check, and a
screenshot's path checked before any connection is opened."""

import pytest
from salt.exceptions import SaltCloudConfigError, SaltCloudSystemExit

from salt_kvm.clouds import libvirt as driver


@pytest.mark.parametrize("fn", [driver.console, driver.screenshot])
def test_they_are_actions(fn):
    with pytest.raises(SaltCloudSystemExit, match="is an action: use -a"):
        fn("vm1", call="function")


@pytest.mark.parametrize(
    "kwargs,key",
    [({}, "path"), ({"path": "/tmp/x.png", "overwrite": "perhaps"}, "overwrite")],
)
def test_a_screenshot_needs_a_path_and_a_boolean_overwrite(monkeypatch, kwargs, key):
    def no_connection(*args):
        raise AssertionError("no connection before the arguments are checked")

    monkeypatch.setattr(driver, "_connect", no_connection)
    with pytest.raises(SaltCloudConfigError, match=f"^{key}: "):
        driver.screenshot("vm1", kwargs, call="action")
