"""Every example profile in profiles.example/ is a valid profile."""

import re
from pathlib import Path

import jinja2
import pytest
import yaml

from salt_kvm.cloud.spec import build_spec, check_written_keys
from salt_kvm.errors import SpecError
from salt_kvm.images.fetch import ALGORITHMS

PROFILES = Path(__file__).resolve().parents[2] / "profiles.example" / "cloud.profiles.d"
PROVIDERS = {
    name: provider
    for conf in sorted((PROFILES.parent / "cloud.providers.d").glob("*.conf"))
    for name, provider in yaml.safe_load(conf.read_text()).items()
}
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


# An example's image_checksum may be a placeholder for the digest the user
# takes from the publisher's SHA256SUMS/SHA512SUMS: "sha512:<...>".
PLACEHOLDER = re.compile(r"(?P<algorithm>[a-z0-9]+):<[^<>]+>")


def with_checksum(profile):
    """The profile with a digest of the right length in place of its
    ``image_checksum`` placeholder (as a user fills it in)."""
    match = PLACEHOLDER.fullmatch(str(profile.get("image_checksum", "")))
    if match is None:
        return profile
    algorithm = match["algorithm"]
    return {**profile, "image_checksum": f"{algorithm}:{'0' * ALGORITHMS[algorithm]}"}


def test_example_profile_names_are_unique():
    names = [name for _, name, _ in EXAMPLES]
    assert sorted(names) == sorted(set(names))


@pytest.mark.parametrize("conf,name,profile", EXAMPLES, ids=[f"{c}:{n}" for c, n, _ in EXAMPLES])
def test_example_profile_is_valid(conf, name, profile, tmp_path):
    profile = with_checksum(with_operator_files(profile, tmp_path))
    # Its provider's settings under the profile's, as salt-cloud merges them;
    # a hypervisor's key (hostdev_allowed, share_allowed_dirs...) only in the provider.
    provider = {
        k: v
        for k, v in PROVIDERS.get(profile.get("provider"), {}).items()
        if k not in ("driver", "url")
    }
    check_written_keys(profile, provider)
    assert build_spec({**provider, "name": "vm1", **profile}).name == "vm1"


PLACEHOLDERS = [
    (c, n, p) for c, n, p in EXAMPLES if PLACEHOLDER.fullmatch(str(p.get("image_checksum")))
]


@pytest.mark.parametrize(
    "conf,name,profile", PLACEHOLDERS, ids=[f"{c}:{n}" for c, n, _ in PLACEHOLDERS]
)
def test_an_example_checksum_placeholder_copied_unchanged_is_refused(conf, name, profile, tmp_path):
    """A profile copied without its digest filled in stops before anything is
    fetched, naming the key; it is never fetched unverified."""
    profile = with_operator_files(profile, tmp_path)
    with pytest.raises(SpecError) as err:
        build_spec({"name": "vm1", **profile})
    assert err.value.key == "image_checksum"


MAPS = PROFILES.parent / "cloud.maps.d"


def test_the_cluster_map_makes_every_vm_of_its_table_with_its_static_plan():
    """cluster.map renders (Jinja, as salt-cloud's jinja|yaml does) into one VM
    per table line, each accepted by the spec parser with its planned address."""
    rendered = jinja2.Environment().from_string((MAPS / "cluster.map").read_text()).render()
    profiles = {name: profile for _, name, profile in EXAMPLES}
    specs = {}
    for profile_name, vms in yaml.safe_load(rendered).items():
        for entry in vms:
            ((name, overrides),) = entry.items()
            # salt-cloud: the map's values over the profile's
            specs[name] = build_spec({**profiles[profile_name], **overrides, "name": name})
    assert list(specs) == ["provision", "mcp", "web1", "db1"]
    web1 = specs["web1"]
    assert (web1.memory_mib, web1.disk_size, web1.cpus) == (2048, 20 * 1024**3, 2)
    (nic,) = web1.nics
    assert (nic.bridge, nic.mac, nic.ip, nic.prefix, nic.gateway, nic.dns) == (
        "br1",
        "52:54:00:10:01:11",
        "192.168.1.11",
        24,
        "192.168.1.1",
        ["192.168.1.1"],
    )
    assert all(s.ip_source == "plan" for s in specs.values())
    assert specs["provision"].nics[0].gateway is None  # it is the gateway
