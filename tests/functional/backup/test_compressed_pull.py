"""Compressed points (``compress``) from a real NBD export (``qemu-nbd``, as
in test_nbd_pull): the image has compressed clusters, reads as the source
(an incremental through its uncompressed or compressed parent), is smaller on
compressible data, carries the digest of its final file, and no scratch image
stays, whether the compression succeeds or fails."""
# ruff: noqa: F401, F811 - the source fixture of test_nbd_pull, shared

import hashlib

import pytest

from salt_kvm.backup import nbd, pull
from salt_kvm.errors import SaltKvmError
from salt_kvm.virt import qemuimg
from tests.functional.backup.test_nbd_pull import MIB, Served, layer, same, source


def compressed_clusters(path):
    """How many of the image's own clusters (not its backing file's) are stored
    compressed: ``qemu-img check`` counts them on every supported QEMU (the
    ``compressed`` field of ``qemu-img map`` is QEMU 8.2's, not Debian 12's 7.2)."""
    return qemuimg.check(str(path), fmt="qcow2", backing=False).get("compressed-clusters", 0)


def copy(tmp_path, served, name, backing=None, bitmap=None, compress=True, phases=None):
    dirty = nbd.dirty_bitmap(bitmap) if bitmap else None
    contexts = (nbd.BASE_ALLOCATION,) + ((dirty,) if dirty else ())
    with nbd.Client(served.sock, "vda", contexts) as client:
        dest = tmp_path / name
        digest, read = pull.copy_disk(
            client, dest, backing, dirty, compress=compress, phases=phases
        )
    return dest, digest, read


def test_compression_type_is_zstd_on_this_qemu_img():
    assert qemuimg.compression_type() == "zstd"  # QEMU 5.1 or later, built with zstd


def test_a_compressed_full_and_incremental_read_as_the_source(tmp_path, source):
    src, _parent = source
    served = Served(tmp_path, src, "b0")
    try:
        plain, _digest, _read = copy(tmp_path, served, "plain.qcow2", compress=False)
        phases: dict[str, float] = {}
        full, digest, read = copy(tmp_path, served, "full.qcow2", phases=phases)
        percents = []
        inc, inc_digest, inc_read = copy(
            tmp_path, served, "inc.qcow2", "full.qcow2", "b0", compress=percents.append
        )
    finally:
        served.close()
    assert digest == hashlib.sha256(full.read_bytes()).hexdigest()
    assert list(phases) == ["map", "stream", "compress", "sync"]  # the steps it reports
    assert inc_digest == hashlib.sha256(inc.read_bytes()).hexdigest()
    assert same(full, src) and same(inc, src)
    info = qemuimg.info(str(full), fmt="qcow2")
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert compressed_clusters(full) and compressed_clusters(inc)
    assert full.stat().st_size * 4 < plain.stat().st_size  # patterns compress well
    assert read < 12 * MIB and inc_read == 64 * 1024 + 128 * 1024  # read once, as before
    info = qemuimg.info(str(inc), fmt="qcow2")
    assert (info["backing-filename"], info["backing-filename-format"]) == ("full.qcow2", "qcow2")
    qemuimg.check(str(inc), fmt="qcow2", backing=False)
    # only the change, the zeroed range a zero cluster over the parent's data;
    # and, qemu-img's way with -c on a disk that ends inside a cluster, that
    # last part cluster (the parent's bytes, copied)
    assert [(s, n, z) for s, n, _d, z in layer(inc)] == [
        (2 * MIB, 64 * 1024, False),
        (10 * MIB, 64 * 1024, True),
        (20 * MIB, 128 * 1024, False),
        (64 * MIB, 1536, False),
    ]
    assert percents and percents[-1] == 100.0
    for image in (full, inc):
        assert image.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.glob("*.qcow2")) == [
        "full.qcow2",
        "inc.qcow2",
        "parent.qcow2",
        "plain.qcow2",
        "src.qcow2",
    ]  # no scratch image stays


def test_an_uncompressed_incremental_follows_a_compressed_full(tmp_path, source):
    src, _parent = source
    served = Served(tmp_path, src, "b0")
    try:
        copy(tmp_path, served, "full.qcow2")
        inc, digest, _read = copy(tmp_path, served, "inc.qcow2", "full.qcow2", "b0", False)
    finally:
        served.close()
    assert not compressed_clusters(inc) and same(inc, src)
    assert digest == hashlib.sha256(inc.read_bytes()).hexdigest()


def test_a_failed_compression_leaves_neither_image(tmp_path, source, monkeypatch):
    src, _parent = source

    def fail(scratch, dest, backing, **kwargs):
        assert (tmp_path / "full.uncompressed.qcow2").is_file()  # written first, beside it
        (tmp_path / "full.qcow2").write_bytes(b"half")
        raise SaltKvmError("qemu-img convert failed: No space left on device")

    monkeypatch.setattr(qemuimg, "compress", fail)
    served = Served(tmp_path, src)
    try:
        with pytest.raises(SaltKvmError, match="No space left"):
            copy(tmp_path, served, "full.qcow2")
    finally:
        served.close()
    assert not (tmp_path / "full.uncompressed.qcow2").exists()
