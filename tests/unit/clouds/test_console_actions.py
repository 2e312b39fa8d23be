"""The driver's console and screenshot actions: salt-cloud's -a check, and a
screenshot's path checked before any connection is opened."""

import contextlib

import pytest
from salt.exceptions import SaltCloudConfigError, SaltCloudSystemExit

from salt_kvm.clouds import libvirt as driver


@pytest.mark.parametrize("fn", [driver.console, driver.screenshot])
def test_they_are_actions(fn):
    with pytest.raises(SaltCloudSystemExit, match="is an action: use -a"):
        fn("vm1", call="function")


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({}, "path"),
        ({"path": "/tmp/x.png\n"}, "path"),
        ({"path": "/tmp/x.png", "overwrite": "perhaps"}, "overwrite"),
    ],
)
def test_a_screenshot_needs_a_path_and_a_boolean_overwrite(monkeypatch, kwargs, key):
    def no_connection(*args):
        raise AssertionError("no connection before the arguments are checked")

    monkeypatch.setattr(driver, "_connect", no_connection)
    with pytest.raises(SaltCloudConfigError, match=f"^{key}: "):
        driver.screenshot("vm1", kwargs, call="action")


def test_console_and_screenshot_go_to_the_host_the_guest_is_on(monkeypatch, tmp_path):
    # With several hosts (provider `hosts`) there is no one provider URL: the
    # guest is found wherever it is, as for every other action.
    class Hosts:
        @contextlib.contextmanager
        def guest(self, name):
            yield "hv2", f"connection to hv2 for {name}"

    def no_connection(*args):
        raise AssertionError("the provider's own URL is not the guest's host")

    monkeypatch.setattr(driver, "_fleet", lambda source=None: Hosts())
    monkeypatch.setattr(driver, "_connect", no_connection)
    monkeypatch.setattr(driver.guest_console, "console", lambda conn, name: conn)
    monkeypatch.setattr(driver.guest_console, "screenshot", lambda conn, name, path, ow: conn)
    assert driver.console("vm1", call="action") == "connection to hv2 for vm1"
    shot = driver.screenshot("vm1", {"path": str(tmp_path / "vm1.png")}, call="action")
    assert shot == "connection to hv2 for vm1"
