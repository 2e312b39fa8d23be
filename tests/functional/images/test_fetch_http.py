"""Downloads from a loopback HTTP server: validators, resume, errors."""

import gzip
import random

import pytest

from salt_kvm.errors import SaltKvmError
from salt_kvm.images import fetch
from tests.imageserver import ImageServer

DATA = random.Random(8).randbytes(5_000_000)  # gzip cannot shrink it much


@pytest.fixture
def server():
    srv = ImageServer({"/disk.raw": DATA, "/disk.raw.gz": gzip.compress(DATA)})
    yield srv
    srv.close()


def test_a_source_knows_size_and_validator_from_head(server):
    source = fetch.open_source(server.url("/disk.raw"))
    assert source.size == len(DATA) and source.validator.startswith('"')
    assert server.requests[("HEAD", "/disk.raw")] == 1 and server.gets("/disk.raw") == 0
    assert b"".join(source.chunks()) == DATA


def test_an_interrupted_transfer_resumes_where_it_stopped(server):
    server.cut_after["/disk.raw.gz"] = 1_000_000
    source = fetch.open_source(server.url("/disk.raw.gz"))
    kind, out = fetch.decompressed(source.chunks())
    assert kind == "gzip" and b"".join(out) == DATA
    assert server.gets("/disk.raw.gz") == 2


def test_http_errors_name_the_url(server):
    with pytest.raises(SaltKvmError, match="/missing.qcow2 answered 404"):
        fetch.open_source(server.url("/missing.qcow2"))


def test_a_file_source_validator_changes_with_the_file(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(DATA)
    one = fetch.open_source(str(path))
    path.write_bytes(DATA + b"more")
    two = fetch.open_source(f"file://{path}")
    assert one.validator != two.validator
    assert b"".join(two.chunks()) == DATA + b"more"
