"""The backup store's pure logic: point ids, chains, prune plans, manifests,
partial folders, the lock, checksums; plus the small parsers backups use."""

import importlib.util
import json
from pathlib import Path

import pytest

from salt_kvm.backup import manifest, verify
from salt_kvm.backup import ops as backup_ops
from salt_kvm.backup import store as bs
from salt_kvm.errors import ConflictError, NotFoundError, SaltKvmError, SpecError
from salt_kvm.virt import qemuimg
from salt_kvm.virt.units import parse_duration

REPO = Path(__file__).resolve().parents[3]


def point(pid, parent=None, chain=None, kind=None):
    """A point whose manifest fits the store's layout (one 1 MiB disk, vda)."""
    made = bs.Point(
        id=pid,
        domain="vm",
        kind=kind or (bs.KIND_INCREMENTAL if parent else bs.KIND_FULL),
        chain=chain or (parent and "?") or pid,
        parent=parent,
        checkpoint=f"saltkvm-0badcafe-{pid}",
        created="2026-11-21T04:11:00Z",
        consistency="frozen",
        frozen=True,
    )
    backing = f"../{parent}/vda.qcow2" if parent else None
    made.disks["vda"] = bs.DiskImage("vda", "vda.qcow2", "qcow2", 1024**2, 4, "0" * 64, backing)
    return made


def history():
    """Three chains: A (A, A1, A2), B (B), C (C, C1)."""
    ids = ["20260101T000000Z", "20260102T000000Z", "20260103T000000Z"]
    a, a1, a2 = ids
    b, c, c1 = "20260108T000000Z", "20260115T000000Z", "20260116T000000Z"
    return [
        point(a),
        point(a1, a, a),
        point(a2, a1, a),
        point(b),
        point(c),
        point(c1, c, c),
    ]


def test_point_ids_sort_by_time_and_never_repeat():
    first = bs.new_point_id(set(), now=0)
    assert first == "19700101T000000Z"
    second = bs.new_point_id({first}, now=0)
    third = bs.new_point_id({first, second}, now=0)
    assert (second, third) == ("19700101T000000Z-2", "19700101T000000Z-3")
    assert all(bs.POINT_RE.match(p) for p in (first, second, third))


def test_chains_and_chain_to():
    points = history()
    assert [[p.id for p in c] for c in bs.chains(points)] == [
        [p.id for p in points[:3]],
        [points[3].id],
        [p.id for p in points[4:]],
    ]
    assert [p.id for p in bs.chain_to(points, points[2].id)] == [p.id for p in points[:3]]
    with pytest.raises(SaltKvmError, match="chain is broken"):
        bs.chain_to([points[0], points[2]], points[2].id)
    with pytest.raises(NotFoundError):
        bs.chain_to(points, "20300101T000000Z")


@pytest.mark.parametrize(
    "keep,deleted", [(1, [0, 1, 2, 3]), (2, [0, 1, 2]), (3, []), (10, [])], ids=str
)
def test_prune_removes_whole_chains_only(keep, deleted):
    points = history()
    assert [p.id for p in bs.prune_plan(points, keep)] == [points[i].id for i in deleted]


@pytest.mark.parametrize("keep", [0, -1, "2", True, None, 1.5])
def test_prune_keep_must_be_a_positive_integer(keep):
    with pytest.raises(SpecError, match="^keep:.*accepted: an integer of 1 or more"):
        bs.prune_plan(history(), keep)


@pytest.mark.parametrize("ref", ["yesterday", "2026-11-21", "../x", 5])
def test_point_references_are_checked(ref):
    with pytest.raises(SpecError, match="^point:.*latest"):
        bs.check_point_ref(ref)
    assert bs.check_point_ref(None) == bs.check_point_ref("latest") == "latest"


def test_store_lists_only_committed_points(tmp_path):
    store = bs.Store(tmp_path, "vm")
    assert store.points() == []
    p = point("20260101T000000Z")
    partial = store.begin(p.id)
    (partial / "vda.qcow2").write_bytes(b"data")
    assert store.points() == [] and store.partials() == [partial]
    store.commit(partial, p)
    assert [x.id for x in store.points()] == [p.id]
    assert json.loads((store.path(p) / bs.MANIFEST).read_text())["id"] == p.id
    # a folder named like a point without a manifest is not a point
    (store.root / "20260102T000000Z").mkdir()
    unfinished = store.begin("20260103T000000Z")
    assert [x.id for x in store.points()] == [p.id]
    assert store.clean_partials() == [unfinished.name]
    assert store.point("latest").id == p.id
    with pytest.raises(NotFoundError, match="accepted: latest, 20260101T000000Z"):
        store.point("20260105T000000Z")
    store.delete(store.point("latest"))
    assert store.points() == [] and store.partials() == []


