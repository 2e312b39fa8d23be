"""Choosing and planning the backup methods (api, snapshot), the snapshot
method's overlay names, manifests of either method, and the state's check of
``method`` and ``compress``."""

from pathlib import Path

import pytest

from salt_kvm.backup import method_api, method_snapshot, snapshots
from salt_kvm.backup import run as backup
from salt_kvm.backup import store as bs
from salt_kvm.backup.core import SourceDisk, check_compress, check_method
from salt_kvm.errors import ConflictError, SaltKvmError, SpecError
from tests.unit.backup.test_store import _load_state, _valid_manifest

DISKS = [
    SourceDisk("vda", "/p/vm.qcow2", "qcow2", True),
    SourceDisk("vdb", "/p/b.raw", "raw", False),
]


class FakeConn:
    def __init__(self, version):
        self.version = version

    def getLibVersion(self):  # noqa: N802 - libvirt's name
        return self.version

    def getURI(self):  # noqa: N802
        return "qemu:///system"


def point(pid, parent=None, method="api", checkpoint="cp", disks=("vda", "vdb")):
    return bs.Point(
        id=pid,
        domain="vm",
        kind=bs.KIND_INCREMENTAL if parent else bs.KIND_FULL,
        chain=pid,
        parent=parent,
        checkpoint=checkpoint,
        created="2026-11-21T04:11:00Z",
        consistency="frozen",
        frozen=True,
        disks={t: bs.DiskImage(t, f"{t}.qcow2", "qcow2", 1, 1, "x") for t in disks},
        method=method,
    )


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("API", "api"), (None, "auto")])
def test_methods_accepted(value, expected):
    assert check_method(value) == expected


@pytest.mark.parametrize("value", ["fast", "", 1, True, ["api"]])
def test_bad_method_names_the_key_and_the_accepted_values(value):
    with pytest.raises(SpecError, match=r"^method: .* \(accepted: auto, api, snapshot\)$"):
        check_method(value)


def test_bad_method_is_refused_before_libvirt_is_asked(tmp_path):
    with pytest.raises(SpecError, match="^method:"):
        backup.create(None, "vm", str(tmp_path), method="rsync")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "version,method,chosen",
    [
        (9_000_000, "auto", "api"),
        (7_006_000, "auto", "api"),
        (7_005_000, "auto", "snapshot"),
        (9_000_000, "snapshot", "snapshot"),
        (6_000_000, "snapshot", "snapshot"),
        (9_000_000, "api", "api"),
    ],
)
def test_auto_takes_the_api_from_libvirt_7_6(version, method, chosen):
    assert backup.choose_method(FakeConn(version), method).name == chosen


def test_api_is_refused_on_old_libvirt_pointing_at_the_fallback():
    with pytest.raises(SaltKvmError, match="method=api needs libvirt 7.6.*method=snapshot"):
        backup.choose_method(FakeConn(7_005_000), "api")


def test_snapshot_method_follows_any_point_without_a_checkpoint():
    plan = method_snapshot.SnapshotMethod().plan
    api_point = point("20260101T000000Z")
    snap_point = point("20260102T000000Z", api_point.id, "snapshot", None)
    # raw disks, no bitmaps, no checkpoint: still incremental
    assert plan(None, DISKS, api_point, False, None, 1) == (api_point, None)
    assert plan(None, DISKS, snap_point, False, None, 2) == (snap_point, None)
    assert plan(None, DISKS, None, False, None, 0) == (None, "first backup")
    assert plan(None, DISKS, snap_point, True, None, 2) == (None, "full requested")
    assert plan(None, DISKS[:1], snap_point, False, None, 2) == (None, "the set of disks changed")
    parent, reason = plan(None, DISKS, snap_point, False, 2, 2)
    assert parent is None and "full_every=2" in reason


def test_api_after_a_snapshot_point_starts_a_new_chain_and_says_why():
    qcow2 = [SourceDisk("vda", "/p/vm.qcow2", "qcow2", True)]
    latest = point("20260102T000000Z", None, "snapshot", None, disks=("vda",))
    parent, reason = method_api._plan_kind(None, qcow2, latest, False, None, 1)
    assert parent is None
    assert "taken with method=snapshot" in reason and "no checkpoint" in reason


def test_overlay_names_are_recognised():
    overlay = method_snapshot.overlay_for("/var/lib/libvirt/images/vm.qcow2", "20261121T041100Z")
    assert overlay == "/var/lib/libvirt/images/vm.saltkvm-backup-20261121T041100Z.qcow2"
    assert method_snapshot.is_overlay(overlay)
    assert method_snapshot.is_overlay("/x/vm.saltkvm-backup-20261121T041100Z-2.qcow2")
    for other in (
        "/x/vm.qcow2",
        "/x/vm.before-upgrade.qcow2",
        None,
        "/x/vm.saltkvm-backup-x.qcow2",
    ):
        assert not method_snapshot.is_overlay(other)


def test_user_snapshots_cannot_take_the_backup_overlay_names():
    with pytest.raises(SpecError, match="^name: .*reserved for backups"):
        snapshots.check_name("saltkvm-backup-20261121T041100Z")
    assert snapshots.check_name("saltkvm-before") == "saltkvm-before"


def test_manifests_record_the_method_and_old_or_newer_ones_still_read():
    made = point("20260101T000000Z", method="snapshot", checkpoint=None)
    assert bs.Point.from_dict(made.to_dict()).method == "snapshot"
    assert made.summary()["method"] == "snapshot"
    old = made.to_dict()
    del old["method"]
    assert bs.Point.from_dict(old).method == "api"  # points from before the option
    assert bs.Point.from_dict({**made.to_dict(), "later_field": 1}).id == made.id


