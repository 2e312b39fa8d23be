"""The NBD client and the front-to-back qcow2 writer against a real NBD
server: ``qemu-nbd`` serving a qcow2 with a persistent dirty bitmap on a unix
socket, as libvirt's pull-mode export serves a disk (no guest needed). A full
copy and an incremental on its parent read the same as the source, hold only
what they must, and carry the sha256 of their own file; a server that breaks
the protocol gives an error, never an image."""

import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
import time

import pytest

from salt_kvm.backup import nbd, pull, qcow2
from salt_kvm.errors import SaltKvmError
from salt_kvm.virt import qemuimg

MIB = 1024**2
SIZE = 64 * MIB + 512 * 3  # not a whole number of clusters


def qemu_io(path, *commands, fmt="qcow2"):
    args = [a for c in commands for a in ("-c", c)]
    out = subprocess.run(
        ["qemu-io", "-f", fmt, *args, path], check=True, capture_output=True, text=True
    ).stdout
    assert "fail" not in out.lower(), out


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def layer(path):
    """(start, length, data, zero) of what the image itself holds (depth 0)."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [
        (e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(out) if e["depth"] == 0
    ]


def same(a, b):
    proc = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True)
    return proc.returncode == 0


class Served:
    """``qemu-nbd`` serving ``image`` read-only as export ``vda`` (with ``bitmap``)."""

    def __init__(self, tmp_path, image, bitmap=None):
        self.sock = str(tmp_path / "nbd.sock")
        args = ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-x", "vda", "-k", self.sock]
        args += ["-B", bitmap] if bitmap else []
        self.proc = subprocess.Popen([*args, str(image)], stderr=subprocess.PIPE)
        for _ in range(100):
            if os.path.exists(self.sock):
                return
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(self.proc.stderr.read())

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def source(tmp_path):
    """A qcow2 with data, an allocated zero range and a hole, then a persistent
    bitmap ``b0`` and, after it, changes: the parent point is a copy taken at
    the bitmap's creation."""
    src = tmp_path / "src.qcow2"
    qemuimg.run("create", "-q", "-f", "qcow2", str(src), str(SIZE))
    qemu_io(
        str(src), "write -P 1 0 4M", "write -P 2 10M 1M", "write -z 30M 2M", "write -P 7 63M 1M"
    )
    qemu_io(str(src), f"write -P 9 {SIZE - 1536} 1536")
    parent = tmp_path / "parent.qcow2"
    qemuimg.run("convert", "-q", "-f", "qcow2", "-O", "qcow2", str(src), str(parent))
    qemuimg.run("bitmap", "--add", "-f", "qcow2", str(src), "b0")
    qemu_io(str(src), "write -P 3 20M 128k", "write -z 10M 64k", "write -P 4 2M 4k")
    return src, parent


def test_client_reads_size_extents_and_data(tmp_path, source):
    src, _parent = source
    served = Served(tmp_path, src, "b0")
    try:
        dirty = nbd.dirty_bitmap("b0")
        with nbd.Client(served.sock, "vda", (nbd.BASE_ALLOCATION, dirty)) as client:
            assert client.size == SIZE
            extents = client.extents(nbd.BASE_ALLOCATION)
            assert extents[0].offset == 0
            assert all(
                a.offset + a.length == b.offset for a, b in zip(extents, extents[1:], strict=False)
            )
            assert extents[-1].offset + extents[-1].length == SIZE
            zero = [(e.offset, e.length) for e in extents if e.flags & nbd.STATE_ZERO]
            assert any(o <= 4 * MIB and o + n >= 10 * MIB for o, n in zero)  # never written
            changed = [(e.offset, e.length) for e in client.extents(dirty) if e.flags]
            assert changed == [(2 * MIB, 64 * 1024), (10 * MIB, 64 * 1024), (20 * MIB, 128 * 1024)]
            buf = memoryview(bytearray(MIB))
            client.read(20 * MIB, buf)
            assert bytes(buf[: 128 * 1024]) == b"\x03" * 128 * 1024
            assert bytes(buf[128 * 1024 :]) == bytes(MIB - 128 * 1024)
            with pytest.raises(nbd.NbdError, match="leaves the export"):
                client.read(SIZE - 512, memoryview(bytearray(1024)))
    finally:
        served.close()


