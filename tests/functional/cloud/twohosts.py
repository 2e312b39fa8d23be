"""Two private test-driver hypervisors (hv1, hv2) and one that does not
answer (rack7) behind one provider: the fixtures the several-host tests share
(``hosts``, ``provider``, through this folder's conftest)."""

import libvirt
import pytest

from salt_kvm.cloud import fleet
from salt_kvm.clouds import libvirt as driver
from salt_kvm.virt.domain import new_domain

from ..conftest import NODE


class Kept:
    """A connection the code under test may close: the test's stays open (a
    test:///file host is a fresh copy per connection)."""

    def __init__(self, conn):
        self._conn = conn

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def close(self):
        return 0


def guest(conn, name, memory=256, running=False, network="default", managed=True):
    xml = new_domain(name, "test", memory, 1, f"/default-pool/{name}.qcow2", networks=(network,))
    if managed:
        xml.set_managed_info({"base": "base", "strategy": "quick", "volumes": []})
    dom = conn.defineXML(xml.to_xml())
    if running:
        dom.create()
    return dom


@pytest.fixture
def hosts(monkeypatch):
    """hv1 and hv2 (test-driver hosts), and rack7 that does not answer."""
    opened = {
        "test:///hv1": libvirt.open(f"test://{NODE}"),
        "test:///hv2": libvirt.open(f"test://{NODE}"),
    }
    real = fleet.open_connection

    def connect(uri, **auth):
        if uri in opened:
            return Kept(opened[uri])
        return real(uri, **auth)

    monkeypatch.setattr(fleet, "open_connection", connect)
    yield {"hv1": opened["test:///hv1"], "hv2": opened["test:///hv2"]}
    for conn in opened.values():
        conn.close()


URIS = {"hv1": "test:///hv1", "hv2": "test:///hv2", "rack7": "test:///nonexistent/node.xml"}


@pytest.fixture
def provider(hosts, monkeypatch, tmp_path):
    conf = {"driver": "libvirt", "hosts": dict(URIS)}
    opts = {"providers": {"cluster": {"libvirt": conf}}, "cachedir": str(tmp_path)}
    monkeypatch.setattr(driver, "__opts__", opts, raising=False)
    monkeypatch.setattr(driver, "__active_provider_name__", "cluster:libvirt", raising=False)
    return conf
