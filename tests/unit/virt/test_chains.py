"""Reading backing chains from qcow2 headers the way QEMU resolves them:
relative names against the overlay's folder, symlinks resolved, raw is data."""

import os
import subprocess

import libvirt
import pytest

from salt_kvm.virt import chains
from tests.images import qcow2


class NoPools:
    """A connection that knows no volume: chains come from the files alone."""

    def storageVolLookupByPath(self, path):  # noqa: N802 - libvirt's name
        raise libvirt.libvirtError("no storage vol with matching path")


@pytest.fixture(autouse=True)
def _qemu_img():
    if subprocess.run(["which", "qemu-img"], capture_output=True).returncode:
        pytest.skip("qemu-img is not installed")


def test_whole_chain_with_relative_names_and_symlinks(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = qcow2(tmp_path / "a" / "base.qcow2")
    os.symlink(tmp_path / "a", tmp_path / "link")
    mid = qcow2(tmp_path / "b" / "mid.qcow2", "../link/base.qcow2")
    top = qcow2(tmp_path / "b" / "top.qcow2", "mid.qcow2")
    assert chains.chain_below(NoPools(), top, "qcow2", True) == {
        os.path.realpath(mid),
        os.path.realpath(base),
    }


def test_raw_declared_has_no_chain_and_raw_backing_ends_it(tmp_path):
    base = qcow2(tmp_path / "base.qcow2")
    disguised = qcow2(tmp_path / "guest-raw.img", str(base))
    assert chains.chain_below(NoPools(), disguised, "raw", True) == set()
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"QFI\xfb" + b"\0" * 4096)  # raw data that looks like qcow2
    top = qcow2(tmp_path / "top.qcow2", str(raw), backing_fmt="raw")
    assert chains.chain_below(NoPools(), top, None, True) == {str(raw)}


def test_a_loop_in_the_chain_ends(tmp_path):
    a = qcow2(tmp_path / "a.qcow2", "b.qcow2")
    qcow2(tmp_path / "b.qcow2", "a.qcow2")
    assert chains.chain_below(NoPools(), a, "qcow2", True) == {str(tmp_path / "b.qcow2")}


def test_missing_or_unreadable_files_have_no_chain(tmp_path):
    assert chains.chain_below(NoPools(), str(tmp_path / "nope.qcow2"), None, True) == set()
    (tmp_path / "short").write_bytes(b"QFI\xfb")
    assert chains.chain_below(NoPools(), str(tmp_path / "short"), None, True) == set()


def test_blocking_ignores_what_goes_together_and_the_leaving_domain():
    dep = chains.Dependent
    found = chains.Dependents(
        {
            "/p/base.qcow2": [dep("/p/a.qcow2"), dep("/p/a.qcow2", "a", "vda")],
            "/p/a.qcow2": [dep("/p/b.qcow2"), dep("/p/a.qcow2", "a", "vda", False)],
        },
        local=False,
    )
    assert found.blocking(["/p/base.qcow2", "/p/a.qcow2"], domains=("a",)) == {
        "/p/a.qcow2": [dep("/p/b.qcow2")]
    }
    doomed, kept = found.deletable(["/p/base.qcow2", "/p/a.qcow2"], domains=("a",))
    assert doomed == [] and set(kept) == {"/p/a.qcow2", "/p/base.qcow2"}
    assert (
        str(dep("/p/a.qcow2", "a", "vda"))
        == "domain 'a' (backing chain of its disk vda: /p/a.qcow2)"
    )


def test_a_domains_own_snapshot_overlays_do_not_block_its_snapshot_operations():
    dep = chains.Dependent
    found = chains.Dependents(
        {
            "/p/a.s1.qcow2": [
                dep("/p/a.s2.qcow2"),
                dep("/p/b.qcow2"),
                dep("/p/a.s2.qcow2", "a", "vda"),
            ]
        },
        local=False,
        files_of={"a": {"/p/a.s2.qcow2", "/p/a.s1.qcow2", "/p/a.qcow2"}},
    )
    assert found.blocking(["/p/a.s1.qcow2"], disks=(("a", "vda"),), chains_of=("a",)) == {
        "/p/a.s1.qcow2": [dep("/p/b.qcow2")]
    }


def test_json_and_file_names_and_external_data_files_count(tmp_path):
    base = qcow2(tmp_path / "base.qcow2")
    via_json = qcow2(
        tmp_path / "j.qcow2",
        'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "base.qcow2"}}',
    )
    assert chains.chain_below(NoPools(), via_json, "qcow2", True) == {base}
    via_file = qcow2(tmp_path / "f.qcow2", f"file:{base}")
    assert chains.chain_below(NoPools(), via_file, "qcow2", True) == {base}
    data = tmp_path / "data.raw"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"data_file={data}",
            str(tmp_path / "d.qcow2"),
            "64M",
        ],
        check=True,
    )
    assert chains.chain_below(NoPools(), str(tmp_path / "d.qcow2"), "qcow2", True) == {str(data)}


def test_a_second_name_of_a_file_is_the_same_file(tmp_path):
    base = qcow2(tmp_path / "base.qcow2")
    os.link(base, tmp_path / "other-name.qcow2")
    assert chains._key(base, True) == chains._key(str(tmp_path / "other-name.qcow2"), True)
    assert chains._key(base, True) != chains._key(str(tmp_path / "missing"), True)
