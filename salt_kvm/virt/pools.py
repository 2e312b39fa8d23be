"""Storage pools: the ``<pool>`` document salt-kvm defines and reads."""

from __future__ import annotations

from salt_kvm.virt.xmlmodel import XMLObject, XMLProperty


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
