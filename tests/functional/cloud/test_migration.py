"""Migration between two private test-driver hosts (#15 item 2): everything
that blocks a move is named before anything moves, a quick clone's base and
the DHCP reservations are planned, and the driver's action checks its input.
The move itself needs QEMU (tests/integration/test_multihost.py)."""

import contextlib

import libvirt
import pytest
from lxml import etree
from salt.exceptions import SaltCloudConfigError, SaltCloudSystemExit

from salt_kvm.cloud import actions, migration, migrationplan
from salt_kvm.clouds import libvirt as driver
from salt_kvm.errors import ConflictError, SaltKvmError
from salt_kvm.nat import forwards
from salt_kvm.nat import hooks as nathooks
from salt_kvm.nat import rules as nat
from salt_kvm.nat.store import Entry, Placement, Store
from salt_kvm.virt import migrate as mig
from salt_kvm.virt.domain import Domain, new_domain
from salt_kvm.virt.volumes import Volume

from .twohosts import guest

GIB = 1024**3
HV2 = "test:///hv2"


def _plan(hosts, name, copy_base=False):
    request = mig.Request(copy_base=copy_base)
    return migration.plan(hosts["hv1"], hosts["hv2"], name, ("hv1", "hv2"), HV2, request)


def _volume(conn, name, capacity=GIB, backing=None):
    vol = Volume.new(name, capacity, "qcow2")
    if backing is not None:
        vol.set_backing(backing, "qcow2")
    pool = conn.storagePoolLookupByName("default-pool")
    return pool.createXML(vol.to_xml(), 0)


def _volumes(conn):
    return sorted(conn.storagePoolLookupByName("default-pool").listVolumes())


def _domains(conn):
    return sorted(d.name() for d in conn.listAllDomains(0))


def test_everything_that_blocks_a_move_is_named_before_anything_moves(hosts):
    hv1, hv2 = hosts["hv1"], hosts["hv2"]
    xml = new_domain("vm-a", "test", 64 * 1024, 2, "/nowhere/vm-a.qcow2", networks=("lan9",))
    xml.set_managed_info({"base": "base", "volumes": []})
    devices = xml.node.find("devices")
    usb = etree.SubElement(devices, "hostdev", mode="subsystem", type="usb")
    source = etree.SubElement(usb, "source")
    etree.SubElement(source, "vendor", id="0x1234")
    etree.SubElement(source, "product", id="0x5678")
    share = etree.SubElement(devices, "filesystem", type="mount", accessmode="passthrough")
    etree.SubElement(share, "driver", type="virtiofs")
    etree.SubElement(share, "source", dir="/srv/data")
    etree.SubElement(share, "target", dir="data")
    dom = hv1.defineXML(xml.to_xml())
    dom.snapshotCreateXML("<domainsnapshot><name>before-upgrade</name></domainsnapshot>", 0)
    guest(hv2, "vm-a")  # the name is taken there
    before = (_volumes(hv2), _domains(hv2))
    with pytest.raises(ConflictError) as refused:
        _plan(hosts, "vm-a")
    text = str(refused.value)
    assert text.startswith("migration of vm-a to hv2 refused, nothing moved: ")
    for cause in (
        "it has snapshots (before-upgrade)",
        "it has host devices",
        "it has virtiofs shares (data)",
        "hv2 already has a domain named vm-a",
        "uncommitted memory, the guest needs 65536 MiB",
        "hv2 has no active network lan9",
        "disk vda (/nowhere/vm-a.qcow2) is in no storage pool of hv1",
    ):
        assert cause in text
    assert (_volumes(hv2), _domains(hv2)) == before


def test_the_same_host_under_two_names_is_refused(hosts, monkeypatch):
    guest(hosts["hv1"], "vm-s")
    # the test driver reports no host UUID; libvirtd always does
    monkeypatch.setattr(migrationplan, "_host_uuid", lambda conn: "5f0f8a2e-host-uuid")
    with pytest.raises(ConflictError, match=r"hv1b is the host it is on \(hv1\)"):
        migration.plan(hosts["hv1"], hosts["hv2"], "vm-s", ("hv1", "hv1b"), "x", mig.Request())


