"""scripts/define-test-base.py replaces the test base domain when the image
changed, and keeps the old base's disk while a quick clone (another checkout's
guest, a run beside this one) still reads it (libvirt's test driver)."""

import importlib.util
from pathlib import Path

import pytest

from salt_kvm.cloud import clone
from salt_kvm.virt.domain import new_domain
from salt_kvm.virt.rollback import Rollback

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "define-test-base.py"


@pytest.fixture
def script(monkeypatch):
    spec = importlib.util.spec_from_file_location("define_test_base", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "BASE", "base")
    monkeypatch.setattr(module, "POOL", "default-pool")
    return module


def volumes(pool):
    pool.refresh(0)
    return pool.listVolumes()


def test_a_replaced_base_keeps_the_disk_a_quick_clone_reads(conn, pool, base, script):
    clone.clone_domain(conn, clone.plan_clone(conn, "base", "vm-a", "quick", "test"), Rollback())
    assert script.existing_base(conn, "another-image") is False
    assert "base" not in conn.listDefinedDomains()
    assert "base.qcow2" in volumes(pool)


def test_a_replaced_base_no_clone_reads_goes_with_its_disk(conn, pool, base, script):
    assert script.existing_base(conn, "another-image") is False
    assert "base" not in conn.listDefinedDomains()
    assert "base.qcow2" not in volumes(pool)


def disk_volume(pool, name):
    return pool.createXML(
        f"<volume><name>{name}</name><capacity>{1024**3}</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    )


def test_an_earlier_base_disk_goes_once_nothing_reads_it(conn, pool, base, script):
    """What the keep case left: swept on a later run, once the domain reading
    it is gone; the current base's disk and volumes not named like a base's
    stay."""
    old = disk_volume(pool, "base-oldkey.qcow2")
    disk_volume(pool, "base-other.qcow2.tmp")
    xml = new_domain("reader", "test", 512, 1, old.path())
    reader = conn.defineXML(xml.to_xml())
    script.sweep_old_disks(conn, None)
    assert "base-oldkey.qcow2" in volumes(pool)  # a domain still reads it
    reader.undefine()
    current = disk_volume(pool, "base-newkey.qcow2")
    script.sweep_old_disks(conn, current.path())
    assert "base-oldkey.qcow2" not in volumes(pool)
    assert {"base-newkey.qcow2", "base-other.qcow2.tmp", "base.qcow2"} <= set(volumes(pool))
