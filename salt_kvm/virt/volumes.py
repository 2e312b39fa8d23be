"""Storage volumes: what salt-kvm reads from a volume's definition."""

from __future__ import annotations

import libvirt
from lxml import etree


def volume_format(vol: libvirt.virStorageVol) -> str:
    fmt = etree.fromstring(vol.XMLDesc(0).encode()).find("target/format")
    return (fmt.get("type") if fmt is not None else None) or "raw"
