"""NoCloud seeds: first-boot data handed to cloud-init on a small ISO.

The ISO (volume label ``cidata`` with ``user-data`` and ``meta-data``) is built
in Python with pycdlib, uploaded into the pool through a libvirt stream (so it
works over ``qemu+ssh://`` too), stored with mode 0600, attached as a cdrom and
ejected and deleted once the guest has used it.
"""

from __future__ import annotations

import io
import uuid

import libvirt
import pycdlib
import yaml
from lxml import etree

from salt_kvm.virt import chains, pools
from salt_kvm.virt.domain import Disk, Domain

LABEL = "cidata"


def iso(files: dict[str, bytes]) -> bytes:
    """An ISO 9660 image (Joliet + Rock Ridge names) holding ``files``."""
    image = pycdlib.PyCdlib()
    image.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=LABEL)
    for index, (name, data) in enumerate(sorted(files.items())):
        image.add_fp(
            io.BytesIO(data),
            len(data),
            f"/F{index}.;1",
            rr_name=name,
            joliet_path=f"/{name}",
        )
    out = io.BytesIO()
    image.write_fp(out)
    image.close()
    return out.getvalue()


def nocloud(
    name: str,
    user_data: dict | bytes,
    network_config: dict | None = None,
    meta_data: dict | None = None,
) -> bytes:
    """``user_data``: a cloud-config mapping, or ready user-data bytes (what
    ``cloudinit.user_data`` builds). ``meta_data`` adds to the meta-data; the
    instance-id is always new."""
    meta = {"local-hostname": name.split(".", 1)[0], **(meta_data or {})}
    meta["instance-id"] = f"{name}-{uuid.uuid4()}"
    if isinstance(user_data, dict):
        user_data = ("#cloud-config\n" + yaml.safe_dump(user_data, sort_keys=False)).encode()
    files = {"meta-data": yaml.safe_dump(meta).encode(), "user-data": user_data}
    if network_config is not None:
        files["network-config"] = yaml.safe_dump(network_config).encode()
    return iso(files)


def upload(
    conn: libvirt.virConnect, pool_name: str, volume: str, data: bytes
) -> libvirt.virStorageVol:
    """Create ``volume`` (mode 0600) in the pool and stream ``data`` into it."""
    return pools.upload(
        conn,
        pool_name,
        volume,
        data,
        lambda vol: chains.delete_volume(conn, vol.path(), "seed upload cleanup"),
    )


def _free_target(xml: Domain, bus: str) -> str:
    used = {d.target_dev for d in xml.disks}
    prefix = "hd" if bus == "ide" else "sd"
    for letter in "cdefghijklmnopqrstuvwxyz":
        if f"{prefix}{letter}" not in used:
            return f"{prefix}{letter}"
    raise ValueError("no free cdrom target")


def attach(xml: Domain, path: str) -> str:
    """Add a read-only cdrom with ``path``; returns its target device name."""
    machine = xml.node.findtext("os/type") and xml.node.find("os/type").get("machine", "")
    bus = "sata" if machine and "q35" in machine else "ide"
    disk = Disk(etree.SubElement(xml._devices(), "disk", type="file", device="cdrom"))
    disk.driver_name = "qemu"
    disk.driver_type = "raw"
    disk.path = path
    disk.target_dev = _free_target(xml, bus)
    disk.target_bus = bus
    etree.SubElement(disk.node, "readonly")
    return disk.target_dev


def eject(dom: libvirt.virDomain, target: str) -> None:
    """Remove the seed's medium from the running guest and its definition."""
    for disk in Domain(dom.XMLDesc(0)).disks:
        if disk.target_dev == target and disk.device == Disk.DEVICE_CDROM:
            source = disk.node.find("source")
            if source is not None:
                disk.node.remove(source)
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
            if dom.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            device = etree.tostring(disk.node, encoding="unicode")
            try:
                dom.updateDeviceFlags(device, flags)
            except libvirt.libvirtError as exc:
                if "tray" not in str(exc):
                    raise
                # The guest still holds the tray locked (a busy guest acts late
                # on the eject request). Its seed was read (the minion started,
                # or the guest got its address): the medium goes regardless.
                dom.updateDeviceFlags(device, flags | libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE)