def test_unknown_export_or_bitmap_is_refused(tmp_path, source):
    src, _parent = source
    served = Served(tmp_path, src)
    try:
        with pytest.raises(nbd.NbdError, match="refused|has no"):
            nbd.Client(served.sock, "nope")
        with pytest.raises(nbd.NbdError, match="has no qemu:dirty-bitmap:b0"):
            nbd.Client(served.sock, "vda", (nbd.BASE_ALLOCATION, nbd.dirty_bitmap("b0")))
    finally:
        served.close()


def test_full_and_incremental_copies_read_as_the_source(tmp_path, source):
    src, parent = source
    served = Served(tmp_path, src, "b0")
    try:
        with nbd.Client(served.sock, "vda", (nbd.BASE_ALLOCATION,)) as client:
            full = tmp_path / "full.qcow2"
            digest, read = pull.copy_disk(client, full, None, None)
        assert digest == sha256(full)
        assert same(full, src)
        qemuimg.check(str(full), fmt="qcow2")
        assert read < 12 * MIB  # the data, not the 64 MiB disk nor the zero range
        assert qemuimg.info(str(full), fmt="qcow2")["virtual-size"] == SIZE

        dirty = nbd.dirty_bitmap("b0")
        with nbd.Client(served.sock, "vda", (nbd.BASE_ALLOCATION, dirty)) as client:
            inc = tmp_path / "inc.qcow2"
            digest, read = pull.copy_disk(client, inc, "parent.qcow2", dirty)
        assert digest == sha256(inc)
        assert read == 64 * 1024 + 128 * 1024  # the changed data; the zeroed range is no read
        info = qemuimg.info(str(inc), fmt="qcow2")
        assert (info["backing-filename"], info["backing-filename-format"]) == (
            "parent.qcow2",
            "qcow2",
        )
        qemuimg.check(str(inc), fmt="qcow2", backing=False)
        assert same(inc, src)  # through its backing file
        assert layer(inc) == [
            (2 * MIB, 64 * 1024, True, False),
            (10 * MIB, 64 * 1024, False, True),
            (20 * MIB, 128 * 1024, True, False),
        ]
        assert inc.stat().st_mode & 0o777 == 0o600
    finally:
        served.close()


def test_a_copy_is_hashed_in_the_algorithm_asked_for(tmp_path, source):
    src, _parent = source
    served = Served(tmp_path, src)
    try:
        with nbd.Client(served.sock, "vda", (nbd.BASE_ALLOCATION,)) as client:
            full = tmp_path / "full.qcow2"
            digest, _read = pull.copy_disk(client, full, None, None, algorithm="blake2b")
    finally:
        served.close()
    assert digest == hashlib.blake2b(full.read_bytes()).hexdigest()
    assert same(full, src)


def test_a_copy_reports_its_steps_and_syncs_what_it_wrote_back_early(tmp_path, source, monkeypatch):
    """Writeback started every 1 MiB while the copy goes on changes no byte of
    the image; the caller learns the seconds of each step."""
    src, _parent = source
    monkeypatch.setattr(pull, "WRITEBACK", MIB)
    served = Served(tmp_path, src)
    phases: dict[str, float] = {}
    try:
        with nbd.Client(served.sock, "vda", (nbd.BASE_ALLOCATION,)) as client:
            full = tmp_path / "full.qcow2"
            digest, _read = pull.copy_disk(client, full, None, None, phases=phases)
    finally:
        served.close()
    assert digest == sha256(full)
    assert same(full, src)
    qemuimg.check(str(full), fmt="qcow2")
    assert list(phases) == ["map", "stream", "sync"]
    assert all(spent >= 0 for spent in phases.values())


def test_writeback_is_a_hint_on_the_bytes_written(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 3 * MIB)
        assert pull.start_writeback(fd, MIB, 2 * MIB)  # Linux: sync_file_range
        assert not pull.start_writeback(fd, 0, 0)  # nothing to write back
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 3 * MIB