def test_a_quick_clone_needs_its_base_on_the_target_or_copy_base(hosts):
    hv1, hv2 = hosts["hv1"], hosts["hv2"]
    base = _volume(hv1, "base-img.qcow2")
    overlay = _volume(hv1, "vm-q.qcow2", backing=base.path())
    if Volume(overlay.XMLDesc(0)).backing_path != base.path():
        pytest.skip("this libvirt's test driver keeps no backing store")
    hv1.defineXML(new_domain("vm-q", "test", 256, 1, overlay.path()).to_xml())
    with pytest.raises(
        ConflictError,
        match=r"the base base-img.qcow2 of disk vda \(a quick clone\) "
        r"is not on hv2 in pool default-pool: copy_base=true copies it there",
    ):
        _plan(hosts, "vm-q")
    planned = _plan(hosts, "vm-q", copy_base=True)
    assert [(b.volume, b.copy, b.target_path) for b in planned.bases] == [
        ("base-img.qcow2", True, "/default-pool/base-img.qcow2")
    ]
    assert planned.incremental
    assert planned.paths == {overlay.path(): "/default-pool/vm-q.qcow2"}
    _volume(hv2, "base-img.qcow2", capacity=2 * GIB)  # another image of that name
    with pytest.raises(ConflictError, match="the base base-img.qcow2 of disk vda differs on hv2"):
        _plan(hosts, "vm-q", copy_base=True)


def test_a_volume_name_taken_on_the_target_is_refused(hosts):
    hv1, hv2 = hosts["hv1"], hosts["hv2"]
    vol = _volume(hv1, "vm-t.qcow2")
    hv1.defineXML(new_domain("vm-t", "test", 256, 1, vol.path()).to_xml())
    _volume(hv2, "vm-t.qcow2")
    with pytest.raises(
        ConflictError, match="hv2's pool default-pool already has a volume vm-t.qcow2"
    ):
        _plan(hosts, "vm-t")


def _network(conn, name, ip=None):
    net = f"<network><name>{name}</name><bridge name='br-{name}'/>"
    if ip:
        low, high = f"{ip[:-1]}100", f"{ip[:-1]}200"
        net += f"<ip address='{ip}' netmask='255.255.255.0'><dhcp>"
        net += f"<range start='{low}' end='{high}'/></dhcp></ip>"
    conn.networkDefineXML(net + "</network>").create()


def _reserved(conn, name, reservations, network):
    vol = _volume(conn, f"{name}.qcow2")
    xml = new_domain(name, "test", 256, 1, vol.path(), networks=(network,))
    xml.set_managed_info({"base": "base", "volumes": [vol.path()], "reservations": reservations})
    conn.defineXML(xml.to_xml())


def test_reservations_move_where_the_target_serves_dhcp_stay_on_a_bridged_segment(hosts):
    hv1, hv2 = hosts["hv1"], hosts["hv2"]
    mac = "52:54:00:aa:bb:01"
    _reserved(hv1, "vm-r", [f"default|{mac}|192.168.122.50"], "default")
    assert _plan(hosts, "vm-r").reservations == [("default", mac, "192.168.122.50")]
    # hv2's lan is bridged onto the segment hv1's lan serves: the reservation stays there
    _network(hv1, "lan", "10.9.0.1")
    _network(hv2, "lan")
    _reserved(hv1, "vm-b", [f"lan|{mac}|10.9.0.50"], "lan")
    planned = _plan(hosts, "vm-b")
    assert (planned.reservations, planned.kept_reservations) == ([], [f"lan|{mac}|10.9.0.50"])
    # a target network serving another subnet cannot take it
    _network(hv1, "dmz", "10.7.0.1")
    _network(hv2, "dmz", "10.8.0.1")
    _reserved(hv1, "vm-d", [f"dmz|{mac}|10.7.0.50"], "dmz")
    with pytest.raises(ConflictError, match="hv2's dmz serves no DHCP for 10.7.0.50"):
        _plan(hosts, "vm-d")


def _forwarded(hosts, store, network, mac, address):
    """vm-n running on hv1's ``network`` with a forward 10022->22 in ``store``."""
    vol = _volume(hosts["hv1"], "vm-n.qcow2")
    xml = new_domain("vm-n", "test", 256, 1, vol.path(), networks=(network,))
    xml.interfaces[0].mac = mac
    xml.set_managed_info({"base": "base", "volumes": [vol.path()]})
    hosts["hv1"].defineXML(xml.to_xml()).create()  # the test driver starts nothing paused
    subnet = address.rsplit(".", 1)[0] + ".0/24"
    placement = Placement(network, f"br-{network}", subnet, address, mac)
    store.save({"vm-n": Entry([nat.Rule(guest=22, host=10022)], placement)})


