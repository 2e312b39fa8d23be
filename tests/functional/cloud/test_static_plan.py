"""A create with a static ip on a bridge, on libvirt's test driver: the seed
carries the network config, no lease is waited for, the seed stays until the
deploy reached the guest."""

import libvirt
import pytest
import yaml
from lxml import etree

from salt_kvm.cloud import addresses, provision, seed
from salt_kvm.cloud import deploy as cloud_deploy
from salt_kvm.cloud.spec import build_spec
from salt_kvm.virt.domain import Domain
from salt_kvm.virt.rollback import Rollback
from tests.unit.cloud.test_deploy import plan as minion_plan
from tests.unit.cloud.test_seed import read_iso

MAC = "52:54:00:10:01:11"
NIC = {"bridge": "br0", "mac": MAC, "ip": "192.168.1.11", "prefix": 24, "gateway": "192.168.1.1"}


def spec(**values):
    return build_spec(
        {
            "name": "vm1",
            "base_domain": "base",
            "password": "pw",
            "clone_strategy": "quick",
            "virt_type": "auto",
            "nics": [NIC],
            **values,
        }
    )


@pytest.fixture
def uploads(monkeypatch, conn):
    """The test driver cannot stream into a volume: the seed volume is made
    empty and its bytes are kept here, by path."""
    kept = {}

    def upload(conn, pool_name, volume, data):
        pool = conn.storagePoolLookupByName(pool_name)
        vol = pool.createXML(
            f"<volume><name>{volume}</name><capacity>{len(data)}</capacity></volume>", 0
        )
        kept[vol.path()] = data
        return vol

    monkeypatch.setattr(seed, "upload", upload)
    return kept


@pytest.fixture
def no_lease_wait(monkeypatch):
    def wait(*args, **kwargs):
        raise AssertionError("a planned address waits for no lease")

    monkeypatch.setattr(addresses, "wait_for_addresses", wait)


def cdroms(guest):
    return [d.path for d in Domain(guest.domain.XMLDesc(0)).disks if d.device == "cdrom"]


def test_create_puts_the_network_config_in_the_seed_and_waits_for_no_lease(
    conn, pool, base, uploads, no_lease_wait
):
    s = spec(deploy=False)
    data = cloud_deploy.seed_iso(s, None, None)
    guest, deployed = cloud_deploy.create(None, conn, s, None, data, Rollback(), lambda *a: None)
    assert deployed is None and guest.addresses == ["192.168.1.11"]
    assert guest.domain.isActive() and "ip" in guest.timings

    xml = etree.fromstring(guest.domain.XMLDesc(0))
    (iface,) = xml.findall("devices/interface")
    assert iface.get("type") == "bridge"
    assert iface.find("source").get("bridge") == "br0"
    assert iface.find("mac").get("address") == MAC

    # No deploy tells when the guest has read it: the seed stays attached.
    (path,) = cdroms(guest)
    _, files = read_iso(uploads[path])
    network = yaml.safe_load(files["network-config"])
    assert network == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": MAC},
                "set-name": "eth0",
                "addresses": ["192.168.1.11/24"],
                "routes": [{"to": "0.0.0.0/0", "via": "192.168.1.1"}],
            }
        },
    }


@pytest.mark.skipif(
    libvirt.getVersion() < 10_000_000,
    reason="libvirt 9's test driver has no virDomainUpdateDeviceFlags (the seed's eject); "
    "tests/integration/test_static_plan.py ejects it from a real guest",
)
def test_an_ssh_deploy_reaches_the_planned_address_before_the_seed_goes(
    conn, pool, base, uploads, no_lease_wait, monkeypatch
):
    seen = {}

    def run(master, plan, spec, guest):
        seen["address"] = guest.addresses[0]
        seen["cdroms"] = cdroms(guest)
        return {"method": "ssh", "minion_id": plan.key_id}

    monkeypatch.setattr(cloud_deploy, "run", run)
    s = spec()
    data = cloud_deploy.seed_iso(s, minion_plan(), None)
    guest, deployed = cloud_deploy.create(
        None, conn, s, minion_plan(), data, Rollback(), lambda *a: None
    )
    assert deployed["method"] == "ssh" and seen["address"] == "192.168.1.11"
    assert len(seen["cdroms"]) == 1 and seen["cdroms"][0] is not None  # still there
    pool.refresh(0)
    assert seen["cdroms"][0] not in [v.path() for v in pool.listAllVolumes()]  # then gone
    assert all(path is None for path in cdroms(guest))


def test_a_lease_source_on_a_network_still_waits_for_the_lease(conn, pool, base, monkeypatch):
    asked = []
    real = addresses.wait_for_addresses
    monkeypatch.setattr(
        addresses, "wait_for_addresses", lambda *a, **k: asked.append(a[1]) or real(*a, **k)
    )
    nic = {"network": "default", "mac": MAC, "ip": "192.168.122.60"}
    guest = provision.create(conn, spec(nics=[nic]), Rollback(), lambda *a: None)
    assert asked == ["ip-learning"] and guest.addresses
