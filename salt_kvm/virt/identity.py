"""A copy of a domain definition gets its own identity: name, UUID, MACs, NVRAM, consoles.

Clones, restores and takeovers all go through ``prepare_identity``, so none of them can
leave a copy sharing something with its origin. A restore under the domain's own name
(the same guest back, after its host or its disks were lost) keeps its UUID and MACs
instead: ``identity_clashes`` says whether another domain here has them.
"""

from __future__ import annotations

import random

import libvirt

from salt_kvm.errors import SaltKvmError
from salt_kvm.virt.domain import Disk, Domain

MAC_PREFIX = "52:54:00"  # QEMU's locally administered range, as libvirt uses


def mac_owners(conn: libvirt.virConnect) -> dict[str, str]:
    """Every MAC address (lower case) of the domains on this host, with its domain's name."""
    owners: dict[str, str] = {}
    for dom in conn.listAllDomains(0):
        try:
            xml = Domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        except libvirt.libvirtError:
            continue  # undefined since the listing
        for iface in xml.interfaces:
            if iface.mac:
                owners.setdefault(iface.mac.lower(), dom.name())
    return owners


def used_macs(conn: libvirt.virConnect) -> set[str]:
    return set(mac_owners(conn))


def identity_clashes(conn: libvirt.virConnect, xml: Domain) -> list[str]:
    """What of ``xml``'s UUID and MACs a domain of another name on this host has."""
    found = []
    if xml.uuid:
        try:
            other = conn.lookupByUUIDString(xml.uuid).name()
        except libvirt.libvirtError:
            other = None
        if other is not None and other != xml.name:
            found.append(f"UUID {xml.uuid} is {other}'s")
    owners = mac_owners(conn)
    for iface in xml.interfaces:
        mac = (iface.mac or "").lower()
        if mac in owners and owners[mac] != xml.name:
            found.append(f"MAC {mac} is {owners[mac]}'s")
    return found


def new_mac(taken: set[str], rng: random.Random | None = None) -> str:
    rng = rng or random.SystemRandom()
    for _ in range(1000):
        mac = MAC_PREFIX + "".join(f":{rng.randrange(256):02x}" for _ in range(3))
        if mac not in taken:
            taken.add(mac)
            return mac
    raise SaltKvmError("could not find a free MAC address in 52:54:00:xx:xx:xx")


def prepare_identity(
    xml: Domain, name: str, virt_type: str, taken_macs: set[str], keep: bool = False
) -> Domain:
    """Give the copy of the base definition its own identity (pure XML work).

    With ``keep`` (the same guest brought back under its own name) the UUID and
    the MAC addresses stay: DHCP reservations, netplan matches and firewall rules
    keyed on a MAC still hold. The caller makes sure nothing else here has them
    (``identity_clashes``). Everything else is made the copy's own either way."""
    xml.node.attrib.pop("id", None)
    xml.type = virt_type
    xml.name = name
    if not keep:
        xml.uuid = None  # libvirt makes a new one
    metadata = xml.node.find("metadata")
    if metadata is not None:
        xml.node.remove(metadata)
    for iface in xml.interfaces:
        if not keep or not iface.mac:
            iface.mac = new_mac(taken_macs)
        iface.target_dev = None
    _own_nvram(xml)
    devices = xml.node.find("devices")
    if devices is None:
        return xml
    for graphics in devices.findall("graphics"):
        for attr in ("port", "tlsPort", "websocket"):
            graphics.attrib.pop(attr, None)
        graphics.set("autoport", "yes")
    for chardev in (
        devices.findall("serial") + devices.findall("console") + devices.findall("channel")
    ):
        source = chardev.find("source")
        if source is not None and chardev.get("type") in ("pty", "unix"):
            # libvirt allocates a new pty / agent socket path per domain.
            source.attrib.pop("path", None)
            if not source.attrib:
                chardev.remove(source)
    for disk in xml.disks:
        if disk.device == Disk.DEVICE_CDROM:
            source = disk.node.find("source")
            if source is not None:
                disk.node.remove(source)  # eject: a base's ISO is not the clone's
    return xml


def _own_nvram(xml: Domain) -> None:
    """A copy never shares its origin's UEFI variables: the origin's NVRAM file
    (path or ``<source>``) is dropped, so libvirt makes the copy its own from
    the template; undefining the copy (which deletes its NVRAM) then leaves the
    origin's alone."""
    nvram = xml.node.find("os/nvram")
    if nvram is None:
        return
    keep = {k: v for k, v in nvram.attrib.items() if k in ("template", "templateFormat")}
    if not keep:
        nvram.getparent().remove(nvram)
        return
    nvram.getparent().replace(nvram, nvram.makeelement("nvram", keep))
