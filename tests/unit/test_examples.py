"""Every example profile in profiles.example/ is a valid profile."""

from pathlib import Path

import pytest
import yaml

from salt_kvm.spec import build_spec

PROFILES = Path(__file__).resolve().parents[2] / "profiles.example" / "cloud.profiles.d"
EXAMPLES = [
    (conf.name, name, profile)
    for conf in sorted(PROFILES.glob("*.conf"))
    for name, profile in yaml.safe_load(conf.read_text()).items()
]


@pytest.mark.parametrize("conf,name,profile", EXAMPLES, ids=[f"{c}:{n}" for c, n, _ in EXAMPLES])
def test_example_profile_is_valid(conf, name, profile):
    assert build_spec({"name": "vm1", **profile}).name == "vm1"
