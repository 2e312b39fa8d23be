"""Guests on a cached image, on libvirt's test driver (it has no upload streams:
the image volume is put in the pool first, as a previous download would have)."""

import hashlib

import pytest

from salt_kvm.cloud import provision
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import ConflictError, NotFoundError, SpecError
from salt_kvm.images import cache as images
from salt_kvm.virt import lifecycle
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback

GIB = 1024**3


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "disk.qcow2"
    path.write_bytes(b"QFI\xfb" + b"\0" * 1024)
    return path


@pytest.fixture
def cached(pool, image_file):
    digest = hashlib.sha256(image_file.read_bytes()).hexdigest()
    name = f"image-sha256-{digest[:32]}.qcow2"
    pool.createXML(
        f"<volume><name>{name}</name><capacity>{GIB}</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    )
    return name, f"sha256:{digest}"


def spec(image_file, checksum, **values):
    return build_spec(
        {
            "name": "vm1",
            "image": str(image_file),
            "image_allowed_dirs": [str(image_file.parent)],
            "image_checksum": checksum,
            "image_pool": "default-pool",
            "virt_type": "qemu",
            "deploy": False,
            **values,
        }
    )


@pytest.mark.parametrize("strategy", ["quick", "full"])
def test_a_guest_on_a_cached_image_is_a_new_domain(conn, pool, image_file, cached, strategy):
    name, checksum = cached
    events = []
    size = 2 if strategy == "quick" else 1  # the test driver cannot resize a full copy
    guest = provision.create(
        conn,
        spec(image_file, checksum, cpus=2, memory="768M", disk_size=size, clone_strategy=strategy),
        Rollback(),
        lambda step, data: events.append(step),
    )
    assert "downloading" not in events  # found in the cache
    xml = Domain(guest.domain.XMLDesc(0))
    assert xml.vcpus == 2 and xml.memory_mib() == 768 and xml.type == "qemu"
    info = xml.managed_info()
    assert info["image"] == name and info["image_source"] == str(image_file)
    (disk,) = [d for d in xml.disks if d.device == "disk"]
    root = conn.storageVolLookupByPath(disk.path)
    assert root.name() == "vm1.qcow2" and root.info()[1] == size * GIB
    listed = images.list_images(conn, "default-pool")[name]
    assert listed["complete"] and listed["format"] == "qcow2"
    if strategy == "quick":
        assert listed["used_by"] == ["vm1"]
        with pytest.raises(ConflictError, match="used by vm1"):
            images.delete_image(conn, name)
    lifecycle.remove(conn, "vm1")
    assert images.delete_image(conn, name) == {"deleted": name, "pool": "default-pool"}
    assert images.list_images(conn) == {}


def test_image_delete_refuses_other_volumes(conn, pool, base):
    with pytest.raises(SpecError, match="not an image cache volume"):
        images.delete_image(conn, "base.qcow2")
    with pytest.raises(NotFoundError):
        images.delete_image(conn, "image-sha256-" + "0" * 32 + ".qcow2")


def test_a_smaller_disk_than_the_image_creates_nothing(conn, pool, image_file, cached):
    _, checksum = cached
    pool.refresh(0)
    before = sorted(pool.listVolumes())
    with pytest.raises(SpecError, match="disk_size"):
        provision.create(conn, spec(image_file, checksum, disk_size="512M"), Rollback(), print)
    assert sorted(pool.listVolumes()) == before
    assert [d.name() for d in conn.listAllDomains(0)] == ["test"]
