"""sizing.apply: a VMSpec's sizing and devices written into a clone's domain XML."""

import pytest
from lxml import etree

from salt_kvm.cloud import sizing
from salt_kvm.cloud.spec import build_spec
from salt_kvm.virt.domain import Domain, new_domain

MINIMAL = {"name": "vm1", "base_domain": "base", "password": "pw"}
MAC = "52:54:00:12:34:56"


def base(graphics: int = 0) -> Domain:
    dom = new_domain("base", "qemu", 1024, 1, "/x.qcow2", networks=("default",))
    for _ in range(graphics):
        etree.SubElement(dom.node.find("devices"), "graphics", type="vnc")
    return dom


def apply(dom: Domain | None = None, **profile) -> etree._Element:
    """Apply a spec built from ``profile`` and return the re-parsed domain element."""
    dom = dom if dom is not None else base()
    result = sizing.apply(dom, build_spec({**MINIMAL, **profile}))
    assert result is dom
    return Domain(dom.to_xml()).node


def cells(node: etree._Element) -> list[dict]:
    return [dict(c.attrib) for c in node.findall("cpu/numa/cell")]


def interfaces(node: etree._Element) -> list[etree._Element]:
    return node.findall("devices/interface")


# ---- nothing asked, nothing changed -------------------------------------------


def test_minimal_spec_leaves_the_base_sizing_alone():
    node = apply()
    assert node.find("vcpu").text == "1"
    assert node.find("vcpu").get("current") is None
    assert node.find("memory").text == str(1024 * 1024)
    assert node.find("cpu") is None
    assert node.find("cputune") is None
    assert node.find("description") is None
    [iface] = interfaces(node)
    assert iface.get("type") == "network"
    assert iface.find("source").get("network") == "default"
    assert iface.find("driver") is None


# ---- vCPUs and topology -------------------------------------------------------


def test_cpus_alone_set_vcpu_without_current():
    node = apply(cpus=4)
    assert node.find("vcpu").text == "4"
    assert node.find("vcpu").get("current") is None
    assert node.find("cpu") is None


def test_cpus_alone_drop_a_base_topology_that_would_contradict_them():
    dom = base()
    cpu = etree.SubElement(dom.node, "cpu", mode="host-passthrough")
    etree.SubElement(cpu, "topology", sockets="1", dies="1", cores="1", threads="1")
    node = apply(dom, cpus=4)
    assert node.find("vcpu").text == "4"
    assert node.find("cpu").get("mode") == "host-passthrough"
    assert node.find("cpu/topology") is None


def test_topology_with_fewer_cpus_sets_current():
    node = apply(cpus=2, cpu_options="cores=2,threads=1,sockets=2,maxcpus=4")
    vcpu = node.find("vcpu")
    assert vcpu.text == "4"
    assert vcpu.get("current") == "2"
    topology = node.find("cpu/topology")
    assert dict(topology.attrib) == {"sockets": "2", "dies": "1", "cores": "2", "threads": "1"}


def test_topology_without_cpus_uses_maxcpus():
    node = apply(cpu_options="sockets=1,cores=2,threads=2")
    assert node.find("vcpu").text == "4"
    assert node.find("vcpu").get("current") is None
    topology = node.find("cpu/topology")
    assert topology.get("sockets") == "1"
    assert topology.get("cores") == "2"
    assert topology.get("threads") == "2"


def test_topology_replaces_base_topology_and_stale_current():
    dom = base()
    dom.node.find("vcpu").set("current", "1")
    cpu = etree.SubElement(dom.node, "cpu", mode="host-model")
    etree.SubElement(cpu, "topology", sockets="1", clusters="2", cores="1", threads="1")
    node = apply(dom, cpus=4, cpu_options="sockets=2,cores=2")
    assert node.find("vcpu").text == "4"
    assert node.find("vcpu").get("current") is None
    assert node.find("cpu").get("mode") == "host-model"
    [topology] = node.findall("cpu/topology")
    assert dict(topology.attrib) == {"sockets": "2", "dies": "1", "cores": "2", "threads": "1"}


