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


# ---- careless and hostile pool arguments: refused by name, nothing defined ----------


@pytest.mark.parametrize("name", [None, "", 5, "a/b", "../x", "images\n", "-x", "im ages"])
def test_ensure_dir_pool_refuses_a_bad_name(conn, tmp_path, name):
    with pytest.raises(SpecError) as err:
        host.ensure_dir_pool(conn, name, str(tmp_path / "p"))
    assert err.value.key == "name"
    assert "images" not in conn.listStoragePools() + conn.listDefinedStoragePools()


@pytest.mark.parametrize("path", [None, 5, ["/srv"], "", "/srv/../etc", "/srv/./p", "/srv/p\n"])
def test_ensure_dir_pool_refuses_a_bad_path(conn, path):
    with pytest.raises(SpecError) as err:
        host.ensure_dir_pool(conn, "images", path)
    assert err.value.key == "path"
    assert host.pool_state(conn, "images") is None


def test_ensure_dir_pool_takes_a_trailing_slash_as_the_same_path(conn, tmp_path):
    host.ensure_dir_pool(conn, "images", f"{tmp_path}/")
    assert host.pool_state(conn, "images")["path"] == str(tmp_path)
    assert host.ensure_dir_pool(conn, "images", str(tmp_path)) == {}
    assert host.ensure_dir_pool(conn, "images", f"{tmp_path}/") == {}


def test_ensure_dir_pool_refuses_a_symlink_naming_where_it_leads(conn, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    for path in (tmp_path / "link", tmp_path / "link" / "pool"):
        with pytest.raises(SpecError) as err:
            host.ensure_dir_pool(conn, "images", str(path))
        assert err.value.key == "path" and str(real) in str(err.value)
    assert host.pool_state(conn, "images") is None


def test_ensure_dir_pool_refuses_a_directory_with_files_unless_adopted(conn, tmp_path):
    (tmp_path / "notes.txt").write_text("not a volume")
    with pytest.raises(SpecError) as err:
        host.ensure_dir_pool(conn, "images", str(tmp_path))
    assert err.value.key == "path" and "adopt=True" in str(err.value)
    assert host.pool_state(conn, "images") is None
    changes = host.ensure_dir_pool(conn, "images", str(tmp_path), adopt=True)
    assert changes["new"]["path"] == str(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "not a volume"
    assert host.ensure_dir_pool(conn, "images", str(tmp_path)) == {}  # ours now: no adopt
