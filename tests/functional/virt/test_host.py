import pytest

from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt import host


def test_info_names_the_hypervisor(conn):
    facts = host.info(conn)
    assert facts["uri"].startswith("test://")
    assert "default-pool" in facts["pools"]
    assert facts["kvm_available"] is False
    # Not QEMU: /dev/kvm is not this hypervisor's business; said, not guessed.
    assert facts["kvm_access"]["state"] == "unknown" and "warnings" not in facts


def test_ensure_dir_pool_is_idempotent(conn, tmp_path):
    changes = host.ensure_dir_pool(conn, "images", str(tmp_path))
    assert changes["old"] is None and changes["new"]["active"] is True
    assert host.ensure_dir_pool(conn, "images", str(tmp_path)) == {}


def test_ensure_dir_pool_refuses_to_move_a_pool(conn, tmp_path):
    with pytest.raises(SaltKvmError, match="already exists"):
        host.ensure_dir_pool(conn, "default-pool", str(tmp_path))
    with pytest.raises(SpecError):
        host.ensure_dir_pool(conn, "x", "relative/path")
