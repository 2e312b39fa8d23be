"""salt_source on libvirt's test driver: a cloud-init create carries the
install in its seed, and the driver's console channel is absent without
harm where the hypervisor has no console (the agent's channel remains)."""

import json

import libvirt
import pytest
import yaml

from salt_kvm.cloud import deploy as cloud_deploy
from salt_kvm.cloud import saltsource
from salt_kvm.cloud.spec import build_spec
from salt_kvm.virt.rollback import Rollback
from tests.functional.cloud.test_static_plan import uploads  # noqa: F401 - a fixture
from tests.unit.cloud.test_deploy import plan as minion_plan
from tests.unit.cloud.test_seed import read_iso


class Listener:
    def get_event(self, wait, tag, full):
        return {"tag": tag}

    def destroy(self):
        pass


class Master:
    def __init__(self):
        self.accepted = []

    def accept_key(self, pub, key_id):
        self.accepted.append(key_id)

    def listen(self):
        return Listener()


@pytest.mark.skipif(
    libvirt.getVersion() < 10_000_000,
    reason="libvirt 9's test driver has no virDomainUpdateDeviceFlags (the seed's eject)",
)
def test_the_seed_carries_the_install_and_the_minion_start_is_awaited(
    conn,
    pool,
    base,
    uploads,  # noqa: F811 - the fixture imported above
):
    s = build_spec(
        {
            "name": "vm1",
            "base_domain": "base",
            "clone_strategy": "quick",
            "virt_type": "auto",
            "deploy_method": "cloud-init",
            "salt_source": "http://192.0.2.1:8000/wheels/",
            "salt_version": "3008.3",
        }
    )
    plan = minion_plan()
    plan.salt_source = s.deploy.salt_source
    data = cloud_deploy.seed_iso(s, plan, None)
    master = Master()
    guest, deployed = cloud_deploy.create(master, conn, s, plan, data, Rollback(), lambda *a: None)
    assert deployed == {"method": "cloud-init", "minion_id": "vm1"}
    assert master.accepted == ["vm1"] and "minion" in guest.timings
    # The seed the guest booted with (ejected and deleted since) held the install.
    (iso,) = uploads.values()
    _, files = read_iso(iso)
    config = yaml.safe_load(files["user-data"])
    written = {f["path"]: f["content"] for f in config["write_files"]}
    assert json.loads(written[saltsource.SOURCE_FILE]) == {
        "kind": "wheelhouse",
        "url": "http://192.0.2.1:8000/wheels/",
        "agent": False,
        "version": "3008.3",
    }
    assert written[saltsource.INSTALLER] == saltsource.INSTALLER_TEXT
    pool.refresh(0)
    assert [v.name() for v in pool.listAllVolumes() if "seed" in v.name()] == []


def test_a_guest_that_reports_a_failure_before_it_has_an_address_ends_the_create(
    conn, pool, base, monkeypatch
):
    # ip_source qemu-agent on a stock image: the seed installs the agent; when
    # that fails the guest never has an address through it, and its start
    # script says why on its console / in its status file. The create ends
    # with that cause, not after wait_for_ip_timeout.
    from salt_kvm.cloud import addresses
    from salt_kvm.errors import SaltKvmError
    from salt_kvm.virt import guestagent

    s = build_spec(
        {
            "name": "vm1",
            "base_domain": "base",
            "clone_strategy": "quick",
            "virt_type": "auto",
            "deploy_method": "cloud-init",
            "wait_for_ip_timeout": 30,
        }
    )
    plan = minion_plan()
    monkeypatch.setattr(addresses, "lookup", lambda *a, **k: [])
    monkeypatch.setattr(
        guestagent,
        "read_file",
        lambda dom, path: "failed:installing the guest agent failed: apt-get: 404",
    )
    rollback = Rollback()
    with pytest.raises(SaltKvmError, match="installing the guest agent failed: apt-get: 404"):
        with rollback:
            cloud_deploy.create(Master(), conn, s, plan, None, rollback, lambda *a: None)
    assert "vm1" not in [d.name() for d in conn.listAllDomains()]
