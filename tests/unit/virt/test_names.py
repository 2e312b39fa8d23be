import pytest

from salt_kvm.errors import SpecError
from salt_kvm.virt.names import check_vm_name, hostname_of


@pytest.mark.parametrize("name", ["vm1", "web-01", "vm1.example.com", "a", "A1", "x" * 63])
def test_valid_names(name):
    assert check_vm_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "../etc", "a/b", "-vm", "vm-", "vm_1", "vm 1", ".vm", "vm..x", "x" * 64, None, 5, "vm1."],
)
def test_rejected_names_say_why(name):
    with pytest.raises(SpecError) as err:
        check_vm_name(name)
    assert err.value.key == "name"
    assert "DNS name" in err.value.accepted


def test_hostname_is_first_label():
    assert hostname_of("vm1.example.com") == "vm1"
