"""External disk checks, listing and rollback on libvirt's test driver (which
cannot attach devices: that half is the integration tier's)."""

import libvirt
import pytest

from salt_kvm.cloud import provision
from salt_kvm.cloud.spec import build_spec
from salt_kvm.disks import ops as diskops
from salt_kvm.disks import spec as disks
from salt_kvm.errors import ConflictError, SaltKvmError, SpecError
from salt_kvm.virt.domain import DISKS_NS, DISKS_PREFIX, Domain, disks_metadata_element, new_domain
from salt_kvm.virt.rollback import Rollback
from salt_kvm.virt.units import GIB
from salt_kvm.virt.xmlmodel import tostring
from tests.functional.cloud.test_provision import spec as vm_spec
from tests.functional.cloud.test_provision import state


def volume(pool, name, size=GIB, fmt="qcow2"):
    return pool.createXML(
        f"<volume><name>{name}</name><capacity>{size}</capacity>"
        f"<target><format type='{fmt}'/></target></volume>",
        0,
    )


def add_disk(conn, dom, path, target, readonly=False, shareable=False, name=None):
    """Give a shut-off test domain another disk by redefining it."""
    xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    spec = disks.DiskSpec(name=name or target, path=path, readonly=readonly, shareable=shareable)
    disk = disks.disk_element(spec, target, disks.Source(path, "qcow2"))
    if name is None:
        disk.alias = disk.serial = None
    xml._devices().append(disk.node)
    return conn.defineXML(xml.to_xml())


@pytest.fixture
def other(conn, pool, base):
    """A second domain using a writable, a read-only and a shareable volume."""
    root = volume(pool, "other.qcow2")
    dom = conn.defineXML(new_domain("other", "test", 512, 1, root.path()).to_xml())
    add_disk(conn, dom, volume(pool, "ro.qcow2").path(), "vdb", readonly=True)
    add_disk(conn, dom, volume(pool, "shared.qcow2").path(), "vdc", shareable=True)
    return dom


def definition(dom):
    return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def plan(conn, dom, name="new", allowed=(), **values):
    return diskops.plan(conn, dom, disks.parse_disk(name, values), allowed)


def test_list_shows_every_disk_with_its_volume_size(conn, pool, base, other):
    listed = diskops.describe(conn, other)
    assert list(listed) == ["vda", "vdb", "vdc"]
    assert listed["vdb"]["readonly"] and listed["vdc"]["shareable"]
    assert listed["vda"]["size"] == GIB and listed["vda"]["index"] == 0
    assert not any(d["created"] for d in listed.values())
    assert all(d["persistent"] and not d["live"] for d in listed.values())


def test_a_new_volume_and_paths_shared_the_safe_way_are_planned(conn, pool, base, other):
    new = plan(conn, base, size="2G", pool="default-pool")
    assert new.target == "vdb" and new.source is None
    assert new.flags == libvirt.VIR_DOMAIN_AFFECT_CONFIG
    ro = plan(conn, base, path="/default-pool/ro.qcow2", readonly=True, index=3, format="qcow2")
    assert ro.target == "vdd" and ro.source.format == "qcow2"
    shared = plan(
        conn, base, path="/default-pool/shared.qcow2", shareable=True, bus="scsi", format="qcow2"
    )
    assert shared.target == "sdb"


@pytest.mark.parametrize(
    "values,error,match",
    [
        ({"path": "/default-pool/other.qcow2"}, ConflictError, "used by domain 'other' .vda"),
        ({"path": "/default-pool/ro.qcow2"}, ConflictError, "read-only"),
        ({"path": "/default-pool/shared.qcow2"}, ConflictError, "shareable"),
        ({"path": "/default-pool/other.qcow2", "readonly": True}, ConflictError, "writable"),
        ({"path": "/default-pool/base.qcow2"}, ConflictError, "already attached to base as vda"),
        ({"path": "/etc/hostname", "format": "raw"}, SpecError, "^path: .*outside.*default-pool"),
        ({"path": "/default-pool/nope.raw"}, SaltKvmError, "does not exist"),
        ({"size": "1G", "pool": "nope"}, SpecError, r"^pool: .*\(accepted: default-pool\)"),
        ({"size": "1G", "index": 0}, SpecError, "^index: "),
    ],
)
def test_refusals_change_nothing(conn, pool, base, other, values, error, match):
    before = definition(base), state(conn, pool)
    with pytest.raises(error, match=match):
        plan(conn, base, **values)
    assert (definition(base), state(conn, pool)) == before


