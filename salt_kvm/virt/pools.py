"""Storage pools: the ``<pool>`` document salt-kvm defines and reads, and a
refresh that waits for another caller's volume build."""

from __future__ import annotations

import time
from collections.abc import Callable

import libvirt

from salt_kvm.errors import ConflictError
from salt_kvm.virt.volumes import Volume
from salt_kvm.virt.xmlmodel import XMLObject, XMLProperty

# libvirt refuses a pool refresh while a volume of that pool is still being
# built (virStorageVolCreateXML/CreateXMLFrom: an overlay, a full clone, an
# image copied into the cache), whoever builds it.
BUSY = "has asynchronous jobs running"
REFRESH_TIMEOUT = 600  # a full copy of a large disk by another caller


def refresh(pool: libvirt.virStoragePool, timeout: float = REFRESH_TIMEOUT) -> None:
    """``pool.refresh(0)`` (to see files copied in since libvirt last looked),
    waiting while another caller (a parallel salt-cloud create, a map) builds a
    volume in the pool; any other error at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pool.refresh(0)
            return
        except libvirt.libvirtError as exc:
            if BUSY not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise ConflictError(
                    f"pool {pool.name()!r} is still building a volume after {timeout:g} s "
                    f"(another caller's create or copy); libvirt refreshes it only after that"
                ) from exc
        time.sleep(0.5)


class Pool(XMLObject):
    """A storage pool definition (``storagePoolDefineXML``) or libvirt's description of one."""

    TAG = "pool"
    TYPE_DIR = "dir"

    type = XMLProperty("./@type")
    name = XMLProperty("./name")
    uuid = XMLProperty("./uuid")
    target_path = XMLProperty("./target/path")

    @classmethod
    def new_dir(cls, name: str, path: str) -> Pool:
        """A ``dir`` pool on ``path`` (the only kind salt-kvm defines)."""
        pool = cls()
        pool.type = cls.TYPE_DIR
        pool.name = name
        pool.target_path = path
        return pool


def upload(
    conn: libvirt.virConnect,
    pool_name: str,
    volume: str,
    data: bytes,
    discard: Callable[[libvirt.virStorageVol], object],
) -> libvirt.virStorageVol:
    """Create the raw ``volume`` (mode 0600) in the pool and stream ``data`` into
    it through libvirt (works for remote hypervisors); on failure ``discard``
    removes the half-written volume and the error goes on."""
    pool = conn.storagePoolLookupByName(pool_name)
    vol = pool.createXML(Volume.new(volume, len(data), Volume.FORMAT_RAW).to_xml(), 0)
    try:
        stream = conn.newStream(0)
        vol.upload(stream, 0, len(data), 0)
        stream.send(data)
        stream.finish()
    except libvirt.libvirtError:
        discard(vol)
        raise
    return vol
