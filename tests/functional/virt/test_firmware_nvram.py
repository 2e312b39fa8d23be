"""A clone's own NVRAM volume from a base's UEFI variables that are not a pool
volume (read here, streamed through libvirt): what is left when that fails."""

import libvirt
import pytest

from salt_kvm.cloud import machine
from salt_kvm.cloud.features import GuestFeatures
from salt_kvm.virt import chains, firmware
from salt_kvm.virt.rollback import Rollback


def test_a_failed_nvram_upload_leaves_no_volume_through_the_delete_gate(
    conn, pool, tmp_path, monkeypatch
):
    # libvirt's test driver has no virStorageVolUpload: the stream fails after
    # the volume was created, and the half-made volume must go, through the
    # delete gate as every volume salt-kvm removes.
    source = tmp_path / "base_VARS.fd"
    source.write_bytes(b"uefi variables" * 100)
    gated = []
    real_delete = chains.delete_volume
    monkeypatch.setattr(
        chains, "delete_volume", lambda c, path, why: gated.append(why) or real_delete(c, path, why)
    )
    plan = machine.MachinePlan(
        GuestFeatures(),
        efi=True,
        nvram_pool=pool.name(),
        nvram_volume="vm1_VARS.fd",
        base_nvram=str(source),
    )
    with pytest.raises(libvirt.libvirtError, match="virStorageVolUpload"):
        machine.make(conn, plan, Rollback())
    assert "vm1_VARS.fd" not in pool.listVolumes()
    assert gated == ["NVRAM upload cleanup"]
    assert not plan.made_nvram


def test_an_unreadable_base_nvram_leaves_the_template_to_libvirt(conn, pool, tmp_path):
    gone = str(tmp_path / "gone.fd")
    assert firmware.copy_nvram(conn, gone, pool.name(), "vm1_VARS.fd", lambda vol: None) is None
    assert "vm1_VARS.fd" not in pool.listVolumes()