def test_duplicate_name_index_target_and_volume_are_refused(conn, pool, base):
    add_disk(conn, base, volume(pool, "d.qcow2").path(), "sdb", name="data")
    before = definition(base)
    with pytest.raises(ConflictError, match="^name: base already has a disk named 'data'"):
        plan(conn, base, "data", size="1G")
    with pytest.raises(ConflictError, match=r"^index: 1 \(sdb\) is already used by disk 'data'"):
        plan(conn, base, size="1G", index=1, bus="sata")
    with pytest.raises(SpecError, match="^name: 'vda' is not a disk name"):
        plan(conn, base, "vda", size="1G")
    volume(pool, "base-logs.qcow2")
    with pytest.raises(ConflictError, match="'base-logs.qcow2' already exists"):
        plan(conn, base, "logs", size="1G", pool="default-pool")
    with pytest.raises(SpecError, match="^persistent: base is not running"):
        diskops.plan(conn, base, disks.parse_disk("x", {"size": 1}), persistent=False)
    assert definition(base) == before


def test_allowed_dirs_open_a_directory_outside_the_pools(conn, base, tmp_path):
    image = tmp_path / "a.raw"
    image.write_bytes(b"\0" * 4096)
    with pytest.raises(SpecError, match="kvm:disk:allowed_dirs"):
        plan(conn, base, path=str(image), format="raw")
    found = plan(conn, base, allowed=(str(tmp_path),), path=str(image), format="raw")
    assert found.source.path == str(image) and not found.source.block
    # Without a format a file is raw (its header claims nothing else).
    assert plan(conn, base, allowed=(str(tmp_path),), path=str(image)).source.format == "raw"


class RemoteURI:
    """The test hypervisor, as if reached over ``qemu+ssh://`` (only its URI differs)."""

    def __init__(self, conn):
        self._conn = conn

    def getURI(self):  # noqa: N802 - libvirt's name
        return "qemu+ssh://hv1.example/system"

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_on_a_remote_hypervisor_only_pool_volumes_are_taken(conn, pool, base, tmp_path):
    """This host's files say nothing of the hypervisor's: a path outside its
    pools is refused by name, a pool volume still works."""
    image = tmp_path / "a.raw"
    image.write_bytes(b"\0" * 4096)
    remote = RemoteURI(conn)
    before = definition(base)
    with pytest.raises(SpecError, match=r"^path: .*not a volume of a storage pool on hv1\.example"):
        plan(remote, base, allowed=(str(tmp_path),), path=str(image), format="raw")
    assert definition(base) == before
    vol = volume(pool, "data.qcow2")
    assert plan(remote, base, path=vol.path(), format="qcow2").source.path == vol.path()


def test_a_failed_attach_removes_the_volume_it_made(conn, pool, base):
    """The test driver cannot attach devices: the half-done attach rolls back."""
    before = definition(base), state(conn, pool)
    with pytest.raises(SaltKvmError, match="libvirt refused disk 'data'"):
        diskops.attach(conn, base, disks.parse_disk("data", {"size": "1G", "pool": "default-pool"}))
    assert (definition(base), state(conn, pool)) == before


