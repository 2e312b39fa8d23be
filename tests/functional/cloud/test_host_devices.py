"""macvtap NICs and hostdevs checked against the host's node devices (canned
``nodedev-dumpxml`` documents in libvirt's test driver), then the whole create."""

from pathlib import Path

import libvirt
import pytest
from lxml import etree

from salt_kvm.cloud import hostcheck, inventory, provision
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import ConflictError, SpecError
from salt_kvm.virt import nodedev
from salt_kvm.virt.domain import Domain, has_hostdevs
from salt_kvm.virt.rollback import Rollback

HERE = Path(__file__).parent
NODE = HERE.parent / "testnode.xml"
DEVICES = HERE / "hostdevices.xml"
DIRECT = {"type": "direct", "source": "eth0", "mac": "52:54:00:20:00:02"}
# `virsh domcapabilities` on this machine: hostdevs, but no PCI backend (no VFIO).
NO_VFIO = (
    "<domainCapabilities><devices><hostdev supported='yes'>"
    "<enum name='subsysType'><value>usb</value><value>pci</value></enum>"
    "<enum name='pciBackend'/></hostdev></devices></domainCapabilities>"
)


@pytest.fixture
def conn(tmp_path):
    """The functional tier's test hypervisor with the host devices added."""
    node = etree.parse(str(NODE)).getroot()
    for device in etree.parse(str(DEVICES)).getroot().findall("device"):
        node.append(device)
    path = tmp_path / "node.xml"
    path.write_bytes(etree.tostring(node))
    conn = libvirt.open(f"test://{path}")
    yield conn
    conn.close()


# The provider's: every canned device but the second GPU (0000:05:00.0).
ALLOWED = [
    {"pci": "8086:10fb"},
    {"pci": "0000:04:00.0"},
    {"pci": "0000:00:03.0"},
    {"pci": "0000:00:01.0"},
    {"usb": "046d:c52b"},
]


def spec(**values):
    base = {
        "name": "vm1",
        "base_domain": "base",
        "password": "pw",
        "clone_strategy": "quick",
        "hostdev_allowed": ALLOWED,
    }
    return build_spec({**base, **values})


def state(conn, pool):
    pool.refresh(0)
    return sorted(d.name() for d in conn.listAllDomains(0)), sorted(pool.listVolumes())


def create(conn, **values):
    return provision.create(conn, spec(**values), Rollback(), lambda *a: None)


# ---- node devices as libvirt reports them -------------------------------------


def test_the_node_devices_are_read_as_objects(conn):
    pci = {d.address_text: d for d in nodedev.pci_devices(conn)}
    assert pci["0000:03:00.0"].vendor_product == "8086:10fb"
    assert pci["0000:03:00.0"].iommu_group == 14
    assert pci["0000:00:03.0"].iommu_group is None  # this machine: no IOMMU
    assert pci["0000:00:01.0"].is_bridge and not pci["0000:03:00.0"].is_bridge
    (usb,) = nodedev.usb_devices(conn)
    assert (usb.bus, usb.device, usb.vendor_product) == (1, 4, "046d:c52b")
    assert nodedev.interfaces(conn) == ["eth0", "lo"]


# ---- a create with both, the XML it defines and what show_instance says --------


