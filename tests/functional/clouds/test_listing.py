"""The driver's listings through its own functions, on libvirt's test driver."""

import contextlib

import pytest

from salt_kvm.clouds import libvirt as driver
from salt_kvm.virt.domain import new_domain


def test_list_nodes_min_and_full_leave_out_a_killed_create(conn, monkeypatch, tmp_path):
    for name in ("vm-ok", "vm-killed"):
        xml = new_domain(name, "test", 256, 1, f"/default-pool/{name}.qcow2")
        xml.set_managed_info({"base": "b", "strategy": "quick", "volumes": []})
        conn.defineXML(xml.to_xml())
    monkeypatch.setattr(driver, "__opts__", {"cachedir": str(tmp_path)}, raising=False)
    monkeypatch.setattr(driver, "_connect", lambda vm_=None: contextlib.nullcontext(conn))
    monkeypatch.setattr(driver.intent, "killed", lambda opts: ["vm-killed"])
    assert driver.list_nodes_min() == {"vm-ok": {"id": "vm-ok", "state": "stopped"}}
    assert set(driver.list_nodes_full()) == {"vm-ok"}
    with pytest.raises(driver.SaltCloudSystemExit, match="-f list_nodes_min"):
        driver.list_nodes_min(call="action")