# ---- memory and NUMA ----------------------------------------------------------


@pytest.mark.parametrize("memory,kib", [(2048, 2097152), ("2GB", 2097152), ("1.5G", 1572864)])
def test_memory_in_kib(memory, kib):
    node = apply(memory=memory)
    for tag in ("memory", "currentMemory"):
        assert node.find(tag).get("unit") == "KiB"
        assert int(node.find(tag).text) == kib


def test_numa_cells_split_the_memory_evenly():
    node = apply(cpus=4, memory=2048, numa="node,nodeid=0,cpus=0-1 node,nodeid=1,cpus=2,3")
    assert cells(node) == [
        {"id": "0", "cpus": "0-1", "memory": "1024", "unit": "MiB"},
        {"id": "1", "cpus": "2,3", "memory": "1024", "unit": "MiB"},
    ]


def test_numa_cells_split_the_base_memory_when_the_profile_has_none():
    node = apply(cpus=4, numa="node,cpus=0-1 node,cpus=2-3")
    assert node.find("memory").text == str(1024 * 1024)
    assert [(c["id"], c["memory"]) for c in cells(node)] == [("0", "512"), ("1", "512")]


def test_numa_fixed_cell_memory_and_the_rest_shared():
    node = apply(
        cpus=3,
        memory="4G",
        numa="node,nodeid=0,cpus=0,mem=2G node,nodeid=1,cpus=1 node,nodeid=2,cpus=2",
    )
    assert [c["memory"] for c in cells(node)] == ["2048", "1024", "1024"]
    assert {c["unit"] for c in cells(node)} == {"MiB"}


def test_numa_with_topology():
    node = apply(
        cpus=2,
        cpu_options="sockets=2,cores=2",
        memory=2048,
        numa="node,nodeid=0,cpus=0-1 node,nodeid=1,cpus=2-3",
    )
    assert node.find("vcpu").text == "4"
    assert node.find("cpu/topology").get("sockets") == "2"
    assert [c["cpus"] for c in cells(node)] == ["0-1", "2-3"]


def test_numa_replaces_the_base_numa():
    dom = base()
    numa = etree.SubElement(etree.SubElement(dom.node, "cpu"), "numa")
    etree.SubElement(numa, "cell", id="0", cpus="0", memory="1048576", unit="KiB")
    node = apply(dom, cpus=2, numa="node,nodeid=0,cpus=0 node,nodeid=1,cpus=1")
    assert len(node.findall("cpu/numa")) == 1
    assert [(c["id"], c["memory"], c["unit"]) for c in cells(node)] == [
        ("0", "512", "MiB"),
        ("1", "512", "MiB"),
    ]


@pytest.mark.parametrize(
    "profile",
    [
        # no profile memory: the base's 1024 MiB minus a 2 GiB cell -> -1024
        {"cpus": 2, "numa": "node,cpus=0,mem=2G node,cpus=1"},
        # fixed cells use all of memory -> the other cell gets 0
        {"cpus": 2, "memory": 2048, "numa": "node,cpus=0,mem=2G node,cpus=1"},
    ],
    ids=["negative", "zero"],
)
def test_numa_never_writes_an_empty_or_negative_cell(profile):
    try:
        node = apply(**profile)
    except ValueError:
        return  # a SpecError (a ValueError) refusing the layout would be fine too
    assert all(int(c["memory"]) > 0 for c in cells(node)), cells(node)


def test_numa_cells_do_not_exceed_the_domain_memory():
    try:
        node = apply(cpus=2, memory=2048, numa="node,cpus=0,mem=512K node,cpus=1")
    except ValueError:
        return
    assert sum(int(c["memory"]) for c in cells(node)) <= 2048, cells(node)


# ---- description, cputune, graphics -------------------------------------------


@pytest.mark.parametrize("key", ["description", "desc"])
def test_description(key):
    assert apply(**{key: "web server"}).find("description").text == "web server"