def test_resize_refuses_to_shrink(conn, pool, base):
    before = definition(base), state(conn, pool)
    with pytest.raises(SpecError, match="^size: 512M is smaller than the current 1G"):
        diskops.resize(conn, base, "vda", GIB // 2)
    assert diskops.resize(conn, base, "vda", GIB) == {}
    assert (definition(base), state(conn, pool)) == before


def test_created_volumes_are_listed_and_deleted_with_the_domain_only_when_asked(conn, pool, base):
    data = volume(pool, "base-data.qcow2").path()
    keep = volume(pool, "base-keep.qcow2").path()
    add_disk(conn, base, data, "vdb", name="data")
    add_disk(conn, base, keep, "vdc", name="keep")
    records = {
        data: {"name": "data", "delete_with_domain": True},
        keep: {"name": "keep", "delete_with_domain": False},
    }
    element = tostring(disks_metadata_element(records, namespaced=False))
    config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    base.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, DISKS_PREFIX, DISKS_NS, config)
    listed = diskops.describe(conn, base)
    assert listed["data"]["created"] and listed["data"]["delete_with_domain"]
    assert listed["keep"]["created"] and not listed["keep"]["delete_with_domain"]
    assert diskops.split_for_destroy(base, delete=False) == ([data], [keep])
    assert diskops.split_for_destroy(base, delete=True) == (sorted([data, keep]), [])
    assert diskops.delete_volumes(conn, [data]) == []  # still attached: kept
    base.undefine()
    assert diskops.delete_volumes(conn, [data]) == [data]


def test_profile_disks_are_checked_before_anything_is_cloned(conn, pool, base, other):
    before = state(conn, pool)
    with pytest.raises(ConflictError, match="used by domain 'other'"):
        provision.create(
            conn,
            vm_spec(disks={"data": {"path": "/default-pool/other.qcow2"}}),
            Rollback(),
            lambda *a: None,
        )
    assert state(conn, pool) == before
    with pytest.raises(SpecError, match="^disks.data.size: "):
        build_spec(
            {
                "name": "vm1",
                "base_domain": "base",
                "password": "pw",
                "disks": {"data": {"size": "x"}},
            }
        )


def test_a_profile_disk_libvirt_refuses_rolls_the_clone_back(conn, pool, base):
    before = state(conn, pool)
    rollback = Rollback()
    with pytest.raises(SaltKvmError, match="libvirt refused disk 'data'"):
        with rollback:
            provision.create(
                conn,
                vm_spec(disks={"data": {"size": "1G", "pool": "default-pool"}}),
                rollback,
                print,
            )
    assert state(conn, pool) == before


# ---- intent and escapes (issue #13 item 12) -----------------------------------------

QCOW2_HEADER = b"QFI\xfb\x00\x00\x00\x03" + b"\x00" * 4088  # what a guest can write


def test_a_symlink_out_of_an_allowed_directory_is_refused(conn, base, tmp_path):
    """The check is on the file QEMU would open, not on the link's name."""
    allowed = tmp_path / "images"
    allowed.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"\0" * 4096)
    (allowed / "disk.raw").symlink_to(secret)
    before = definition(base)
    with pytest.raises(SpecError, match=r"^path: .*disk\.raw \(a link to .*secret\) is outside"):
        plan(conn, base, allowed=(str(allowed),), path=str(allowed / "disk.raw"), format="raw")
    assert definition(base) == before


def test_a_symlink_inside_is_attached_by_its_resolved_path(conn, base, tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "real.raw").write_bytes(b"\0" * 4096)
    (allowed / "link.raw").symlink_to(allowed / "real.raw")
    found = plan(conn, base, allowed=(str(allowed),), path=str(allowed / "link.raw"))
    assert found.source.path == str(allowed / "real.raw")


def test_a_qcow2_header_is_not_taken_on_its_word(conn, base, tmp_path):
    """A raw file a guest wrote may start with a qcow2 header naming a host
    file as backing file: without format it is refused, naming format."""
    image = tmp_path / "guest-written.img"
    image.write_bytes(QCOW2_HEADER)
    before = definition(base)
    with pytest.raises(SpecError) as err:
        plan(conn, base, allowed=(str(tmp_path),), path=str(image))
    assert err.value.key == "format" and "qcow2" in str(err.value)
    assert definition(base) == before
    assert (
        plan(conn, base, allowed=(str(tmp_path),), path=str(image), format="raw").source.format
        == "raw"
    )