def test_a_guest_with_macvtap_and_host_devices(conn, pool, base):
    hostdevs = [{"pci": "8086:10fb"}, {"usb": "046d:c52b"}, {"usb": {"bus": 1, "device": 4}}]
    # Not the same USB device twice: one item by ids, the other by address.
    with pytest.raises(SpecError, match=r"^hostdevs\[2\]: bus 1 device 4 .* is hostdevs\[1\] too"):
        create(conn, nics=["default", DIRECT], hostdevs=hostdevs)
    guest = create(conn, nics=["default", {**DIRECT, "mode": "vepa"}], hostdevs=hostdevs[:2])
    xml = Domain(guest.domain.XMLDesc(0))
    direct = xml.interfaces[1]
    assert (direct.type, direct.source_dev, direct.source_mode) == ("direct", "eth0", "vepa")
    pci, usb = xml.hostdevs
    assert (pci.type, pci.managed, pci.address_bus, pci.address_slot) == (
        "pci",
        True,
        "0x03",
        "0x00",
    )
    assert (usb.type, usb.vendor, usb.product) == ("usb", "0x046d", "0xc52b")
    assert has_hostdevs(xml)
    shown = inventory.describe(conn, guest.domain)
    assert [(n["type"], n["source"]) for n in shown["nics"]] == [
        ("network", "default"),
        ("direct", "eth0"),
    ]
    assert shown["nics"][1]["mode"] == "vepa"
    assert shown["hostdevs"] == ["pci 0000:03:00.0", "usb 046d:c52b"]


def test_an_ovs_port_is_shown_with_its_vlans(conn, pool, base):
    nic = {"bridge": "br-ovs", "virtualport": "openvswitch", "vlan": [10, 20], "mtu": 9000}
    guest = create(conn, nics=["default", nic])
    shown = inventory.describe(conn, guest.domain)["nics"][1]
    assert shown["type"] == "bridge" and shown["source"] == "br-ovs"
    assert (shown["virtualport"], shown["vlan"], shown["trunk"], shown["mtu"]) == (
        "openvswitch",
        [10, 20],
        True,
        9000,
    )


# ---- refusals, before anything is made -----------------------------------------


@pytest.mark.parametrize(
    "values, pattern",
    [
        (
            {"nics": ["default", {**DIRECT, "source": "eth9"}]},
            r"^nics\[1\]\.source: 'eth9' is not a network interface .*\(accepted: eth0\)",
        ),
        (
            {"nics": ["default", {**DIRECT, "source": "lo"}]},
            r"^nics\[1\]\.source: 'lo' is not a network interface .*\(accepted: eth0\)",
        ),
        (
            {"hostdevs": [{"pci": "0000:09:00.0"}]},
            r"^hostdevs\[0\]: no pci 0000:09:00.0 on .*\(accepted: 0000:00:01.0 .*0000:04:00.0 "
            r"\(10de:1eb8\)\)$",
        ),
        (
            {"hostdevs": [{"pci": "0000:05:00.0"}]},
            r"^hostdevs\[0\]: pci 0000:05:00.0 is not among the devices the provider allows",
        ),
        ({"hostdevs": [{"usb": "1d6b:0002"}]}, r"^hostdevs\[0\]: no usb 1d6b:0002 .*046d:c52b"),
        (
            {"hostdevs": [{"pci": "10de:1eb8"}], "hostdev_allowed": [{"pci": "10de:1eb8"}]},
            r"^hostdevs\[0\]: pci 10de:1eb8 matches 2 devices .*0000:04:00.0.*0000:05:00.0",
        ),
        (
            {"hostdevs": [{"pci": "0000:00:03.0"}]},
            r"^hostdevs\[0\]: 0000:00:03.0 \(1af4:1041\) cannot be assigned .* no IOMMU group",
        ),
        (
            {"hostdevs": [{"pci": "00:01.0"}]},
            r"^hostdevs\[0\]: 0000:00:01.0 .* is a host/PCI bridge",
        ),
        (
            {"hostdevs": [{"pci": "03:00.0"}, {"pci": "8086:10fb"}]},
            r"^hostdevs\[1\]: 0000:03:00.0 \(8086:10fb\) is hostdevs\[0\] too",
        ),
    ],
    ids=[
        "no-such-interface",
        "loopback",
        "no-pci",
        "not-allowed",
        "no-usb",
        "ambiguous",
        "no-iommu",
        "bridge",
        "twice",
    ],
)
def test_what_the_host_cannot_give_is_refused_before_anything_is_made(
    conn, pool, base, values, pattern
):
    before = state(conn, pool)
    with pytest.raises(SpecError, match=pattern) as err:
        create(conn, **values)
    assert err.value.accepted
    assert state(conn, pool) == before


