"""Every example profile in profiles.example/ is a valid profile."""

from pathlib import Path

import pytest
import yaml

from salt_kvm.cloud.spec import build_spec

PROFILES = Path(__file__).resolve().parents[2] / "profiles.example" / "cloud.profiles.d"
EXAMPLES = [
    (conf.name, name, profile)
    for conf in sorted(PROFILES.glob("*.conf"))
    for name, profile in yaml.safe_load(conf.read_text()).items()
]


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOnlyATestKeyMadeForTheExamplesTestXXXXXXXX test@example"


def with_operator_files(profile, tmp_path):
    """The profile with the operator's files it names (a .pub key of the
    salt-cloud machine) made in ``tmp_path``: spec building reads them."""
    cloud_init = profile.get("cloud_init") or {}
    keys = cloud_init.get("authorized_keys") or []
    made = []
    for key in keys:
        if key.startswith("/"):
            path = tmp_path / Path(key).name
            path.write_text(KEY + "\n")
            key = str(path)
        made.append(key)
    if not made:
        return profile
    return {**profile, "cloud_init": {**cloud_init, "authorized_keys": made}}


def test_example_profile_names_are_unique():
    names = [name for _, name, _ in EXAMPLES]
    assert sorted(names) == sorted(set(names))


@pytest.mark.parametrize("conf,name,profile", EXAMPLES, ids=[f"{c}:{n}" for c, n, _ in EXAMPLES])
def test_example_profile_is_valid(conf, name, profile, tmp_path):
    profile = with_operator_files(profile, tmp_path)
    assert build_spec({"name": "vm1", **profile}).name == "vm1"
