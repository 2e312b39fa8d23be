"""NAT safety (issue #13 items 6-7) against a fake kernel: route_localnet only
while the guard is loaded, read-modify-write under the lock, refusals."""

import re
import threading
import time

import pytest

from salt_kvm.errors import SpecError
from salt_kvm.nat import firewall, forwards
from salt_kvm.nat import rules as nat
from salt_kvm.nat.store import Placement, Store

R = nat.Rule
PLACE1 = Placement("net1", "virbr1", "192.168.214.0/24", "192.168.214.11", "52:54:00:00:00:01")
PLACE2 = Placement("net2", "virbr2", "192.168.215.0/24", "192.168.215.12", "52:54:00:00:00:02")
PUBLIC = "192.0.2.10"
FIREWALL_OK = {
    "backends": ["iptables"],
    "configured": None,
    "problem": None,
    "accept": {"iptables": True},
}


class Kernel:
    """What nft and the sysctls hold, and the order things were done in."""

    def __init__(self, tmp_path, monkeypatch, delay=0.0):
        self.script = ""
        self.events = []
        self.delay = delay
        self.sysctl = tmp_path / "conf"
        status = tmp_path / "network"
        status.mkdir()
        for bridge in ("virbr1", "virbr2", "virbr9"):
            (self.sysctl / bridge).mkdir(parents=True)
            (self.sysctl / bridge / "route_localnet").write_text("0\n")
            (status / f"{bridge}.xml").write_text(
                f"<networkstatus><network><bridge name='{bridge}'/></network></networkstatus>"
            )
        monkeypatch.setattr(firewall, "SYSCTL", self.sysctl)
        monkeypatch.setattr(firewall, "NETWORK_STATUS", status, raising=False)
        monkeypatch.setattr(firewall, "replace_table", self.replace)
        monkeypatch.setattr(firewall, "table_comments", self.comments)
        monkeypatch.setattr(firewall, "local_ports", lambda: set())
        monkeypatch.setattr(
            firewall, "local_addresses", lambda: {"127.0.0.1", PUBLIC}, raising=False
        )
        monkeypatch.setattr(firewall, "ensure_forward_accept", lambda: False)
        monkeypatch.setattr(firewall, "firewall", lambda: dict(FIREWALL_OK))
        monkeypatch.setattr(firewall, "running_taps", lambda *_: [])
        real = firewall.route_localnet

        def route_localnet(bridge, on=True):
            changed = real(bridge) if on else real(bridge, on)
            if changed:
                self.events.append((bridge, int(on), sorted(self.guards())))
            return changed

        monkeypatch.setattr(firewall, "route_localnet", route_localnet)

    def replace(self, script):
        time.sleep(self.delay)
        self.script = script
        self.events.append(("table", sorted(self.guards())))

    def flush(self):
        self.script = ""

    def comments(self, family="ip"):
        found = {}
        chain = None
        table = None
        for line in self.script.splitlines():
            match = re.match(r"table (\w+) ", line)
            if match:
                table = match.group(1)
            if table != family:
                continue
            match = re.match(r"\s*chain (\w+) \{", line)
            if match:
                chain = match.group(1)
            comment = re.search(r'comment "([^"]*)"', line)
            if comment and chain:
                found.setdefault(chain, []).append(comment.group(1))
        return found

    def guards(self):
        return {c[len(nat.GUARD) :] for c in self.comments().get("guard", [])}

    def localnet(self, bridge):
        return (self.sysctl / bridge / "route_localnet").read_text().strip()

    def exposed(self):
        """Bridges whose guests could reach the host's 127/8 now."""
        return {b for b in ("virbr1", "virbr2", "virbr9") if self.localnet(b) == "1"} - (
            self.guards()
        )


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    return Kernel(tmp_path, monkeypatch)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "nat.json")


# ---- item 6: route_localnet only while the guard is loaded ----------------------


def test_route_localnet_follows_the_forwards_and_the_guard(kernel, store):
    forwards.apply(None, "vm1", [22], store=store, placement=PLACE1)
    assert kernel.localnet("virbr1") == "1" and kernel.exposed() == set()
    # set after the table holding the bridge's guard
    assert kernel.events == [("table", ["virbr1"]), ("virbr1", 1, ["virbr1"])]
    kernel.events.clear()
    forwards.apply(None, "vm1", [], store=store)  # kvm_nat.absent / apply rules=[]
    assert kernel.localnet("virbr1") == "0" and kernel.exposed() == set()
    # reset BEFORE the table without the guard is loaded
    assert kernel.events == [("virbr1", 0, ["virbr1"]), ("table", [])]


@pytest.mark.parametrize("how", ["forget", "remove", "add-then-remove"])
def test_last_forward_gone_by_any_path_resets_route_localnet(kernel, store, how):
    forwards.apply(None, "vm1", [22], store=store, placement=PLACE1)
    forwards.apply(None, "vm2", [80], store=store, placement=PLACE2)
    if how == "forget":  # salt-cloud -d, the qemu release hook
        forwards.forget("vm1", store)
    elif how == "remove":
        forwards.remove(None, "vm1", 22, store=store)
    else:
        forwards.add(None, "vm1", 443, store=store, placement=PLACE1)
        forwards.remove(None, "vm1", 22, store=store)
        forwards.remove(None, "vm1", 443, store=store)
    assert kernel.localnet("virbr1") == "0"
    assert kernel.localnet("virbr2") == "1" and kernel.exposed() == set()


def test_a_public_address_only_forward_needs_no_route_localnet(kernel, store):
    forwards.apply(
        None, "vm1", [{"guest": 22, "host_address": PUBLIC}], store=store, placement=PLACE1
    )
    assert kernel.localnet("virbr1") == "0"
    assert kernel.guards() == {"virbr1"}


