import pytest

from salt_kvm.errors import SpecError
from salt_kvm.virt.units import GIB, MIB, human_size, parse_size


@pytest.mark.parametrize(
    "value,unit,expected",
    [
        (2048, MIB, 2 * GIB),
        ("2GB", MIB, 2 * GIB),
        ("2G", MIB, 2 * GIB),
        ("1.5GiB", MIB, 1536 * MIB),
        ("512", MIB, 512 * MIB),
        ("512m", MIB, 512 * MIB),
        (10, GIB, 10 * GIB),
    ],
)
def test_parse_size(value, unit, expected):
    assert parse_size(value, "memory", unit) == expected


@pytest.mark.parametrize("value", ["lots", "2XB", "", -1, 0, True, None, [1], "1..2G"])
def test_parse_size_rejects_with_key_and_accepted_forms(value):
    with pytest.raises(SpecError) as err:
        parse_size(value, "memory", MIB)
    assert err.value.key == "memory"
    assert "memory:" in str(err.value)
    assert "2G" in err.value.accepted


def test_human_size():
    assert human_size(2 * GIB) == "2G"
    assert human_size(1536 * MIB) == "1536M"
    assert human_size(1000) == "1000B"
