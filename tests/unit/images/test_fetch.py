"""Image bytes: checksum strings, format magic, decompression, digests, cache names."""

import gzip
import hashlib
import lzma
import struct

import pytest

from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.images import cache as images
from salt_kvm.images import fetch
from salt_kvm.images.fetch import Checksum

SHA = hashlib.sha256(b"x").hexdigest()


def qcow2_header(backing_offset=0, version=3, incompatible=0):
    head = b"QFI\xfb" + struct.pack(">IQ", version, backing_offset)
    head += b"\0" * (72 - len(head)) + struct.pack(">Q", incompatible)
    return head + b"\0" * 512


# ---- checksums --------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        (f"sha256:{SHA}", Checksum("sha256", SHA)),
        (f"SHA256:{SHA.upper()}", Checksum("sha256", SHA)),
        (" md5 : " + "a" * 32, Checksum("md5", "a" * 32)),
        ("sha512:" + "0" * 128, Checksum("sha512", "0" * 128)),
    ],
)
def test_checksums_name_their_algorithm(value, expected):
    assert fetch.parse_checksum(value) == expected
    assert str(expected) == f"{expected.algorithm}:{expected.digest}"


@pytest.mark.parametrize(
    "value,problem",
    [
        (SHA, "does not start with its algorithm"),
        (f"sha1:{SHA[:40]}", "does not start with its algorithm"),
        ("sha256:abc", "is not a sha256 digest (64 hex digits)"),
        ("md5:" + "g" * 32, "is not a md5 digest"),
        (12, "is not a checksum"),
    ],
)
def test_bad_checksums_name_the_key_and_the_forms(value, problem):
    with pytest.raises(SpecError) as err:
        fetch.parse_checksum(value)
    assert err.value.key == "image_checksum" and problem in str(err.value)
    assert "sha256:<64 hex digits>" in err.value.accepted


# ---- formats ----------------------------------------------------------------


@pytest.mark.parametrize(
    "head,fmt",
    [
        (qcow2_header(), "qcow2"),
        (b"KDMV" + b"\0" * 100, "vmdk"),
        (b"\0" * 0x40 + b"\x7f\x10\xda\xbe", "vdi"),
        (b"conectix" + b"\0" * 8, "vpc"),
        (b"vhdxfile", "vhdx"),
        (b"QED\0", "qed"),
        (b"\xeb\x63\x90" + b"\0" * 509, "raw"),  # an MBR boot sector
        (b"", "raw"),
    ],
)
def test_formats_are_detected_by_magic(head, fmt):
    assert fetch.detect_format(head) == fmt


def test_qcow2_and_raw_are_stored_and_must_match_image_format():
    assert fetch.check_image(qcow2_header()) == "qcow2"
    assert fetch.check_image(qcow2_header(), "qcow2") == "qcow2"
    assert fetch.check_image(b"\0" * 512, "raw") == "raw"
    with pytest.raises(SpecError, match="image_format: the image is qcow2, not raw"):
        fetch.check_image(qcow2_header(), "raw")
    with pytest.raises(SpecError, match="the image is raw, not qcow2"):
        fetch.check_image(b"\0" * 512, "qcow2")


def test_other_formats_are_refused_with_a_conversion_hint():
    with pytest.raises(SpecError, match="the image is vmdk.*qemu-img convert -O qcow2"):
        fetch.check_image(b"KDMV" + b"\0" * 100)


def test_qcow2_with_backing_file_or_external_data_is_refused():
    with pytest.raises(SaltKvmError, match="names a backing file"):
        fetch.check_image(qcow2_header(backing_offset=512))
    with pytest.raises(SaltKvmError, match="external file"):
        fetch.check_image(qcow2_header(incompatible=fetch.QCOW2_EXTERNAL_DATA_FILE))


# ---- decompression ----------------------------------------------------------


def pieces(data: bytes, size: int = 1000):
    return iter([data[i : i + size] for i in range(0, len(data), size)])


PAYLOAD = qcow2_header() + bytes(range(256)) * 4000 + b"\0" * 10_000_000


@pytest.mark.parametrize(
    "compress,kind",
    [
        (lambda d: d, None),
        (gzip.compress, "gzip"),
        (lambda d: gzip.compress(d[:5000]) + gzip.compress(d[5000:]), "gzip"),  # two members
        (lzma.compress, "xz"),
        (lambda d: lzma.compress(d[:5000]) + lzma.compress(d[5000:]), "xz"),  # two streams
    ],
    ids=["plain", "gzip", "gzip-members", "xz", "xz-streams"],
)
def test_decompression_streams_in_bounded_pieces(compress, kind):
    found, out = fetch.decompressed(pieces(compress(PAYLOAD), 4096))
    chunks = list(out)
    assert found == kind
    assert b"".join(chunks) == PAYLOAD
    assert max(len(c) for c in chunks) <= max(fetch.MAX_OUTPUT, 4096)


