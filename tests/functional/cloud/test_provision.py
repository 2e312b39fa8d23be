"""provision.create on libvirt's test driver: the whole path except a real boot."""

import pytest

from salt_kvm.cloud import provision
from salt_kvm.cloud.spec import build_spec
from salt_kvm.errors import ConflictError, SpecError
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback


def spec(**values):
    base = {
        "name": "vm1",
        "base_domain": "base",
        "password": "pw",
        "clone_strategy": "quick",
        "virt_type": "auto",
    }
    base.update(values)
    return build_spec(base)


def state(conn, pool):
    pool.refresh(0)
    return (
        sorted(d.name() for d in conn.listAllDomains(0)),
        sorted(pool.listVolumes()),
        conn.networkLookupByName("default").XMLDesc(0).count("<host "),
    )


def test_create_boots_sizes_reserves_and_learns_the_address(conn, pool, base):
    events = []
    nic = {"network": "default", "mac": "52:54:00:12:34:56", "ip": "192.168.122.60"}
    guest = provision.create(
        conn,
        spec(cpus=2, memory="1G", autostart=True, nics=[nic]),
        Rollback(),
        lambda step, data: events.append(step),
    )
    assert [e for e in events] == ["requesting", "waiting_for_ip"]
    assert guest.domain.isActive() and guest.domain.autostart()
    assert guest.macs == ["52:54:00:12:34:56"] and guest.addresses
    xml = Domain(guest.domain.XMLDesc(0))
    assert xml.vcpus == 2 and xml.memory_mib() == 1024
    assert xml.managed_info()["reservations"] == ["default|52:54:00:12:34:56|192.168.122.60"]
    assert set(guest.timings) >= {"clone", "start", "ip"}


def test_creating_an_existing_managed_domain_does_not_clone_again(conn, pool, base):
    provision.create(conn, spec(), Rollback(), lambda *a: None)
    before = state(conn, pool)
    again = provision.create(conn, spec(), Rollback(), lambda *a: None)
    assert again.existed and state(conn, pool) == before


def test_a_domain_salt_kvm_did_not_create_is_never_taken_over(conn, pool, base):
    with pytest.raises(ConflictError, match="not created by salt-kvm"):
        provision.create(conn, spec(name="test"), Rollback(), lambda *a: None)


def test_a_missing_or_inactive_network_is_refused_by_name_before_anything_is_made(conn, pool, base):
    before = state(conn, pool)
    with pytest.raises(SpecError, match=r"^nics\[1\]\.network: no network named 'nonet'.*default"):
        nics = [{"network": "default"}, {"network": "nonet"}]
        provision.create(conn, spec(nics=nics), Rollback(), lambda *a: None)
    assert state(conn, pool) == before
    conn.networkDefineXML(
        "<network><name>idle</name><bridge name='virbr9'/>"
        "<ip address='10.9.9.1' netmask='255.255.255.0'/></network>"
    )
    with pytest.raises(SpecError, match=r"^nics\[0\]\.network: network 'idle' is not active"):
        provision.create(conn, spec(nics=[{"network": "idle"}]), Rollback(), lambda *a: None)
    assert state(conn, pool) == before


def test_a_mac_in_use_is_refused_before_anything_is_made(conn, pool, base):
    before = state(conn, pool)
    with pytest.raises(ConflictError, match="52:54:00:00:00:01"):
        provision.create(
            conn,
            spec(nics=[{"network": "default", "mac": "52:54:00:00:00:01"}]),
            Rollback(),
            lambda *a: None,
        )
    assert state(conn, pool) == before


def test_a_failure_after_creation_rolls_everything_back(conn, pool, base):
    before = state(conn, pool)

    def fail_while_waiting(step, data):
        if step == "waiting_for_ip":
            raise RuntimeError("injected")

    rollback = Rollback()
    nic = {"network": "default", "mac": "52:54:00:12:34:57", "ip": "192.168.122.61"}
    with pytest.raises(RuntimeError, match="injected"):
        with rollback:
            provision.create(conn, spec(nics=[nic]), rollback, fail_while_waiting)
    assert state(conn, pool) == before


def test_auto_that_falls_back_to_qemu_says_so(conn, pool, base):
    events = []
    guest = provision.create(
        conn, spec(), Rollback(), lambda step, data: events.append((step, data))
    )
    requesting = dict(events)["requesting"]
    assert requesting["virt_type"] == "qemu"
    assert "virt_type auto: using qemu" in requesting["virt_type_note"]
    assert guest.virt_type_note == requesting["virt_type_note"]


@pytest.fixture
def share_host(tmp_path, monkeypatch):
    """An allowed directory with a share in it, and a virtiofsd libvirt finds."""
    from salt_kvm.virt import virtiofs

    daemon = tmp_path / "virtiofsd"
    daemon.write_text("#!/bin/sh\necho '-o source=PATH'\n")
    daemon.chmod(0o755)
    descriptors = tmp_path / "vhost-user"
    descriptors.mkdir()
    (descriptors / "50-virtiofsd.json").write_text(f'{{"type": "fs", "binary": "{daemon}"}}')
    monkeypatch.setattr(virtiofs, "DESCRIPTOR_DIRS", (str(descriptors),))
    allowed = tmp_path / "shares"
    (allowed / "data").mkdir(parents=True)
    (allowed / "out").symlink_to("/etc")
    return allowed


def test_shares_are_defined_with_shared_memory_and_shown(conn, pool, base, share_host):
    from salt_kvm.cloud import inventory

    shares = [{"source": f"{share_host}/data", "tag": "data", "mount": "/mnt/data"}]
    values = {"shares": shares, "share_allowed_dirs": [str(share_host)]}
    guest = provision.create(conn, spec(**values), Rollback(), lambda *a: None)
    xml = Domain(guest.domain.XMLDesc(0))
    assert xml.node.find("memoryBacking/access").get("mode") == "shared"
    fs = xml.node.find("devices/filesystem")
    assert fs.find("driver").get("type") == "virtiofs"
    assert fs.find("source").get("dir") == f"{share_host}/data"
    assert inventory.describe(conn, guest.domain)["shares"] == [
        {"source": f"{share_host}/data", "tag": "data", "readonly": False, "mount": "/mnt/data"}
    ]


def test_a_share_the_host_refuses_stops_the_create_before_anything_is_made(
    conn, pool, base, share_host
):
    before = state(conn, pool)
    dirs = [str(share_host)]
    cases = [
        ({"source": f"{share_host}/out", "tag": "x"}, r"^shares\[0\]\.source: .*outside"),
        ({"source": f"{share_host}/none", "tag": "x"}, r"^shares\[0\]\.source: .*does not exist"),
        ({"source": f"{share_host}/data", "tag": "x", "readonly": True}, r"^shares\[0\]\.readonly"),
    ]
    for share, message in cases:
        with pytest.raises(SpecError, match=message):
            values = {"shares": [share], "share_allowed_dirs": dirs}
            provision.create(conn, spec(**values), Rollback(), lambda *a: None)
        assert state(conn, pool) == before