def test_description_replaces_the_base_one():
    dom = base()
    dom.description = "the base"
    node = apply(dom, description="clone")
    assert [d.text for d in node.findall("description")] == ["clone"]


def test_cpuunits_become_cputune_shares():
    node = apply(cpuunits=512)
    assert node.find("cputune/shares").text == "512"


def test_cpuunits_keep_other_cputune_settings():
    dom = base()
    cputune = etree.SubElement(dom.node, "cputune")
    etree.SubElement(cputune, "period").text = "100000"
    etree.SubElement(cputune, "shares").text = "2048"
    node = apply(dom, cpuunits=256)
    assert node.find("cputune/period").text == "100000"
    assert [s.text for s in node.findall("cputune/shares")] == ["256"]


def test_keymap_on_every_graphics():
    node = apply(base(graphics=2), keymap="fr")
    graphics = node.findall("devices/graphics")
    assert len(graphics) == 2
    assert [g.get("keymap") for g in graphics] == ["fr", "fr"]
    assert [g.get("type") for g in graphics] == ["vnc", "vnc"]


def test_keymap_without_graphics_adds_none():
    node = apply(keymap="de-ch")
    assert node.find("devices/graphics") is None


def test_no_keymap_leaves_graphics_alone():
    node = apply(base(graphics=1))
    assert node.find("devices/graphics").get("keymap") is None


# ---- NICs ---------------------------------------------------------------------


def test_nics_replace_the_base_interfaces():
    node = apply(
        nics=[
            "isolated",
            {"bridge": "br0", "mac": "52:54:00:AA:BB:CC", "model": "e1000"},
            {"network": "default", "mac": MAC, "ip": "192.168.122.50"},
        ]
    )
    first, second, third = interfaces(node)
    assert first.get("type") == "network"
    assert first.find("source").attrib == {"network": "isolated"}
    assert first.find("mac") is None
    assert first.find("model").get("type") == "virtio"
    assert second.get("type") == "bridge"
    assert second.find("source").attrib == {"bridge": "br0"}
    assert second.find("mac").get("address") == "52:54:00:aa:bb:cc"
    assert second.find("model").get("type") == "e1000"
    assert third.get("type") == "network"
    assert third.find("source").get("network") == "default"
    assert third.find("mac").get("address") == MAC
    # the ip is a DHCP reservation on the network, not part of the interface
    assert third.find("ip") is None
    for iface in (first, second, third):
        assert iface.find("driver") is None
    # the other devices survive
    assert node.find("devices/disk/source").get("file") == "/x.qcow2"
    assert node.find("devices/rng") is not None


def test_vhost_driver_only_on_virtio_nics():
    node = apply(
        vhost=True,
        nics=[{"network": "default"}, {"bridge": "br0", "model": "e1000"}, {"bridge": "br1"}],
    )
    drivers = [i.find("driver") for i in interfaces(node)]
    assert drivers[0] is not None and drivers[0].get("name") == "vhost"
    assert drivers[1] is None
    assert drivers[2] is not None and drivers[2].get("name") == "vhost"


def test_vhost_without_nics_marks_the_base_virtio_interfaces():
    dom = base()
    etree.SubElement(
        etree.SubElement(dom.node.find("devices"), "interface", type="network"), "model"
    ).set("type", "e1000")
    node = apply(dom, vhost=True)
    virtio, e1000 = interfaces(node)
    assert virtio.find("source").get("network") == "default"
    assert virtio.find("driver").get("name") == "vhost"
    assert e1000.find("driver") is None


def test_no_nics_keeps_the_base_interfaces():
    node = apply(memory=2048)
    [iface] = interfaces(node)
    assert iface.find("source").get("network") == "default"
    assert iface.find("model").get("type") == "virtio"


def test_nics_on_a_base_without_devices():
    dom = Domain("<domain type='kvm'><name>base</name></domain>")
    node = apply(dom, nics=["default"])
    [iface] = interfaces(node)
    assert iface.find("source").get("network") == "default"