def test_a_truncated_compressed_download_is_an_error():
    data = gzip.compress(PAYLOAD)
    _, out = fetch.decompressed(pieces(data[: len(data) // 2]))
    with pytest.raises(SaltKvmError, match="truncated"):
        b"".join(out)


def test_head_of_keeps_every_byte():
    head, rest = fetch.head_of(pieces(PAYLOAD, 3000), 10_000)
    assert head == PAYLOAD[: len(head)] and len(head) >= 10_000
    assert b"".join(rest) == PAYLOAD


# ---- digests ----------------------------------------------------------------


def digests_of(data: bytes, checksum: Checksum | None):
    digests = fetch.Digests(checksum)
    kind, out = fetch.decompressed(digests.wrap(pieces(data), "served"))
    b"".join(digests.wrap(out, "image"))
    return digests, kind is not None


def test_checksum_matches_the_served_or_the_decompressed_bytes():
    packed = gzip.compress(PAYLOAD)
    for target in (packed, PAYLOAD):
        checksum = Checksum("sha256", hashlib.sha256(target).hexdigest())
        digests, compressed = digests_of(packed, checksum)
        digests.verify(compressed)
    digests, compressed = digests_of(PAYLOAD, None)
    digests.verify(compressed)  # nothing to verify


def test_checksum_mismatch_names_both_digests():
    digests, compressed = digests_of(PAYLOAD, Checksum("md5", "0" * 32))
    with pytest.raises(fetch.ChecksumMismatch) as err:
        digests.verify(compressed)
    assert hashlib.md5(PAYLOAD).hexdigest() in str(err.value)
    assert str(err.value).startswith("image_checksum: ")


# ---- cache names and profile keys -------------------------------------------


def test_cache_key_comes_from_the_checksum_or_the_source_and_validator():
    by_sum = images.ImageSpec("http://127.0.0.1/a.qcow2", Checksum("sha256", SHA))
    other_url = images.ImageSpec("http://127.0.0.1/b.qcow2", Checksum("sha256", SHA))
    assert images.cache_key(by_sum, "etag1") == images.cache_key(other_url, None)
    assert images.cache_key(by_sum, None) == f"sha256-{SHA[:32]}"
    plain = images.ImageSpec("http://127.0.0.1/a.qcow2")
    assert images.cache_key(plain, '"v1"') != images.cache_key(plain, '"v2"')
    assert images.cache_key(plain, None).startswith("url-")
    assert images.parse_name(f"image-{images.cache_key(plain, None)}.qcow2")["complete"]


def test_parse_name_knows_cache_volumes_and_partial_downloads():
    key = f"sha256-{SHA[:32]}"
    assert images.parse_name(f"image-{key}.qcow2") == {
        "key": key,
        "format": "qcow2",
        "complete": True,
    }
    assert images.parse_name(f"image-{key}.part-0123abcd")["complete"] is False
    for other in ("vm1.qcow2", f"image-{key}.vmdk", f"image-{key}", "image-sha256-x.qcow2"):
        assert images.parse_name(other) is None


def test_parse_image_accepts_urls_and_readable_files(tmp_path):
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(qcow2_header())
    for source in ("https://127.0.0.1/d.qcow2", str(disk), f"file://{disk}"):
        parsed = images.parse_image({"image": source, "image_allowed_dirs": [str(tmp_path)]})
        assert parsed.source == source
    full = images.parse_image(
        {
            "image": str(disk),
            "image_allowed_dirs": [str(tmp_path)],
            "image_checksum": f"sha256:{SHA}",
            "image_format": "qcow2",
            "image_pool": "fast",
        }
    )
    assert full == images.ImageSpec(str(disk), Checksum("sha256", SHA), "qcow2", "fast")


@pytest.mark.parametrize(
    "values,key",
    [
        ({"image": "ftp://127.0.0.1/d.qcow2"}, "image"),
        ({"image": "disk.qcow2"}, "image"),
        ({"image": "/no/such/disk.qcow2"}, "image"),
        ({"image": "http://127.0.0.1/d", "image_format": "vmdk"}, "image_format"),
        ({"image": "http://127.0.0.1/d", "image_checksum": "abc"}, "image_checksum"),
    ],
)
def test_parse_image_names_the_bad_key(values, key):
    with pytest.raises(SpecError) as err:
        images.parse_image(values)
    assert err.value.key == key and err.value.accepted


def test_a_local_image_outside_image_allowed_dirs_is_refused(tmp_path):
    """A profile's ``image: /etc/shadow`` (or ``file:///root/.ssh/id_rsa``)
    would be read as root on the salt-cloud machine into a raw guest disk: a
    local file is taken only below a directory of ``image_allowed_dirs`` (the
    provider's setting), symbolic links resolved first."""
    allowed = tmp_path / "images"
    allowed.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("root:$6$hash:::\n")
    link = allowed / "innocent.raw"
    link.symlink_to(secret)
    good = allowed / "disk.qcow2"
    good.write_bytes(qcow2_header())
    for source in (str(secret), f"file://{secret}", str(link), "/etc/passwd"):
        with pytest.raises(SpecError) as err:
            images.parse_image({"image": source, "image_allowed_dirs": [str(allowed)]})
        assert err.value.key == "image" and "image_allowed_dirs" in str(err.value), source
        with pytest.raises(SpecError, match="image_allowed_dirs"):
            images.parse_image({"image": source})
    with pytest.raises(SpecError, match="image_allowed_dirs"):
        images.parse_image({"image": str(good)})  # no directory given: no local file
    spec = images.parse_image({"image": str(good), "image_allowed_dirs": [str(allowed)]})
    assert spec.source == str(good)