def test_flushed_table_then_reapply_keeps_the_order(kernel, store):
    forwards.apply(None, "vm1", [22], store=store, placement=PLACE1)
    kernel.flush()  # nft flush ruleset: route_localnet is still 1, the guard gone
    kernel.events.clear()
    forwards.reapply(store)  # what every hook runs
    assert kernel.events == [
        ("virbr1", 0, []),
        ("table", ["virbr1"]),
        ("virbr1", 1, ["virbr1"]),
    ]
    assert kernel.exposed() == set()


def test_a_bridge_left_open_by_older_code_is_closed_at_the_next_apply(kernel, store):
    (kernel.sysctl / "virbr9" / "route_localnet").write_text("1\n")
    forwards.apply(None, "vm1", [22], store=store, placement=PLACE1)
    assert kernel.localnet("virbr9") == "0" and kernel.exposed() == set()


# ---- item 7: targets, concurrency, refusals --------------------------------------


def test_concurrent_adds_both_persist(tmp_path, monkeypatch, store):
    Kernel(tmp_path, monkeypatch, delay=0.3)
    errors = []

    def add(port):
        try:
            forwards.add(None, "vm1", port, store=store, placement=PLACE1)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(p,)) for p in (22, 80)]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert forwards.current("vm1", store) == [R(22, 10022), R(80, 10080)]


@pytest.mark.parametrize("proto", ["UDP", "Udp", " udp"])
def test_proto_is_case_insensitive_everywhere(kernel, store, proto):
    forwards.add(None, "vm1", 53, host_port=5353, proto=proto, store=store, placement=PLACE1)
    assert forwards.current("vm1", store) == [R(53, 5353, "udp")]
    change = forwards.remove(None, "vm1", 53, proto=proto, store=store)
    assert change["new"] == [] and forwards.current("vm1", store) == []


@pytest.mark.parametrize("proto", ["sctp", "tcp6", 6, ["tcp"]])
def test_unknown_proto_is_refused_by_add_and_remove(kernel, store, proto):
    forwards.apply(None, "vm1", [53], store=store, placement=PLACE1)
    before = (store.path.read_text(), kernel.script)
    with pytest.raises(SpecError) as err:
        forwards.add(None, "vm1", 54, proto=proto, store=store, placement=PLACE1)
    assert err.value.key == "rule.proto" and "tcp, udp" in str(err.value)
    with pytest.raises(SpecError) as err:
        forwards.remove(None, "vm1", 53, proto=proto, store=store)
    assert err.value.key == "proto"
    assert (store.path.read_text(), kernel.script) == before


def test_remove_honours_the_configured_maximum(kernel, store):
    ports = list(range(1000, 1070))  # 70: more than the default 64
    forwards.apply(None, "vm1", ports, max_rules=100, store=store, placement=PLACE1)
    assert forwards.remove(None, "vm1", 1000, max_rules=100, store=store)["new"]
    assert len(forwards.current("vm1", store)) == 69
    with pytest.raises(SpecError, match="at most 69"):
        forwards.add(None, "vm1", 2000, max_rules=69, store=store, placement=PLACE1)


@pytest.mark.parametrize("address", ["198.51.100.7", "192.168.214.1 ", "10.0.0.1"])
def test_host_address_must_be_this_hosts(kernel, store, address):
    with pytest.raises(SpecError) as err:
        forwards.apply(
            None, "vm1", [{"guest": 22, "host_address": address}], store=store, placement=PLACE1
        )
    assert err.value.key == "rules.host_address"
    assert "not an address of this host" in str(err.value) and "0.0.0.0" in str(err.value)
    with pytest.raises(SpecError):
        forwards.add(None, "vm1", 22, host_address=address, store=store, placement=PLACE1)
    with pytest.raises(SpecError) as err:
        forwards.check_free("vm1", [R(22, 10022, "tcp", address.strip())], store)
    assert err.value.key == "nat_rules.host_address"
    assert not store.path.exists() and kernel.script == ""


def test_every_address_only_when_asked(kernel, store):
    forwards.apply(
        None, "vm1", [22, {"guest": 80, "host_address": "*"}], store=store, placement=PLACE1
    )
    assert forwards.current("vm1", store) == [R(22, 10022), R(80, 10080, "tcp", nat.EVERY)]
    pre = [line for line in kernel.script.splitlines() if "dnat" in line and "10022" in line]
    assert all("iifname" in line for line in pre[:1])  # default: not the public side
    assert any(
        "iifname" not in line and "10080" in line
        for line in kernel.script.splitlines()
        if "dnat" in line
    )


def test_undo_registered_before_the_write_restores_what_was(kernel, store):
    undo = forwards.undo_for("vm1", store)
    forwards.apply(None, "vm1", [22], store=store, placement=PLACE1)
    undo()
    assert forwards.current("vm1", store) == [] and kernel.localnet("virbr1") == "0"
    forwards.apply(None, "vm1", [22], store=store, placement=PLACE1)
    undo = forwards.undo_for("vm1", store)
    forwards.apply(None, "vm1", [22, 80], store=store, placement=PLACE1)
    undo()
    assert forwards.current("vm1", store) == [R(22, 10022)]


def test_an_apply_that_changes_nothing_still_closes_a_stray_bridge(kernel, store):
    forwards.apply(None, "vm1", [22], store=store, placement=PLACE1)
    (kernel.sysctl / "virbr9" / "route_localnet").write_text("1\n")
    assert forwards.apply(None, "vm1", [22], store=store, placement=PLACE1) == {}
    assert kernel.localnet("virbr9") == "0" and kernel.localnet("virbr1") == "1"
