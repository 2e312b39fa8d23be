"""Domain XML: the devices salt-kvm reads and rewrites, as lxml-backed objects."""

from __future__ import annotations

from lxml import etree

from salt_kvm.virt.xmlmodel import XMLFlag, XMLObject, XMLProperty, parse, tostring

# Our tag in <metadata>: marks the domains salt-kvm created and what from.
METADATA_NS = "urn:salt-kvm:instance:1"
METADATA_PREFIX = "saltkvm"
# Our second tag: the external disks whose volumes salt-kvm created (any domain).
DISKS_NS = "urn:salt-kvm:disks:1"
DISKS_PREFIX = "saltkvmdisks"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


class Disk(XMLObject):
    TAG = "disk"
    DEVICE_DISK = "disk"
    DEVICE_CDROM = "cdrom"

    type = XMLProperty("./@type")
    device = XMLProperty("./@device")
    driver_name = XMLProperty("./driver/@name")
    driver_type = XMLProperty("./driver/@type")
    driver_cache = XMLProperty("./driver/@cache")
    source_file = XMLProperty("./source/@file")
    source_dev = XMLProperty("./source/@dev")
    source_pool = XMLProperty("./source/@pool")
    source_volume = XMLProperty("./source/@volume")
    target_dev = XMLProperty("./target/@dev")
    target_bus = XMLProperty("./target/@bus")
    alias = XMLProperty("./alias/@name")
    serial = XMLProperty("./serial")
    readonly = XMLFlag("readonly")
    shareable = XMLFlag("shareable")
    # libvirt keeps aliases with this prefix (user aliases) across restarts.
    USER_ALIAS_PREFIX = "ua-"

    @property
    def name(self) -> str | None:
        """The name salt-kvm gave the disk (its user alias), else its target."""
        alias = self.alias or ""
        if alias.startswith(self.USER_ALIAS_PREFIX):
            return alias[len(self.USER_ALIAS_PREFIX) :]
        return self.target_dev

    @property
    def path(self) -> str | None:
        return self.source_file or self.source_dev

    @path.setter
    def path(self, value: str) -> None:
        """Point the disk at a file, dropping any pool/volume or backing chain."""
        for child in list(self.node):
            if child.tag in ("source", "backingStore"):
                self.node.remove(child)
        self.type = "file"
        self.source_file = value
        # The source goes right after <driver> as libvirt writes it (readability only).
        source = self.node.find("source")
        driver = self.node.find("driver")
        if driver is not None:
            driver.addnext(source)

    def set_block(self, dev: str) -> None:
        """Point the disk at a block device."""
        self.path = dev
        self.type = "block"
        self.source_file = None
        self.source_dev = dev
        source = self.node.find("source")
        driver = self.node.find("driver")
        if driver is not None:
            driver.addnext(source)

    def backing_paths(self) -> list[str]:
        """The files below this disk in a running guest's backing chain."""
        found = self.node.findall(".//backingStore/source")
        return [s.get("file") or s.get("dev") for s in found if s.get("file") or s.get("dev")]


class Interface(XMLObject):
    TAG = "interface"

    type = XMLProperty("./@type")
    mac = XMLProperty("./mac/@address")
    source_network = XMLProperty("./source/@network")
    source_bridge = XMLProperty("./source/@bridge")
    model = XMLProperty("./model/@type")
    target_dev = XMLProperty("./target/@dev")
    source_dev = XMLProperty("./source/@dev")  # direct (macvtap): the host interface
    source_mode = XMLProperty("./source/@mode")
    virtualport = XMLProperty("./virtualport/@type")
    mtu = XMLProperty("./mtu/@size", int)
    vlan_trunk = XMLProperty("./vlan/@trunk", bool)

    @property
    def vlans(self) -> list[int]:
        return [int(t.get("id")) for t in self.node.findall("vlan/tag") if t.get("id")]

    @vlans.setter
    def vlans(self, tags: list[int]) -> None:
        old = self.node.find("vlan")
        if old is not None:
            self.node.remove(old)
        if tags:
            vlan = etree.SubElement(self.node, "vlan")
            for tag in tags:
                etree.SubElement(vlan, "tag", id=str(tag))

    @property
    def source(self) -> str | None:
        """What the NIC is on: its network, bridge or host interface."""
        return self.source_network or self.source_bridge or self.source_dev