def test_an_ssh_deploy_from_this_host_cannot_reach_a_guest_with_only_macvtap(conn, pool, base):
    before = state(conn, pool)
    with pytest.raises(SpecError) as err:
        create(conn, nics=[DIRECT], ip_source="qemu-agent")
    assert str(err.value).startswith("nics: an SSH deploy from this host cannot reach the guest")
    assert "deploy: false" in err.value.accepted
    assert state(conn, pool) == before
    # Reachable: another NIC, vepa (a reflecting switch), no SSH deploy, or a remote host.
    for values in (
        {"nics": [DIRECT, "default"]},
        {"nics": [{**DIRECT, "mode": "vepa"}]},
        {"nics": [DIRECT], "deploy": False},
        {"nics": [DIRECT], "deploy_method": "cloud-init"},
    ):
        hostcheck.check_direct(conn, spec(ip_source="qemu-agent", **values))
    assert not hostcheck._local("qemu+ssh://root@kvm2.example/system")
    assert hostcheck._local("qemu+tcp://localhost/system") and hostcheck._local("qemu:///system")


def test_a_pci_device_is_refused_where_libvirt_names_no_assignment_backend(conn, pool, base):
    """libvirt's domain capabilities on a host without VFIO (this machine's
    answer; the test driver says nothing of host devices)."""
    conn.getDomainCapabilities = lambda *args: NO_VFIO
    before = state(conn, pool)
    with pytest.raises(SpecError, match=r"^hostdevs\[0\]: 0000:03:00.0 .* no PCI assignment"):
        create(conn, hostdevs=[{"pci": "03:00.0"}])
    assert state(conn, pool) == before
    # USB needs no IOMMU nor VFIO
    (usb,) = hostcheck.resolve_hostdevs(
        conn, spec(hostdevs=[{"usb": "046d:c52b"}]).hostdevs, spec().hostdev_allowed
    )
    assert usb.device.name == "usb_1_4"


def test_a_device_another_domain_holds_is_refused(conn, pool, base):
    held = Domain(base.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    held.name, held.uuid = "holder", None
    held.remove_devices("interface")
    devices = held.node.find("devices")
    devices.append(
        etree.fromstring(
            "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
            "<address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>"
        )
    )
    devices.append(
        etree.fromstring(
            "<hostdev mode='subsystem' type='usb'><source><address bus='001' device='004'/>"
            "</source></hostdev>"
        )
    )
    conn.defineXML(held.to_xml())
    before = state(conn, pool)
    for item in ({"pci": "0000:03:00.0"}, {"pci": "8086:10fb"}, {"usb": "046d:c52b"}):
        with pytest.raises(ConflictError, match=r"^hostdevs\[0\]: .* already given to .*holder"):
            create(conn, hostdevs=[item])
    assert state(conn, pool) == before
    # a running domain that has no definition (transient) holds it too
    transient = Domain(held.to_xml())
    transient.name = "transient"
    transient.remove_devices("hostdev")
    transient.node.find("devices").append(
        etree.fromstring(
            "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
            "<address domain='0x0000' bus='0x04' slot='0x00' function='0x0'/></source></hostdev>"
        )
    )
    conn.createXML(transient.to_xml(), 0)
    with pytest.raises(
        ConflictError, match=r"^hostdevs\[0\]: 0000:04:00.0 .* given to .*transient"
    ):
        create(conn, hostdevs=[{"pci": "0000:04:00.0"}])
    conn.lookupByName("transient").destroy()
    # the resolution alone, as other features (migration, backups) may use it
    wanted = spec(hostdevs=[{"pci": "04:00.0"}])
    (free,) = hostcheck.resolve_hostdevs(conn, wanted.hostdevs, wanted.hostdev_allowed)
    assert free.device.address_text == "0000:04:00.0"