def test_store_needs_an_absolute_destination():
    with pytest.raises(SpecError, match="^dest:"):
        bs.Store("relative/dir", "vm")


@pytest.mark.parametrize(
    "dest", ["/srv/backup\n", "/srv/backup ", "/srv/back\tup", "/srv/../etc", "/srv/./backup", 5]
)
def test_a_destination_with_whitespace_or_dot_parts_is_refused(tmp_path, dest):
    # /srv/backup\n (from $(cat file)) made a folder "backup\n" beside the real one.
    if isinstance(dest, str):
        dest = str(tmp_path) + dest
    with pytest.raises(SpecError, match="^dest:"):
        bs.Store(dest, "vm")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_partial_folder_that_is_a_symlink_is_never_followed(tmp_path):
    # Someone plants dest/vm/.partial-x -> a folder of theirs (or of libvirt's):
    # a cleanup removes the link, never what it leads to, nor lists its files.
    store = bs.Store(tmp_path / "dest", "vm")
    store.make_root()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "disk.qcow2").write_bytes(b"keep me")
    link = store.root / f"{bs.PARTIAL}20260101T000000Z"
    link.symlink_to(elsewhere)
    assert store.partials() == []
    assert store.clean_partials() == [link.name]
    assert not link.is_symlink() and (elsewhere / "disk.qcow2").read_bytes() == b"keep me"


def test_lock_refuses_a_second_run(tmp_path):
    store = bs.Store(tmp_path, "vm")
    with store.locked("backup"):
        with pytest.raises(ConflictError, match="backup pid"), bs.Store(tmp_path, "vm").locked():
            pass
    with store.locked():  # released
        pass


def _image(folder, name):
    path = folder / name
    qemuimg.run("create", "-q", "-f", "qcow2", str(path), "1M")
    return path


def test_verify_point_finds_changed_and_missing_files(tmp_path):
    store = bs.Store(tmp_path, "vm")
    p = point("20260101T000000Z")
    partial = store.begin(p.id)
    image = _image(partial, "vda.qcow2")
    p.disks["vda"] = bs.DiskImage(
        "vda", "vda.qcow2", "qcow2", 1024**2, image.stat().st_size, bs.sha256_file(image)
    )
    store.commit(partial, p)
    assert verify.verify_point(store, p) == []
    assert backup_ops.verify(str(tmp_path), "vm")["ok"] is True
    with open(store.path(p, "vda.qcow2"), "r+b") as handle:
        handle.seek(100000)
        handle.write(b"x")
    assert verify.verify_point(store, p) == [f"{p.id}/vda.qcow2: checksum mismatch"]
    report = backup_ops.verify(str(tmp_path), "vm")
    assert report["ok"] is False and p.id in report["problems"]
    store.path(p, "vda.qcow2").unlink()
    assert verify.verify_point(store, p) == [f"{p.id}/vda.qcow2: missing"]


def _checksummed_point(store, algorithm):
    """A stored point whose one image carries a digest in ``algorithm``."""
    p = point("20260101T000000Z")
    partial = store.begin(p.id)
    image = _image(partial, "vda.qcow2")
    digest = bs.checksum_file(image, algorithm)
    size = image.stat().st_size
    fields = bs.digest_fields(algorithm, digest)
    p.disks["vda"] = bs.DiskImage("vda", "vda.qcow2", "qcow2", 1024**2, size, **fields)
    store.commit(partial, p)
    return p


@pytest.mark.parametrize("algorithm", ["sha256", "blake2b"])
def test_a_point_verifies_with_the_algorithm_its_manifest_names(tmp_path, algorithm):
    store = bs.Store(tmp_path, "vm")
    p = _checksummed_point(store, algorithm)
    data = json.loads(store.path(p, bs.MANIFEST).read_text())
    entry = data["disks"]["vda"]
    assert entry["algorithm"] == algorithm
    assert len(entry[algorithm]) == {"sha256": 64, "blake2b": 128}[algorithm]
    assert entry[{"sha256": "blake2b", "blake2b": "sha256"}[algorithm]] is None
    stored = store.point(p.id)
    assert stored.disks["vda"].checksum == p.disks["vda"].checksum
    assert verify.verify_point(store, stored) == []
    with open(store.path(p, "vda.qcow2"), "r+b") as handle:  # one byte changed
        handle.seek(150000)
        handle.write(b"x")
    assert verify.verify_point(store, store.point(p.id)) == [f"{p.id}/vda.qcow2: checksum mismatch"]


