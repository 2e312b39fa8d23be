"""The documentation agrees with the code: every key the profile parser reads
is documented, and the examples of "Your own hypervisor" (docs/own-hypervisor.rst)
are what the parser accepts."""

import re
import textwrap
from pathlib import Path

import jinja2
import pytest
import yaml

from salt_kvm.cloud import cloudinit, spec
from salt_kvm.cloud.spec import build_spec
from salt_kvm.disks import spec as disks
from tests.unit.test_examples import EXAMPLES, MAPS, with_checksum, with_operator_files

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GUIDE = DOCS / "own-hypervisor.rst"
STOCK = {name: profile for conf, name, profile in EXAMPLES if conf == "stock-images.conf"}


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


def code_blocks(path: Path, language: str) -> list[str]:
    """The literal text of each ``.. code-block:: LANGUAGE`` of an .rst file."""
    blocks, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() != f".. code-block:: {language}":
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def test_the_guides_literal_includes_are_the_example_files():
    included = re.findall(r"^\.\. literalinclude:: (\S+)", GUIDE.read_text(), re.M)
    paths = {(DOCS / p).resolve().relative_to(ROOT).as_posix() for p in included}
    assert paths == {
        "profiles.example/cloud.providers.d/kvm.conf",
        "profiles.example/cloud.profiles.d/stock-images.conf",
        "profiles.example/cloud.maps.d/cluster.map",
    }


def test_the_guides_yaml_blocks_parse_and_its_state_is_pool_present():
    blocks = [yaml.safe_load(b) for b in code_blocks(GUIDE, "yaml")]
    states = [b for b in blocks if "images-pool" in b]
    assert states == [
        {
            "images-pool": {
                "kvm_host.pool_present": [
                    {"name": "default"},
                    {"path": "/var/lib/libvirt/images"},
                ]
            }
        }
    ]
    # the state's arguments are the function's
    import _states.kvm_host as kvm_host

    assert kvm_host.pool_present.__code__.co_varnames[:2] == ("name", "path")


def test_the_provider_example_holds_only_keys_salt_kvm_reads():
    provider = yaml.safe_load((ROOT / "profiles.example/cloud.providers.d/kvm.conf").read_text())
    for values in provider.values():
        assert values["driver"] == "libvirt"
        assert set(values) - {"driver"} <= set(spec.KNOWN_KEYS)


PUBLISHED = {
    "noble": (
        "https://cloud-images.ubuntu.com/noble/current/",
        "noble-server-cloudimg-amd64.img",
        "sha256",
        "SHA256SUMS",
    ),
    "trixie": (
        "https://cloud.debian.org/images/cloud/trixie/latest/",
        "debian-13-genericcloud-amd64.qcow2",
        "sha512",
        "SHA512SUMS",
    ),
}


@pytest.mark.parametrize("name", ["noble", "trixie", "trixie-br0"])
def test_a_stock_image_profile_installs_salt_through_cloud_init(name, tmp_path):
    """The guide's profiles: the published image with its checksum filled in,
    no SSH, the user's key for root, Salt from salt_source."""
    vm = build_spec({"name": "web1", **with_checksum(with_operator_files(STOCK[name], tmp_path))})
    directory, filename, algorithm, sums = PUBLISHED[name.split("-")[0]]
    assert vm.image.source == directory + filename
    assert vm.image.checksum.algorithm == algorithm
    assert vm.deploy.method == "cloud-init" and vm.deploy.private_key is None
    assert vm.cloud_init.authorized_keys and vm.deploy.ssh_username == "root"
    assert STOCK[name]["salt_source"] == "bootstrap"
    assert isinstance(STOCK[name]["salt_version"], str)
    # the guide shows how to take the digest from that very sums file
    assert f"{directory}{sums}" in GUIDE.read_text()
    assert f'"{filename}"' in GUIDE.read_text()


def test_the_cluster_map_with_the_guides_settings_plans_every_vm_on_br0(tmp_path):
    """docs/own-hypervisor.rst: the map's profile set to trixie-br0 and its
    subnet to br0; every VM of the table is a stock Debian guest with its
    static address, waiting for no lease."""
    text = (MAPS / "cluster.map").read_text()
    assert '{%- set profile = "cluster-vm" %}' in text and '"bridge": "br1"' in text
    text = text.replace('"cluster-vm"', '"trixie-br0"').replace('"br1"', '"br0"')
    rendered = yaml.safe_load(jinja2.Environment().from_string(text).render())
    assert list(rendered) == ["trixie-br0"]
    profile = with_checksum(with_operator_files(STOCK["trixie-br0"], tmp_path))
    specs = {}
    for entry in rendered["trixie-br0"]:
        ((name, overrides),) = entry.items()
        specs[name] = build_spec({**profile, **overrides, "name": name})
    assert list(specs) == ["provision", "mcp", "web1", "db1"]
    for vm in specs.values():
        (nic,) = vm.nics
        assert nic.bridge == "br0" and nic.static and vm.ip_source == "plan"
        assert vm.image is not None and vm.deploy.method == "cloud-init"
