"""Apply a VM spec's sizing and devices to a clone's domain XML (pure XML work)."""

from __future__ import annotations

from lxml import etree

from salt_kvm.cloud.spec import NicSpec, VMSpec
from salt_kvm.virt.domain import Domain, Interface
from salt_kvm.virt.xmlmodel import find_or_create


def _set_vcpus(xml: Domain, spec: VMSpec) -> None:
    topo = spec.cpu_topology
    current = spec.cpus
    if topo is not None:
        maximum = topo.maxcpus
    elif current is not None:
        maximum = current
    else:
        return
    vcpu = find_or_create(xml.node, ["vcpu"])
    vcpu.text = str(maximum)
    vcpu.attrib.pop("current", None)
    if current is not None and current < maximum:
        vcpu.set("current", str(current))
    cpu = xml.node.find("cpu")
    if topo is not None:
        cpu = find_or_create(xml.node, ["cpu"])
        topology = find_or_create(cpu, ["topology"])
        topology.attrib.clear()
        topology.set("sockets", str(topo.sockets))
        topology.set("dies", "1")
        topology.set("cores", str(topo.cores))
        topology.set("threads", str(topo.threads))
    elif cpu is not None and cpu.find("topology") is not None:
        # The base's topology would contradict the new vCPU count.
        cpu.remove(cpu.find("topology"))


def _set_numa(xml: Domain, spec: VMSpec) -> None:
    if not spec.numa:
        return
    cpu = find_or_create(xml.node, ["cpu"])
    old = cpu.find("numa")
    if old is not None:
        cpu.remove(old)
    numa = etree.SubElement(cpu, "numa")
    total = spec.memory_mib or xml.memory_mib() or 1024
    fixed = sum(c.memory_mib or 0 for c in spec.numa)
    flexible = [c for c in spec.numa if c.memory_mib is None]
    # spec validation guarantees room when cells give sizes; the base's memory
    # is only used when no cell does (then it is split evenly).
    share = max(1, (total - fixed) // len(flexible)) if flexible else 0
    for cell in spec.numa:
        etree.SubElement(
            numa,
            "cell",
            id=str(cell.id),
            cpus=cell.cpus,
            memory=str(share if cell.memory_mib is None else cell.memory_mib),
            unit="MiB",
        )


def _use_vhost(iface: Interface) -> None:
    """vhost-net is a virtio backend: other models keep QEMU's userspace one."""
    if iface.model == "virtio":
        find_or_create(iface.node, ["driver"]).set("name", "vhost")


def _nic_element(nic: NicSpec, vhost: bool) -> etree._Element:
    iface = Interface(etree.Element("interface", type=nic.kind))
    if nic.mac:
        iface.mac = nic.mac
    if nic.network:
        iface.source_network = nic.network
    elif nic.bridge:
        iface.source_bridge = nic.bridge
    else:
        iface.source_dev = nic.source
        iface.source_mode = nic.mode
    if nic.virtualport:
        iface.virtualport = nic.virtualport
    if nic.vlans:
        iface.vlans = nic.vlans
        iface.vlan_trunk = True if nic.trunk else None
    iface.model = nic.model
    iface.mtu = nic.mtu
    if vhost:
        _use_vhost(iface)
    return iface.node


def _set_nics(xml: Domain, spec: VMSpec) -> None:
    if spec.nics is not None:
        xml.remove_devices("interface")
        devices = xml.node.find("devices")
        for nic in spec.nics:
            devices.append(_nic_element(nic, spec.vhost))
    elif spec.vhost:
        for iface in xml.interfaces:
            _use_vhost(iface)


def apply(xml: Domain, spec: VMSpec) -> Domain:
    _set_vcpus(xml, spec)
    if spec.memory_mib is not None:
        xml.set_memory(spec.memory_mib)
    _set_numa(xml, spec)
    if spec.description is not None:
        xml.description = spec.description
    if spec.cpu_shares is not None:
        find_or_create(xml.node, ["cputune", "shares"]).text = str(spec.cpu_shares)
    if spec.keymap is not None:
        for graphics in xml.node.findall("devices/graphics"):
            graphics.set("keymap", spec.keymap)
    _set_nics(xml, spec)
    return xml