def _moved(dom, dconn, parameters, flags):
    """libvirt's part, as the test driver cannot migrate: defined and running
    on the target, gone from the source."""
    dconn.defineXML(parameters[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML]).create()
    dom.destroy()
    dom.undefine()


def test_nat_forwards_stay_here_with_the_address_pinned_on_a_bridged_segment(
    hosts, tmp_path, monkeypatch
):
    """hv2's lan is bridged onto the segment hv1's lan serves: the forwards
    stay in hv1's kernel and reach the guest there; its address is reserved
    on hv1 and the store says where it runs, so nothing that sees it gone
    from hv1 (the release hook, kvm_nat.refresh) drops them."""
    hv1, hv2 = hosts["hv1"], hosts["hv2"]
    store = Store(tmp_path / "nat.json")
    monkeypatch.setenv("SALT_KVM_NAT_STATE", str(store.path))
    mac = "52:54:00:aa:bb:0e"
    _network(hv1, "lan", "10.9.0.1")
    _network(hv2, "lan")
    _forwarded(hosts, store, "lan", mac, "10.9.0.50")
    planned = _plan(hosts, "vm-n")
    assert (planned.forwards.moved_to, planned.forwards.pin) == ("hv2", ("lan", mac, "10.9.0.50"))

    def fail(dom, dconn, parameters, flags):
        assert forwards.elsewhere("vm-n") == "hv2"
        assert "10.9.0.50" in hv1.networkLookupByName("lan").XMLDesc(0)
        raise SaltKvmError("libvirt's migration failed: injected")

    monkeypatch.setattr(mig, "migrate", fail)
    with pytest.raises(SaltKvmError, match="injected"):
        migration.run(hv1, hv2, planned)
    assert forwards.elsewhere("vm-n") == "" and forwards.pin_of("vm-n") is None
    assert "10.9.0.50" not in hv1.networkLookupByName("lan").XMLDesc(0)

    monkeypatch.setattr(mig, "migrate", _moved)
    moved = migration.run(hv1, hv2, _plan(hosts, "vm-n"))
    assert moved["nat"] == {
        "forwards": "tcp 10022->22",
        "on_host": "hv2",
        "pinned": f"lan|{mac}|10.9.0.50",
    }
    assert hv2.lookupByName("vm-n").isActive()
    assert forwards.elsewhere("vm-n") == "hv2"
    assert forwards.pin_of("vm-n") == (hv1.getURI(), "lan", mac, "10.9.0.50")
    assert "10.9.0.50" in hv1.networkLookupByName("lan").XMLDesc(0)
    assert forwards.current("vm-n") == [nat.Rule(guest=22, host=10022)]
    # gone from hv1's libvirt, but not gone: the release hook and refresh keep it
    assert nathooks.on_qemu("vm-n", "release", store) == []
    assert forwards._gone(hv1, store, set()) == set()
    assert forwards.listing("vm-n", store)["vm-n"]["moved_to"] == "hv2"
    # back on hv1 (the network whose bridge the forwards point at), they are its own again
    request = mig.Request()
    home = migration.plan(hv2, hv1, "vm-n", ("hv2", "hv1"), "test:///hv1", request)
    assert (home.forwards.moved_to, home.forwards.pin) == ("", None)
    assert migration.run(hv2, hv1, home)["nat"]["on_host"] == "this host"
    assert forwards.elsewhere("vm-n") == "" and forwards.pin_of("vm-n") is not None
    migration.run(hv1, hv2, _plan(hosts, "vm-n"))
    assert forwards.elsewhere("vm-n") == "hv2"  # and away again, the pin kept
    # -d on hv2 removes them here and releases the pin on hv1
    monkeypatch.setattr(forwards, "sync_kernel", lambda entries, **_: [])
    monkeypatch.setattr(actions.connection, "connected", lambda uri: contextlib.nullcontext(hv1))
    removed = actions.destroy(hv2, "vm-n", False)
    assert f"lan|{mac}|10.9.0.50" in removed["reservations"]
    assert "10.9.0.50" not in hv1.networkLookupByName("lan").XMLDesc(0)
    assert forwards.current("vm-n") == []