def test_a_pool_volume_probed_as_qcow2_needs_its_format_named(conn, pool, base):
    vol = volume(pool, "data.qcow2")
    with pytest.raises(SpecError, match="^format: "):
        plan(conn, base, path=vol.path())
    assert plan(conn, base, path=vol.path(), format="qcow2").source.format == "qcow2"


def test_detaching_the_boot_disk_needs_force(conn, pool, base):
    before = definition(base)
    with pytest.raises(SpecError) as err:
        diskops.detach(conn, base, "vda")
    assert err.value.key == "force" and "boot disk" in str(err.value)
    assert definition(base) == before


def test_the_boot_disk_is_the_one_with_boot_order_one():
    xml = new_domain("vm", "test", 512, 1, "/p/root.qcow2")
    first = xml.disks[0]
    data = disks.disk_element(
        disks.DiskSpec(name="data", path="/p/d"), "vdb", disks.Source("/p/d", "raw")
    )
    xml._devices().append(data.node)
    assert diskops.is_boot_disk(xml, first.name) and not diskops.is_boot_disk(xml, "data")
    from lxml import etree

    etree.SubElement(data.node, "boot", order="1")
    assert diskops.is_boot_disk(xml, "data") and not diskops.is_boot_disk(xml, first.name)


def _disk_state(conn, monkeypatch, test):
    """The kvm_disk state over the real execution module, on ``conn``."""
    import contextlib
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    loaded = {}
    for kind in ("_modules", "_states"):
        spec = importlib.util.spec_from_file_location(
            f"kvm_disk_{kind}", repo / kind / "kvm_disk.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.__opts__, module.__pillar__ = {"test": test}, {}
        loaded[kind] = module
    mod, st = loaded["_modules"], loaded["_states"]
    monkeypatch.setattr(mod, "connection_for", lambda *a: contextlib.nullcontext(conn))
    mod.__salt__ = {"config.get": lambda key, default=None: default}
    st.__salt__ = {
        f"kvm_disk.{name}": getattr(mod, func)
        for name, func in (("list", "list_"), ("detach", "detach"), ("attach", "attach"))
    }
    return st


def test_detached_with_test_true_reports_the_refusal_the_real_run_makes(
    conn, pool, base, monkeypatch
):
    """test=True must predict the real run: the boot disk without force is a
    refusal naming force (result False), not "would be detached"."""
    before = definition(base)
    name = diskops.describe(conn, base)
    boot = next(iter(name))
    real = _disk_state(conn, monkeypatch, test=False).detached(boot, "base")
    dry = _disk_state(conn, monkeypatch, test=True).detached(boot, "base")
    assert real["result"] is False and "force" in real["comment"]
    assert dry["result"] is False and "force" in dry["comment"], dry
    assert dry["changes"] == {}
    assert definition(base) == before
    # with force, test=True says it would be detached, and still changes nothing
    dry = _disk_state(conn, monkeypatch, test=True).detached(boot, "base", force=True)
    assert dry["result"] is None and "would be detached" in dry["comment"]
    assert definition(base) == before


def test_attached_with_test_true_reports_the_refusal_the_real_run_makes(
    conn, pool, base, monkeypatch, tmp_path
):
    """A path outside the pools and allowed directories (or a probed qcow2
    without format) is refused by the real run: test=True says so too."""
    outside = tmp_path / "host.raw"
    outside.write_bytes(b"\0" * 1024 * 1024)
    before = definition(base), state(conn, pool)
    for test in (False, True):
        ret = _disk_state(conn, monkeypatch, test=test).attached(
            "data", "base", path=str(outside), format="raw"
        )
        assert ret["result"] is False and ret["changes"] == {}, (test, ret)
    assert (definition(base), state(conn, pool)) == before
    dry = _disk_state(conn, monkeypatch, test=True).attached(
        "data", "base", size="1G", pool="default-pool"
    )
    assert dry["result"] is None and "would be attached" in dry["comment"], dry
    assert (definition(base), state(conn, pool)) == before
