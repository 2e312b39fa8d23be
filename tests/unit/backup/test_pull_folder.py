"""The private folder of a pull backup: QEMU's ids from the running domain's
DAC label, the socket checked before it is connected to, and only folders of
ours removed after a killed run."""

import os
import socket

import pytest

from salt_kvm.backup import method_api
from salt_kvm.errors import SaltKvmError


class FakeDom:
    def __init__(self, label="+64055:+107"):
        self.label = label

    def XMLDesc(self, _flags):  # noqa: N802 - libvirt's name
        seclabel = (
            f"<seclabel type='dynamic' model='dac' relabel='yes'><label>{self.label}</label>"
            "</seclabel>"
            if self.label
            else ""
        )
        return f"<domain type='qemu'><name>vm</name>{seclabel}</domain>"

    def name(self):
        return "vm"


@pytest.mark.parametrize(
    "label, ids",
    [("+64055:+107", (64055, 107)), ("0:0", (0, 0)), ("qemu:kvm", None), ("", None)],
)
def test_qemu_ids_from_the_dac_label(label, ids):
    assert method_api._qemu_ids(FakeDom(label)) == ids


def test_only_a_socket_of_qemu_or_root_is_connected_to(tmp_path):
    dom = FakeDom(f"+{os.geteuid()}:+{os.getegid()}")
    with pytest.raises(SaltKvmError, match="made no NBD socket"):
        method_api._check_socket(dom, str(tmp_path / "nbd.sock"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "real.sock"))
    try:
        method_api._check_socket(dom, str(tmp_path / "real.sock"))
        (tmp_path / "nbd.sock").symlink_to(tmp_path / "real.sock")
        with pytest.raises(SaltKvmError, match="is not the NBD socket"):
            method_api._check_socket(dom, str(tmp_path / "nbd.sock"))
        (tmp_path / "file.sock").write_text("")
        with pytest.raises(SaltKvmError, match="is not the NBD socket"):
            method_api._check_socket(dom, str(tmp_path / "file.sock"))
    finally:
        listener.close()


def test_only_private_folders_of_ours_are_removed(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir(0o700)
    (ours / "vda.scratch").write_text("x")
    shared = tmp_path / "shared"
    shared.mkdir(0o755)
    link = tmp_path / "link"
    link.symlink_to(ours)
    assert method_api._remove_scratch(str(link), os.geteuid()) is False
    assert method_api._remove_scratch(str(shared), os.geteuid()) is False
    assert shared.exists() and ours.exists()
    other = os.geteuid() + 1 if os.geteuid() else None
    if other is not None:  # as root, a root-owned folder is always ours
        assert method_api._remove_scratch(str(ours), other) is False
    assert method_api._remove_scratch(str(ours), os.geteuid()) is True
    assert not ours.exists()