def test_nat_forwards_are_refused_where_the_target_serves_addresses_itself(
    hosts, tmp_path, monkeypatch
):
    store = Store(tmp_path / "nat.json")
    monkeypatch.setenv("SALT_KVM_NAT_STATE", str(store.path))
    _network(hosts["hv1"], "dmz", "10.7.0.1")
    _network(hosts["hv2"], "dmz", "10.8.0.1")
    _forwarded(hosts, store, "dmz", "52:54:00:aa:bb:0d", "10.7.0.50")
    with pytest.raises(
        ConflictError,
        match=r"it has NAT forwards on hv1 \(tcp 10022->22\) and hv2's network dmz serves "
        r"addresses itself: the forwards could not follow",
    ):
        _plan(hosts, "vm-n")
    assert forwards.elsewhere("vm-n") == ""


def test_the_driver_action_checks_its_input_first(provider, hosts):
    vol = _volume(hosts["hv1"], "vm-m.qcow2")
    hosts["hv1"].defineXML(new_domain("vm-m", "test", 256, 1, vol.path()).to_xml())
    with pytest.raises(SaltCloudSystemExit, match="migrate is an action"):
        driver.migrate("vm-m", {"location": "hv2"}, call="function")
    with pytest.raises(
        SaltCloudConfigError, match=r"location: is required .*accepted: hv1, hv2, rack7"
    ):
        driver.migrate("vm-m", {}, call="action")
    with pytest.raises(SaltCloudConfigError, match="location: 'hv9' is not one of"):
        driver.migrate("vm-m", {"location": "hv9"}, call="action")
    with pytest.raises(SaltCloudConfigError, match="location: the guest is already on hv1"):
        driver.migrate("vm-m", {"location": "hv1"}, call="action")
    with pytest.raises(SaltCloudConfigError, match="port: 22 is out of range"):
        driver.migrate("vm-m", {"location": "hv2", "port": 22}, call="action")
    with pytest.raises(SaltCloudConfigError, match="live: is not a migration option"):
        driver.migrate("vm-m", {"location": "hv2", "live": True}, call="action")
    hosts["hv2"].defineXML(new_domain("vm-m", "test", 256, 1, "/x.qcow2").to_xml())
    with pytest.raises(SaltCloudSystemExit, match="hv2 already has a domain named vm-m"):
        driver.migrate("vm-m", {"location": "hv2"}, call="action")
    assert Domain(hosts["hv1"].lookupByName("vm-m").XMLDesc(0)).disks[0].path == vol.path()


def test_a_one_host_provider_has_nowhere_to_migrate(monkeypatch, tmp_path):
    opts = {"providers": {"one": {"libvirt": {"driver": "libvirt", "url": "test:///default"}}}}
    monkeypatch.setattr(driver, "__opts__", {**opts, "cachedir": str(tmp_path)}, raising=False)
    monkeypatch.setattr(driver, "__active_provider_name__", "one:libvirt", raising=False)
    with pytest.raises(SaltCloudConfigError, match="location: this provider has one hypervisor"):
        driver.migrate("test", {"location": "hv2"}, call="action")


