"""A profile's ``disks:`` through real salt-cloud: attached before the first
boot, seen in the guest, kept by ``salt-cloud -d`` unless asked; bad disks
stop the create before anything exists."""

import json
import os

import pytest

from salt_kvm.disks import ops as diskops
from salt_kvm.disks import spec as disks
from salt_kvm.virt import pools
from salt_kvm.virt.domain import Domain

from .cloudcheck import assert_gone, cloud_error, created, sized_profile
from .conftest import IMAGES, POOL, prefixed_domains, unique
from .guests import quick_clone


@pytest.fixture
def raw_image(hv):
    path = f"{IMAGES}/{unique('img')}.raw"
    with open(path, "wb") as handle:
        handle.truncate(32 * 1024 * 1024)
    pools.refresh(hv.storagePoolLookupByName(POOL))
    yield path
    os.unlink(path)
    pools.refresh(hv.storagePoolLookupByName(POOL))


def drop_volume(hv, path):
    if os.path.exists(path):
        hv.storageVolLookupByPath(path).delete(0)


def test_profile_disks_are_in_the_guest_and_kept_by_destroy(
    hv, salt, base_domain, pool_volumes, raw_image
):
    name = unique("pdisk")
    before = pool_volumes()
    data = f"{IMAGES}/{name}-data.qcow2"
    profile_disks = {
        "image": {"path": raw_image, "readonly": True, "index": 2},
        "data": {"size": "1G", "index": 1},
    }
    salt.write_profiles({"pdisk": sized_profile(base_domain, salt, disks=profile_disks)}, "pd.conf")
    info = created(salt.cloud("-p", "pdisk", name), name)
    try:
        targets = {d["target"]: d["path"] for d in info["disks"]}
        assert targets["vdb"] == data and targets["vdc"] == raw_image
        out = salt.salt(
            name,
            "cmd.run",
            "lsblk -bdno SIZE,RO $(readlink -f /dev/disk/by-id/virtio-data) "
            "$(readlink -f /dev/disk/by-id/virtio-image)",
        )[name]
        assert out.split() == [str(1024**3), "0", str(32 * 1024**2), "1"], out
        destroyed = json.loads(salt.cloud("-d", name).stdout)
        assert data in json.dumps(destroyed)  # listed as kept
        assert os.path.exists(data) and os.path.exists(raw_image)
    finally:
        if name in {d.name() for d in hv.listAllDomains(0)}:
            salt.cloud("-d", name)
        drop_volume(hv, data)
    assert_gone(hv, salt, name, before, pool_volumes)


def test_destroy_deletes_disks_when_the_call_asks(hv, salt, base_domain, pool_volumes):
    """A shut-off clone with a disk salt-kvm made: -a destroy delete_disks=true."""
    name = unique("deld")
    before = pool_volumes()
    dom = quick_clone(hv, base_domain, name)
    info = diskops.attach(hv, dom, disks.parse_disk("data", {"size": "1G"}))
    assert os.path.exists(info["source"])
    salt.cloud("-a", "destroy", name, "delete_disks=true")
    assert not os.path.exists(info["source"])
    assert_gone(hv, salt, name, before, pool_volumes)


def test_a_profile_disk_in_use_elsewhere_stops_the_create(hv, salt, base_domain, pool_volumes):
    name = unique("baddisk")
    before = pool_volumes()
    domains = prefixed_domains(hv)
    base_disk = Domain(hv.lookupByName(base_domain).XMLDesc(0)).disks[0].path
    for extra, words in [
        ({"disks": {"root": {"path": base_disk}}}, ["path", "used by domain"]),
        ({"disks": {"data": {"size": "1G", "format": "qcow3"}}}, ["disks.data.format", "qcow2"]),
    ]:
        salt.write_profiles({"bd": sized_profile(base_domain, salt, **extra)}, "bd.conf")
        text = cloud_error(salt.cloud("-p", "bd", name, check=False), name)
        for word in words:
            assert word in text, text
        # This process's domains (the other stream's come and go beside), and the base.
        assert prefixed_domains(hv) == domains
        assert base_domain in {d.name() for d in hv.listAllDomains(0)}
        assert_gone(hv, salt, name, before, pool_volumes)