def test_a_manifest_of_before_the_algorithm_field_still_verifies(tmp_path):
    """A point written by an older version: ``sha256`` and no ``algorithm``."""
    store = bs.Store(tmp_path, "vm")
    p = _checksummed_point(store, "sha256")
    path = store.path(p, bs.MANIFEST)
    data = json.loads(path.read_text())
    for key in ("algorithm", "blake2b"):
        del data["disks"]["vda"][key]
    path.write_text(json.dumps(data))
    stored = store.point(p.id)
    assert (stored.disks["vda"].algorithm, stored.disks["vda"].sha256) == (
        "sha256",
        p.disks["vda"].sha256,
    )
    assert verify.verify_point(store, stored) == []
    with open(store.path(p, "vda.qcow2"), "r+b") as handle:
        handle.seek(150000)
        handle.write(b"x")
    assert verify.verify_point(store, store.point(p.id)) == [f"{p.id}/vda.qcow2: checksum mismatch"]


@pytest.mark.parametrize(
    "change,key",
    [
        ({"algorithm": "md5"}, "algorithm"),
        ({"algorithm": "SHA256"}, "algorithm"),
        ({"algorithm": "blake2b"}, "blake2b"),  # a sha256 digest, no blake2b one
        ({"algorithm": "blake2b", "blake2b": "ab" * 32}, "blake2b"),  # too short
        ({"algorithm": "blake2b", "blake2b": "AB" * 64}, "blake2b"),
        ({"algorithm": "sha256", "sha256": "ab" * 64}, "sha256"),
        ({"algorithm": None, "sha256": None, "blake2b": "ab" * 64}, "sha256"),
    ],
)
def test_parse_manifest_refuses_a_checksum_that_does_not_fit_its_algorithm(change, key):
    data = _valid_manifest()
    data["disks"]["vda"].update(change)
    with pytest.raises(bs.ManifestError, match=rf": disks\.vda\.{key}: .*\(accepted: "):
        bs.parse_manifest(data, "20260102T000000Z", "vm")


@pytest.mark.parametrize(
    "cpuinfo,algorithm",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 sha_ni avx512f\n", "sha256"),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n", "blake2b"),
        ("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1 sha2 crc32\n", "sha256"),
        ("processor\t: 0\nFeatures\t: fp asimd crc32\n", "blake2b"),
        ("model name\t: sha_ni in the name only\n", "blake2b"),
        ("", "blake2b"),
    ],
)
def test_new_points_use_the_faster_digest_of_the_cpu(cpuinfo, algorithm):
    assert manifest.algorithm_for_cpu(cpuinfo) == algorithm
    assert bs.preferred_algorithm() in bs.ALGORITHMS


def test_a_disk_without_a_digest_in_its_algorithm_has_no_checksum():
    image = point("20260101T000000Z").disks["vda"]
    assert image.checksum == "0" * 64
    for algorithm in ("blake2b", "target"):  # no digest; not an algorithm
        image.algorithm = algorithm
        with pytest.raises(SaltKvmError, match=f"no {algorithm} digest"):
            image.checksum  # noqa: B018


def test_manifest_round_trip():
    p = point("20260101T000000Z")
    p.disks["vda"] = bs.DiskImage("vda", "vda.qcow2", "qcow2", 10, 5, "ab", "../x/vda.qcow2")
    assert bs.Point.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert p.summary()["bytes"] == 5