def test_a_failed_move_leaves_nothing_on_the_target_and_the_guest_where_it_was(hosts, monkeypatch):
    """The failure injected where libvirt migrates: the copied base, the
    volumes made for the disks and the reservation added there are removed."""
    hv1, hv2 = hosts["hv1"], hosts["hv2"]
    base = _volume(hv1, "base-f.qcow2")
    overlay = _volume(hv1, "vm-f.qcow2", backing=base.path())
    mac = "52:54:00:aa:bb:0f"
    xml = new_domain("vm-f", "test", 256, 1, overlay.path())
    xml.interfaces[0].mac = mac
    xml.set_managed_info(
        {
            "base": "b",
            "volumes": [overlay.path()],
            "reservations": [f"default|{mac}|192.168.122.60"],
        }
    )
    hv1.defineXML(xml.to_xml()).create()
    before = (_volumes(hv2), _domains(hv2), hv2.networkLookupByName("default").XMLDesc(0))
    planned = _plan(hosts, "vm-f", copy_base=True)
    assert [b.volume for b in planned.bases if b.copy] == ["base-f.qcow2"]
    made = []

    def fail(dom, dconn, parameters, flags):
        made.append(_volumes(dconn))
        made.append(dconn.networkLookupByName("default").XMLDesc(0))
        raise SaltKvmError("libvirt's migration failed: injected")

    monkeypatch.setattr(mig, "copy_volume", lambda src, dconn, dst: 0)  # no streams here
    monkeypatch.setattr(mig, "migrate", fail)
    with pytest.raises(SaltKvmError, match="injected"):
        migration.run(hv1, hv2, planned)
    assert {"base-f.qcow2", "vm-f.qcow2"} <= set(made[0])  # they were made, then removed
    assert "192.168.122.60" in made[1]
    assert (_volumes(hv2), _domains(hv2), hv2.networkLookupByName("default").XMLDesc(0)) == before
    assert hv1.lookupByName("vm-f").isActive()
    assert {"base-f.qcow2", "vm-f.qcow2"} <= set(_volumes(hv1))


def _efi_guest(hv1, name):
    """A running guest with its own UEFI variables volume (as firmware: efi makes it)."""
    disk = _volume(hv1, f"{name}.qcow2")
    pool = hv1.storagePoolLookupByName("default-pool")
    nvram = pool.createXML(Volume.new(f"{name}_VARS.fd", 540672, "raw").to_xml(), 0)
    xml = new_domain(name, "test", 256, 1, disk.path())
    loader = etree.SubElement(xml.node.find("os"), "loader", readonly="yes", type="pflash")
    loader.text = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    etree.SubElement(xml.node.find("os"), "nvram").text = nvram.path()
    xml.set_managed_info({"base": "b", "volumes": [disk.path()], "nvram": nvram.path()})
    hv1.defineXML(xml.to_xml()).create()
    return nvram.path()


def test_uefi_variables_move_with_the_guest_and_go_on_a_failure(hosts, monkeypatch):
    """The NVRAM volume is copied to the target's pool before the move, the
    target's definition (and salt-kvm's record) name the copy, the source's
    goes after; a failed move removes the copy and keeps the source's."""
    hv1, hv2 = hosts["hv1"], hosts["hv2"]
    source = _efi_guest(hv1, "vm-e")
    planned = _plan(hosts, "vm-e")
    assert (planned.nvram.volume, planned.nvram.capacity) == ("vm-e_VARS.fd", 540672)
    copied = []
    monkeypatch.setattr(mig, "copy_volume", lambda src, dconn, dst: copied.append(dst.path()))

    def fail(dom, dconn, parameters, flags):
        assert "vm-e_VARS.fd" in _volumes(dconn)
        raise SaltKvmError("libvirt's migration failed: injected")

    monkeypatch.setattr(mig, "migrate", fail)
    with pytest.raises(SaltKvmError, match="injected"):
        migration.run(hv1, hv2, planned)
    assert "vm-e_VARS.fd" not in _volumes(hv2) and "vm-e_VARS.fd" in _volumes(hv1)

    monkeypatch.setattr(mig, "migrate", _moved)
    moved = migration.run(hv1, hv2, _plan(hosts, "vm-e"))
    target = planned.nvram.target_path
    assert moved["nvram"] == target and copied[-1] == target
    xml = Domain(hv2.lookupByName("vm-e").XMLDesc(0))
    assert xml.node.find("os/nvram").text == target
    assert xml.managed_info()["nvram"] == target
    assert source in moved["source"]["deleted_volumes"]
    assert "vm-e_VARS.fd" not in _volumes(hv1)


def test_a_tpm_guest_is_refused_by_name(hosts):
    hv1 = hosts["hv1"]
    disk = _volume(hv1, "vm-t2.qcow2")
    xml = new_domain("vm-t2", "test", 256, 1, disk.path())
    tpm = etree.SubElement(xml.node.find("devices"), "tpm", model="tpm-crb")
    etree.SubElement(tpm, "backend", type="emulator", version="2.0")
    hv1.defineXML(xml.to_xml())
    with pytest.raises(ConflictError, match="it has a TPM: its state"):
        _plan(hosts, "vm-t2")