class Hostdev(XMLObject):
    """A host device given to the guest (``<hostdev mode='subsystem'>``)."""

    TAG = "hostdev"
    PCI = "pci"
    USB = "usb"

    type = XMLProperty("./@type")
    mode = XMLProperty("./@mode")
    managed = XMLProperty("./@managed", bool)
    # PCI: <source><address domain bus slot function/>; USB: vendor/product or bus/device.
    address_domain = XMLProperty("./source/address/@domain")
    address_bus = XMLProperty("./source/address/@bus")
    address_slot = XMLProperty("./source/address/@slot")
    address_function = XMLProperty("./source/address/@function")
    address_device = XMLProperty("./source/address/@device")
    vendor = XMLProperty("./source/vendor/@id")
    product = XMLProperty("./source/product/@id")


class Domain(XMLObject):
    """A domain definition; ``Domain(xml_string)`` or ``Domain.new(name)``."""

    TAG = "domain"

    type = XMLProperty("./@type")
    name = XMLProperty("./name")
    uuid = XMLProperty("./uuid")
    description = XMLProperty("./description")
    memory_kib = XMLProperty("./memory", int)
    current_memory_kib = XMLProperty("./currentMemory", int)
    vcpus = XMLProperty("./vcpu", int)

    def __init__(self, xml: str | bytes | etree._Element | None = None):
        if isinstance(xml, str | bytes):
            xml = parse(xml)
        super().__init__(xml)

    def _devices(self) -> etree._Element:
        devices = self.node.find("devices")
        if devices is None:
            devices = etree.SubElement(self.node, "devices")
        return devices

    @property
    def disks(self) -> list[Disk]:
        return [Disk(n) for n in self._devices().findall("disk")]

    @property
    def interfaces(self) -> list[Interface]:
        return [Interface(n) for n in self._devices().findall("interface")]

    @property
    def hostdevs(self) -> list[Hostdev]:
        return [Hostdev(n) for n in self._devices().findall("hostdev")]

    def remove_devices(self, tag: str) -> int:
        devices = self._devices()
        found = devices.findall(tag)
        for node in found:
            devices.remove(node)
        return len(found)

    def set_memory(self, mib: int) -> None:
        for tag in ("memory", "currentMemory"):
            node = self.node.find(tag)
            if node is None:
                node = etree.SubElement(self.node, tag)
            node.set("unit", "KiB")
            node.text = str(mib * 1024)

    def memory_mib(self) -> int | None:
        node = self.node.find("memory")
        if node is None or node.text is None:
            return None
        factor = {"KiB": 1, "k": 1, "MiB": 1024, "M": 1024, "GiB": 1024**2, "G": 1024**2}
        return int(node.text) * factor.get(node.get("unit", "KiB"), 1) // 1024

    # ---- salt-kvm metadata -------------------------------------------------
    def managed_info(self) -> dict[str, str | list[str]] | None:
        """The salt-kvm tag's fields, or ``None`` for a domain salt-kvm did not create.

        A field is text, or a list when it holds ``<item>`` children.
        """
        node = self.node.find(f"metadata/{{{METADATA_NS}}}instance")
        if node is None:
            return None
        info: dict[str, str | list[str]] = {}
        for child in node:
            items = child.findall(f"{{{METADATA_NS}}}item")
            key = etree.QName(child).localname
            info[key] = [i.text or "" for i in items] if len(child) else (child.text or "")
        return info

    def set_managed_info(self, info: dict[str, str | list[str]]) -> None:
        metadata = self.node.find("metadata")
        if metadata is None:
            metadata = etree.Element("metadata")
            # libvirt keeps <metadata> after <description>/<title>; order is cosmetic.
            self.node.insert(3, metadata)
        old = metadata.find(f"{{{METADATA_NS}}}instance")
        if old is not None:
            metadata.remove(old)
        metadata.append(metadata_element(info))

    def created_disks(self) -> dict[str, dict]:
        """Volume path -> ``{"name", "delete_with_domain"}`` for the external
        disks whose volumes salt-kvm created."""
        node = self.node.find(f"metadata/{{{DISKS_NS}}}disks")
        if node is None:
            return {}
        return {
            (v.text or ""): {
                "name": v.get("name"),
                "delete_with_domain": v.get("delete-with-domain") == "yes",
            }
            for v in node.findall(f"{{{DISKS_NS}}}volume")
        }

    def to_xml(self) -> str:
        return tostring(self.node)


