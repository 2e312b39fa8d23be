"""A clone's own NVRAM volume from a base's UEFI variables that are not a pool
volume (read here, streamed through libvirt): what is left when that fails."""

import libvirt
import pytest

from salt_kvm.virt import firmware


def test_a_failed_nvram_upload_leaves_no_volume(conn, pool, tmp_path):
    # libvirt's test driver has no virStorageVolUpload: the stream fails after
    # the volume was created, and the half-made volume must go.
    source = tmp_path / "base_VARS.fd"
    source.write_bytes(b"uefi variables" * 100)
    with pytest.raises(libvirt.libvirtError, match="virStorageVolUpload"):
        firmware.copy_nvram(conn, str(source), pool.name(), "vm1_VARS.fd")
    assert "vm1_VARS.fd" not in pool.listVolumes()


def test_an_unreadable_base_nvram_leaves_the_template_to_libvirt(conn, pool, tmp_path):
    assert firmware.copy_nvram(conn, str(tmp_path / "gone.fd"), pool.name(), "vm1_VARS.fd") is None
    assert "vm1_VARS.fd" not in pool.listVolumes()