@pytest.mark.parametrize(
    "value,seconds", [(90, 90), ("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800)]
)
def test_durations(value, seconds):
    assert parse_duration(value, "max_age") == seconds


@pytest.mark.parametrize("value", ["soon", "-1h", 0, True, "5y"])
def test_bad_durations_name_the_key(value):
    with pytest.raises(SpecError, match="^max_age:.*24h"):
        parse_duration(value, "max_age")


def test_copy_targets():
    assert backup_ops.parse_target("/mnt/nas") == Path("/mnt/nas")
    ssh = backup_ops.parse_target("ssh://backup@kvm2:2222/srv/replica")
    assert (ssh.user, ssh.host, ssh.port, ssh.path) == ("backup", "kvm2", 2222, "/srv/replica")
    for bad in ("relative", "ssh://host", "ftp://x/y", "", None):
        with pytest.raises(SpecError, match="^target:.*ssh://"):
            backup_ops.parse_target(bad)


# ---- the state module's decisions, with the execution module faked -----------------
def _load_state(salt, test=False):
    spec = importlib.util.spec_from_file_location(
        "kvm_backup_state", REPO / "_states/kvm_backup.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__salt__ = salt
    module.__opts__ = {"test": test}
    return module


def test_backed_up_takes_nothing_while_the_newest_is_young():
    import time

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    calls = []
    salt = {
        "kvm_backup.list": lambda name, dest: [{"id": "x", "created": now}],
        "kvm_backup.create": lambda *a, **k: calls.append(a),
    }
    ret = _load_state(salt).backed_up("vm", "/b", max_age="1h")
    assert ret["result"] is True and ret["changes"] == {} and not calls
    old = "2020-01-01T00:00:00Z"
    salt["kvm_backup.list"] = lambda name, dest: [{"id": "x", "created": old}]
    ret = _load_state(salt, test=True).backed_up("vm", "/b", max_age="1h")
    assert ret["result"] is None and ret["changes"]["backup"]["old"] == "x" and not calls
    ret = _load_state(salt).backed_up("vm", "/b", max_age="later")
    assert ret["result"] is False and "max_age" in ret["comment"]


def test_events_go_to_the_bus_and_never_fail_a_backup():
    spec = importlib.util.spec_from_file_location("kvm_backup_mod", REPO / "_modules/kvm_backup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sent = []

    def send(tag, data):
        sent.append((tag, data))
        if data.get("boom"):
            raise RuntimeError("bus down")

    module.__salt__ = {"event.send": send}
    emit = module._emitter("vm", True)
    emit("progress", {"percent": 50})
    emit("done", {"boom": True})
    assert [t for t, _ in sent] == ["salt/kvm_backup/vm/progress", "salt/kvm_backup/vm/done"]
    assert module._emitter("vm", False) is None


def test_nothing_to_restore_or_copy_writes_nothing(tmp_path):
    from salt_kvm.backup import restore

    with pytest.raises(NotFoundError, match="no backups of vm"):
        restore.restore(None, "vm", str(tmp_path), target="vm2")
    with pytest.raises(NotFoundError, match="no backups of vm"):
        backup_ops.replicate(str(tmp_path), "vm", str(tmp_path / "copy"))
    assert list(tmp_path.iterdir()) == []


def _valid_manifest():
    p = point("20260102T000000Z", "20260101T000000Z", "20260101T000000Z")
    return json.loads(json.dumps(p.to_dict()))


@pytest.mark.parametrize(
    "field,value",
    [
        ("id", "20260102T000000Z\n"),
        ("id", "２０２６0102T000000Z"),  # digits of another script
        ("format", True),
        ("format", 2),
        ("kind", "FULL"),
        ("parent", "20260103T000000Z"),  # not earlier than the point
        ("chain", "20260102T000000Z"),
        ("frozen", "yes"),
        ("duration", float("nan")),
        ("duration", float("inf")),
        ("consistency", "perfect"),
        ("method", "rsync"),
        ("compression", "lz4"),
        ("compression", True),
        ("domain_xml_sha256", "../domain.xml"),
        ("disks", {}),
        ("disks", []),
    ],
)
def test_parse_manifest_refuses_a_field_that_does_not_fit(field, value):
    data = _valid_manifest()
    assert bs.parse_manifest(data, "20260102T000000Z", "vm").disks["vda"].file == "vda.qcow2"
    data[field] = value
    with pytest.raises(bs.ManifestError, match=rf"^backup point 20260102T000000Z: {field}: "):
        bs.parse_manifest(data, "20260102T000000Z", "vm")


@pytest.mark.parametrize(
    "key,value",
    [
        ("file", "/etc/shadow"),
        ("file", "../20260101T000000Z/vda.qcow2"),
        ("file", "vdb.qcow2"),
        ("format", "raw"),
        ("backing", "/etc/shadow"),
        ("backing", None),
        ("size", -1),
        ("size", True),
        ("virtual_size", 1.5),
        ("sha256", "AB" * 32),
        ("target", "vdb"),
    ],
)
def test_parse_manifest_refuses_a_disk_that_leaves_the_point(key, value):
    data = _valid_manifest()
    data["disks"]["vda"][key] = value
    with pytest.raises(bs.ManifestError, match=rf": disks\.vda\.{key}: "):
        bs.parse_manifest(data, "20260102T000000Z", "vm")