def test_copy_never_writes_through_a_planted_link(tmp_path, source):
    src, _parent = source
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "full.qcow2").symlink_to(victim)
    served = Served(tmp_path, src)
    try:
        with nbd.Client(served.sock, "vda", (nbd.BASE_ALLOCATION,)) as client:
            with pytest.raises(OSError):
                pull.copy_disk(client, tmp_path / "full.qcow2", None, None)
    finally:
        served.close()
    assert victim.read_text() == "keep"


def test_writer_refuses_a_wrong_map_or_amount_of_data(tmp_path):
    fd = os.open(tmp_path / "x.qcow2", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(SaltKvmError, match="map of 1 clusters"):
            qcow2.Writer(fd, 2 * qcow2.CLUSTER, b"\x01")
        writer = qcow2.Writer(fd, 2 * qcow2.CLUSTER, b"\x01\x00")
        writer.begin()
        with pytest.raises(SaltKvmError, match="more data"):
            writer.write(bytes(qcow2.CLUSTER + 1))
        with pytest.raises(SaltKvmError, match="0 bytes of data written"):
            writer.finish()
    finally:
        os.close(fd)


# ---- a server that breaks the protocol --------------------------------------------------
def _fake_server(path, script):
    """Serve one connection: the handshake, then ``script(conn)``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        try:
            script(conn)
        except OSError:
            pass
        finally:
            time.sleep(0.2)
            conn.close()
            listener.close()

    threading.Thread(target=serve, daemon=True).start()


def _recv(conn, count):
    data = b""
    while len(data) < count:
        data += conn.recv(count - len(data))
    return data


def _answer_options(conn, size, bad=None):
    conn.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 3))
    _recv(conn, 4)
    while True:
        _magic, opt, length = struct.unpack(">QII", _recv(conn, 16))
        _recv(conn, length)
        if bad == "huge-reply":
            conn.sendall(struct.pack(">QIII", nbd.REPLY_MAGIC, opt, nbd.REP_ACK, 1 << 30))
            return
        if opt == nbd.OPT_GO:
            info = struct.pack(">HQH", nbd.INFO_EXPORT, size, 1)
            conn.sendall(struct.pack(">QIII", nbd.REPLY_MAGIC, opt, nbd.REP_INFO, 12) + info)
            conn.sendall(struct.pack(">QIII", nbd.REPLY_MAGIC, opt, nbd.REP_ACK, 0))
            return
        conn.sendall(struct.pack(">QIII", nbd.REPLY_MAGIC, opt, nbd.REP_ACK, 0))


def _read_answered_with(chunk_offset, chunk_len):
    def script(conn):
        _answer_options(conn, 1 * MIB)
        _m, _f, _t, cookie, _off, _len = struct.unpack(">IHHQQI", _recv(conn, 28))
        payload = struct.pack(">Q", chunk_offset) + b"x" * chunk_len
        head = struct.pack(
            ">IHHQI",
            nbd.STRUCTURED_REPLY_MAGIC,
            nbd.REPLY_FLAG_DONE,
            nbd.REPLY_OFFSET_DATA,
            cookie,
            len(payload),
        )
        conn.sendall(head + payload)

    return script


@pytest.mark.parametrize(
    "script, message",
    [
        (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n"), "not an NBD server"),
        (lambda c: _answer_options(c, 0, bad="huge-reply"), "at most 65536"),
        (lambda c: _answer_options(c, 1 << 60), "no usable size"),
        (_read_answered_with(4096, 512), "outside the request"),
        (_read_answered_with(0, 100), "answered with 100"),
    ],
    ids=["not-nbd", "huge-option-reply", "huge-export", "chunk-outside", "short-read"],
)
def test_a_server_breaking_the_protocol_gives_an_error(tmp_path, script, message):
    path = str(tmp_path / "fake.sock")
    _fake_server(path, script)
    with pytest.raises(nbd.NbdError, match=message):
        client = nbd.Client(path, "vda", timeout=10)
        try:
            client.read(0, memoryview(bytearray(1024)))
        finally:
            client.close()
