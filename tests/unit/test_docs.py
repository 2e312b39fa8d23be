"""The documentation agrees with the code: every key the profile parser reads
is documented."""

import re
from pathlib import Path

import pytest

from salt_kvm.cloud import cloudinit, spec
from salt_kvm.disks import spec as disks

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def documented_keys() -> set[str]:
    text = "\n".join(p.read_text() for p in DOCS.glob("*.rst"))
    return set(re.findall(r"``([a-z_0-9]+)``", text))


KEYS = sorted(
    {*spec.KNOWN_KEYS, *spec.NIC_KEYS, *cloudinit.KEYS, *disks.DISK_KEYS}
    - {"url"}  # the provider's, shown in every provider example
)


@pytest.mark.parametrize("key", KEYS)
def test_every_key_the_parser_reads_is_documented(key):
    assert key in documented_keys()
