"""Profile keys firmware, secure_boot, tpm, graphics, graphics_listen: parsed,
and refused by name before anything is made."""

import pytest

from salt_kvm.cloud.spec import build_spec, check_written_keys
from salt_kvm.errors import SpecError

MINIMAL = {"name": "vm1", "base_domain": "base", "password": "pw"}


def spec(**values):
    return build_spec({**MINIMAL, **values})


def rejected(key, **values) -> SpecError:
    with pytest.raises(SpecError) as err:
        spec(**values)
    assert err.value.key == key, str(err.value)
    assert err.value.accepted
    return err.value


def test_without_the_keys_the_base_decides_and_nothing_is_added():
    f = spec().features
    assert (f.firmware, f.secure_boot, f.tpm, f.graphics) == (None, False, False, None)
    assert f.graphics_listen == "127.0.0.1"


def test_efi_secure_boot_tpm_and_vnc():
    f = spec(firmware="EFI", secure_boot=True, tpm="yes", graphics="vnc").features
    assert (f.firmware, f.secure_boot, f.tpm, f.graphics) == ("efi", True, True, "vnc")


def test_secure_boot_without_efi_is_refused_naming_the_key():
    assert "firmware: efi" in str(rejected("secure_boot", secure_boot=True))
    rejected("secure_boot", secure_boot=True, firmware="bios")


@pytest.mark.parametrize(
    "key,value", [("firmware", "uefi"), ("graphics", "rdp"), ("tpm", "maybe"), ("firmware", 1)]
)
def test_unknown_values_are_refused_naming_the_key(key, value):
    rejected(key, **{key: value})


def test_graphics_listen_beyond_loopback_needs_the_providers_allowance():
    err = rejected("graphics_listen", graphics="vnc", graphics_listen="0.0.0.0")
    assert "graphics_listen_allowed" in str(err)
    f = spec(
        graphics="vnc", graphics_listen="192.168.122.1", graphics_listen_allowed=["192.168.122.1"]
    ).features
    assert f.graphics_listen == "192.168.122.1"
    rejected("graphics_listen", graphics_listen="not-an-address")
    rejected("graphics_listen_allowed[0]", graphics_listen_allowed=["nope"])
    rejected("graphics_listen", graphics="none", graphics_listen="127.0.0.1")


def test_graphics_listen_allowed_is_the_hypervisors_key_not_a_profiles():
    with pytest.raises(SpecError) as err:
        check_written_keys({"graphics_listen_allowed": ["0.0.0.0"]}, {})
    assert err.value.key == "graphics_listen_allowed"
    check_written_keys({}, {"graphics_listen_allowed": ["192.168.122.1"]})


def test_a_typo_of_a_new_key_is_refused():
    with pytest.raises(SpecError) as err:
        check_written_keys({"secureboot": True}, {})
    assert "secure_boot" in str(err.value)
