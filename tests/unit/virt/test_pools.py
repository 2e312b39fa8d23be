"""The pool document, and refreshing a pool on a busy host."""

import re
from pathlib import Path

import libvirt
import pytest

from salt_kvm.errors import ConflictError
from salt_kvm.virt import pools
from salt_kvm.virt.pools import Pool
from tests.xmlcompare import assert_same_xml

# virStoragePool.XMLDesc of a dir pool.
LIBVIRT_POOL = """
<pool type='dir'>
  <name>default</name>
  <uuid>dfe224cb-28fb-8dd0-c4b2-64eb3f0f4566</uuid>
  <capacity unit='bytes'>107374182400</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>107374182400</available>
  <source>
  </source>
  <target>
    <path>/var/lib/libvirt/images</path>
    <permissions>
      <mode>0711</mode>
    </permissions>
  </target>
</pool>
"""


def test_new_dir_pool():
    assert_same_xml(
        Pool.new_dir("p", "/srv/p").to_xml(),
        '<pool type="dir"><name>p</name><target><path>/srv/p</path></target></pool>',
    )


def test_reads_libvirts_pool():
    pool = Pool(LIBVIRT_POOL)
    assert (pool.type, pool.name, pool.target_path) == ("dir", "default", "/var/lib/libvirt/images")
    assert pool.uuid == "dfe224cb-28fb-8dd0-c4b2-64eb3f0f4566"
    assert_same_xml(Pool(pool.to_xml()).to_xml(), LIBVIRT_POOL)


class BusyPool:
    """A pool libvirt refuses to refresh while ``busy`` of its volumes are still
    being built (``createXML``/``createXMLFrom`` by another caller)."""

    def __init__(self, busy, error="internal error: pool 'default' has asynchronous jobs running."):
        self.busy, self.error, self.refreshed = busy, error, 0

    def name(self):
        return "default"

    def refresh(self, flags):
        if self.busy:
            self.busy -= 1
            raise libvirt.libvirtError(self.error)
        self.refreshed += 1
        return 0


def test_refresh_waits_for_another_callers_volume_build(monkeypatch):
    monkeypatch.setattr(pools.time, "sleep", lambda s: None)
    pool = BusyPool(busy=3)
    pools.refresh(pool)
    assert pool.refreshed == 1


def test_refresh_gives_up_after_its_timeout_and_says_why(monkeypatch):
    clock = iter(range(0, 10_000, 5))
    monkeypatch.setattr(pools.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(pools.time, "sleep", lambda s: None)
    with pytest.raises(ConflictError, match="pool 'default' .* still building a volume after 60 s"):
        pools.refresh(BusyPool(busy=1_000), timeout=60)


def test_refresh_passes_other_errors_on_at_once():
    pool = BusyPool(busy=1, error="storage pool 'default' is not active")
    with pytest.raises(libvirt.libvirtError, match="not active"):
        pools.refresh(pool)
    assert pool.busy == 0 and pool.refreshed == 0


def test_the_library_and_the_integration_tests_refresh_only_through_it():
    # A raw refresh fails beside a parallel clone (a map, the other test stream).
    root = Path(__file__).resolve().parents[3]
    raw = [
        str(path.relative_to(root))
        for folder in ("salt_kvm", "tests/integration")
        for path in (root / folder).rglob("*.py")
        if path.name != "pools.py" and re.search(r"\.refresh\(0\)", path.read_text())
    ]
    assert raw == []