@pytest.mark.parametrize("test", [True, False])
@pytest.mark.parametrize(
    "bad,message",
    [
        (
            {"method": "copy"},
            "method: 'copy' is not a backup method (accepted: auto, api, snapshot)",
        ),
        ({"compress": "zstd"}, "compress: 'zstd' is not a boolean (accepted: true, false"),
    ],
)
def test_state_refuses_a_bad_argument_before_doing_anything(test, bad, message):
    calls = []
    salt = {
        "kvm_backup.list": lambda *a, **k: calls.append(("list", a)) or [],
        "kvm_backup.create": lambda *a, **k: calls.append(("create", a)),
    }
    ret = _load_state(salt, test).backed_up("vm", "/b", **bad)
    assert ret["result"] is False and ret["changes"] == {} and not calls
    assert message in ret["comment"]


def test_state_passes_the_method_on():
    got = {}

    def create(name, dest, **kwargs):
        got.update(kwargs)
        return {"point": "p", "kind": "full", "bytes": 1, "frozen": True, "method": "snapshot"}

    salt = {
        "kvm_backup.list": lambda *a, **k: [],
        "kvm_backup.create": create,
        "kvm_backup.prune": lambda *a, **k: {"deleted": []},
    }
    ret = _load_state(salt).backed_up("vm", "/b", method="snapshot")
    assert ret["result"] is True and got["method"] == "snapshot"
    assert ret["changes"]["backup"]["method"] == "snapshot"


def test_one_run_per_domain_whatever_the_destination(tmp_path):
    locks = str(tmp_path / "locks")
    with bs.domain_locked("uuid-1", "vm", Path("/a"), locks):
        with pytest.raises(
            ConflictError, match=r"another backup run of vm .* /b\) .*backup into /a"
        ):
            with bs.domain_locked("uuid-1", "vm", Path("/b"), locks):
                pass
        with bs.domain_locked("uuid-2", "vm2", Path("/b"), locks):  # another domain: fine
            pass
    with bs.domain_locked("uuid-1", "vm", Path("/b"), locks):  # released
        pass


# ---- disks= as the CLI gives it ------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, None),
        ("vdb", ["vdb"]),  # disks=vdb on the CLI: a string, not a list of letters
        ("vda,vdb", ["vda", "vdb"]),
        ("vda, vdb", ["vda", "vdb"]),
        (["vdb"], ["vdb"]),
    ],
)
def test_disks_read_a_target_a_list_or_a_comma_list(value, expected):
    from salt_kvm.backup.core import check_disks

    assert check_disks(value) == expected


@pytest.mark.parametrize("value", [[1], [None], ["vda\n"], {"vda": 1}, 5, True, ["vd a"]])
def test_bad_disks_are_refused_by_name(value):
    from salt_kvm.backup.core import check_disks

    with pytest.raises(SpecError) as err:
        check_disks(value)
    assert err.value.key == "disks" and err.value.accepted


@pytest.mark.parametrize(
    "value,expected",
    [(True, True), (False, False), ("true", True), ("False", False), ("no", False), (None, False)],
)
def test_compress_takes_booleans_and_their_names(value, expected):
    assert check_compress(value) is expected


@pytest.mark.parametrize("value", ["zstd", "", 2, [True], "true\n"])
def test_compress_refuses_anything_else_by_name(value):
    with pytest.raises(
        SpecError,
        match=r"^compress: .* is not a boolean \(accepted: true, false \(or yes/no, 1/0\)\)$",
    ):
        check_compress(value)


def test_bad_compress_is_refused_before_libvirt_is_asked(tmp_path):
    with pytest.raises(SpecError, match="^compress:"):
        backup.create(None, "vm", str(tmp_path), compress="zstd")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version,method", [(9_000_000, "snapshot"), (7_005_000, "auto")])
def test_the_snapshot_method_refuses_compress_saying_why(tmp_path, version, method):
    with pytest.raises(
        SpecError,
        match=r"^compress: method=snapshot cannot compress: .*qemu-img rebase.*"
        r"\(accepted: False with method=snapshot; True with method=api\)$",
    ):
        backup.create(FakeConn(version), "vm", str(tmp_path), method=method, compress=True)
    assert list(tmp_path.iterdir()) == []


def test_manifests_record_the_compression_and_old_ones_read_as_uncompressed():
    data = {**_valid_manifest(), "compression": "zstd"}
    made = bs.parse_manifest(data, data["id"], "vm")
    assert made.compression == "zstd" and made.summary()["compression"] == "zstd"
    assert bs.Point.from_dict(made.to_dict()).compression == "zstd"
    del data["compression"]  # a point from before the option
    assert bs.parse_manifest(data, data["id"], "vm").compression is None
    assert bs.Point.from_dict(data).compression is None


def test_state_passes_compress_on_and_shows_the_compression():
    got = {}

    def create(name, dest, **kwargs):
        got.update(kwargs)
        return {"point": "p", "kind": "full", "bytes": 1, "frozen": True, "compression": "zstd"}

    salt = {"kvm_backup.list": lambda *a, **k: [], "kvm_backup.create": create}
    ret = _load_state(salt).backed_up("vm", "/b", compress=True)
    assert ret["result"] is True and got["compress"] is True
    assert ret["changes"]["backup"]["compression"] == "zstd"
