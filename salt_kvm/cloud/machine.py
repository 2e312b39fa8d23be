"""A new guest's machine: firmware (BIOS or UEFI, secure boot), TPM and console.

``plan`` checks the profile's ``GuestFeatures`` against the host and the pool
and makes nothing; ``make`` copies a UEFI base's variables into the guest's
own NVRAM file (before the domain is defined, with its undo); ``apply`` edits
the clone's XML. The console's password is in that XML only.
"""

from __future__ import annotations

from dataclasses import dataclass

import libvirt

from salt_kvm.cloud import features
from salt_kvm.cloud.features import GuestFeatures
from salt_kvm.errors import ConflictError
from salt_kvm.virt import chains, firmware, graphics
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.pools import Pool
from salt_kvm.virt.rollback import Rollback


@dataclass
class MachinePlan:
    features: GuestFeatures
    efi: bool
    # UEFI: the guest's own variables file in its pool, and the base's to copy.
    nvram: str | None = None
    nvram_pool: str | None = None
    nvram_volume: str | None = None
    base_nvram: str | None = None
    made_nvram: bool = False


def plan(
    conn: libvirt.virConnect,
    spec_features: GuestFeatures,
    name: str,
    base_xml: Domain,
    virt_type: str,
    pool_name: str,
) -> MachinePlan:
    """Check what the profile asks against the host (its domain capabilities)
    and the pool; nothing is made."""
    wanted = spec_features.firmware
    base_efi = firmware.uses_efi(base_xml)
    efi = wanted == features.FIRMWARE_EFI or (wanted is None and base_efi)
    firmware.check_host(
        conn,
        base_xml,
        virt_type,
        efi=efi,
        secure_boot=spec_features.secure_boot,
        tpm=spec_features.tpm,
        graphics=spec_features.graphics,
    )
    result = MachinePlan(spec_features, efi)
    if not efi:
        return result
    pool = conn.storagePoolLookupByName(pool_name)
    volume = firmware.nvram_volume_name(name)
    if volume in pool.listVolumes():
        raise ConflictError(
            f"volume {volume!r} already exists in pool {pool_name!r}; "
            "salt-kvm will not overwrite it (the guest's UEFI variables)"
        )
    folder = Pool(pool.XMLDesc(0)).target_path
    result.nvram = f"{folder.rstrip('/')}/{volume}"
    result.nvram_pool, result.nvram_volume = pool_name, volume
    result.base_nvram = firmware.nvram_path(base_xml) if base_efi else None
    return result


def make(conn: libvirt.virConnect, machine: MachinePlan, rollback: Rollback) -> None:
    """A UEFI base's variables (its boot entries) copied into the guest's own
    file; without one, libvirt makes the file from the firmware's template at
    the first start (and deletes it with the domain)."""
    if not machine.base_nvram or not machine.nvram_pool or not machine.nvram_volume:
        return
    rollback.intend("volume", pool=machine.nvram_pool, name=machine.nvram_volume)
    vol = firmware.copy_nvram(
        conn,
        machine.base_nvram,
        machine.nvram_pool,
        machine.nvram_volume,
        lambda vol: chains.delete_volume(conn, vol.path(), "NVRAM upload cleanup"),
    )
    if vol is not None:
        machine.nvram = vol.path()
        machine.made_nvram = True
        chains.delete_on_rollback(rollback, conn, machine.nvram, "NVRAM")


def apply(xml: Domain, machine: MachinePlan) -> None:
    """The clone's firmware, TPM and console (pure XML work)."""
    wanted = machine.features
    if machine.efi:
        if wanted.secure_boot:
            firmware.to_q35(xml)
        assert machine.nvram is not None  # plan: every UEFI guest has its file
        firmware.set_efi(xml, wanted.secure_boot, machine.nvram)
    elif firmware.uses_efi(xml):
        firmware.set_bios(xml)
    if wanted.tpm:
        firmware.add_tpm(xml)
    consoles = graphics.set_consoles(xml, wanted.graphics, wanted.graphics_listen)
    if consoles:
        firmware.ensure_vga(xml)


def shown(xml: Domain) -> dict:
    """What ``show_instance`` says of the machine: never a console's password
    (``xml`` is read without the secure flag, it has none)."""
    features_node = xml.node.find("os/firmware")
    secure = features_node is not None and any(
        f.get("name") == "secure-boot" and f.get("enabled") == "yes"
        for f in features_node.findall("feature")
    )
    loader = xml.node.find("os/loader")
    secure = secure or (loader is not None and loader.get("secure") == "yes")
    consoles = []
    for node in xml.node.findall("devices/graphics"):
        if node.get("type") not in graphics.CONSOLE_TYPES:
            continue
        listen = node.find("listen")
        consoles.append(
            {
                "type": node.get("type"),
                "address": (listen.get("address") if listen is not None else None)
                or node.get("listen"),
                "port": int(node.get("port")) if (node.get("port") or "-1") != "-1" else None,
            }
        )
    return {
        "firmware": features.FIRMWARE_EFI if firmware.uses_efi(xml) else features.FIRMWARE_BIOS,
        "secure_boot": secure,
        "tpm": xml.node.find("devices/tpm") is not None,
        "consoles": consoles,
    }