def has_hostdevs(xml: str | Domain) -> bool:
    """The domain holds host devices (PCI/USB passthrough, or a NIC of type
    hostdev): it cannot be migrated, and a snapshot cannot capture the device."""
    dom = xml if isinstance(xml, Domain) else Domain(xml)
    devices = dom.node.find("devices")
    if devices is None:
        return False
    return devices.find("hostdev") is not None or any(i.type == "hostdev" for i in dom.interfaces)


def disks_metadata_element(records: dict[str, dict], namespaced: bool = True) -> etree._Element:
    """The created-disks tag; ``namespaced=False`` for ``virDomainSetMetadata``,
    which puts the element in the namespace itself."""
    ns = f"{{{DISKS_NS}}}" if namespaced else ""
    nsmap = {DISKS_PREFIX: DISKS_NS} if namespaced else None
    node = etree.Element(f"{ns}disks", nsmap=nsmap)
    for path, record in sorted(records.items()):
        vol = etree.SubElement(node, f"{ns}volume", name=record["name"])
        if record.get("delete_with_domain"):
            vol.set("delete-with-domain", "yes")
        vol.text = path
    return node


def metadata_element(info: dict[str, str | list[str]]) -> etree._Element:
    node = etree.Element(f"{{{METADATA_NS}}}instance", nsmap={METADATA_PREFIX: METADATA_NS})
    for key, value in info.items():
        child = etree.SubElement(node, f"{{{METADATA_NS}}}{key}")
        if isinstance(value, list | tuple):
            for item in value:
                etree.SubElement(child, f"{{{METADATA_NS}}}item").text = str(item)
        else:
            child.text = str(value)
    return node


def new_domain(
    name: str,
    virt_type: str,
    memory_mib: int,
    vcpus: int,
    disk_path: str,
    disk_format: str = "qcow2",
    networks: tuple[str, ...] = ("default",),
) -> Domain:
    """A minimal, modern x86_64 guest: virtio disk and NICs, serial console,
    guest-agent channel, no graphics. Used to define base domains from images."""
    dom = Domain(etree.Element("domain", type=virt_type))
    dom.name = name
    dom.set_memory(memory_mib)
    dom.vcpus = vcpus
    os_node = etree.SubElement(dom.node, "os")
    etree.SubElement(os_node, "type", arch="x86_64", machine="pc").text = "hvm"
    etree.SubElement(os_node, "boot", dev="hd")
    features = etree.SubElement(dom.node, "features")
    etree.SubElement(features, "acpi")
    etree.SubElement(features, "apic")
    etree.SubElement(dom.node, "on_poweroff").text = "destroy"
    etree.SubElement(dom.node, "on_reboot").text = "restart"
    etree.SubElement(dom.node, "on_crash").text = "destroy"
    devices = dom._devices()
    disk = Disk(etree.SubElement(devices, "disk", type="file", device="disk"))
    disk.driver_name = "qemu"
    disk.driver_type = disk_format
    disk.path = disk_path
    disk.target_dev = "vda"
    disk.target_bus = "virtio"
    for network in networks:
        iface = Interface(etree.SubElement(devices, "interface", type="network"))
        iface.source_network = network
        iface.model = "virtio"
    etree.SubElement(devices, "serial", type="pty")
    etree.SubElement(devices, "console", type="pty")
    channel = etree.SubElement(devices, "channel", type="unix")
    etree.SubElement(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    rng = etree.SubElement(devices, "rng", model="virtio")
    etree.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    return dom
