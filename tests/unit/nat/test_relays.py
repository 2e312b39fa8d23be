"""Which forwards get a userspace relay, the systemd unit that runs one, and
that the forwards' own code path starts and stops them (a recorder stands in
for the runner: tests/conftest.py)."""

import pytest

from salt_kvm.nat import firewall, forwards, relays
from salt_kvm.nat import rules as nat
from salt_kvm.nat.store import Placement, Store

from .test_safety import Kernel

R = nat.Rule
V4 = Placement("net1", "virbr1", "192.168.214.0/24", "192.168.214.11", "52:54:00:00:00:01")
DUAL = Placement(
    "net1",
    "virbr1",
    "192.168.214.0/24",
    "192.168.214.11",
    "52:54:00:00:00:01",
    "fd00:214::11",
    "fd00:214::/64",
)
BRIDGE6 = {"virbr1": ["fd00:214::1"]}
RUNNER = relays.runner  # the real one: the autouse fixture replaces it during tests


def forward(rule, place=V4, domain="vm1"):
    return nat.Forward(
        domain, rule, place.address, place.bridge, place.subnet, place.address6, place.subnet6
    )


def test_a_default_tcp_forward_gets_ipv6_loopback_to_the_guests_ipv4():
    assert relays.planned([forward(R(22, 10022), DUAL)], BRIDGE6) == [
        relays.Relay("vm1", "::1", 10022, "192.168.214.11", 22)
    ]


def test_an_ipv4_only_guest_also_gets_its_networks_ipv6_host_address():
    assert relays.planned([forward(R(22, 10022))], BRIDGE6) == [
        relays.Relay("vm1", "::1", 10022, "192.168.214.11", 22),
        relays.Relay("vm1", "fd00:214::1", 10022, "192.168.214.11", 22),
    ]
    # a bridge without IPv6: loopback only
    assert [r.listen for r in relays.planned([forward(R(22, 10022))], {})] == ["::1"]


@pytest.mark.parametrize(
    ("rule", "listens"),
    [
        (R(53, 10053, "udp"), []),  # TCP only
        (R(22, 10022, "tcp", "192.0.2.10"), []),  # one IPv4 address: no IPv6 at all
        (R(22, 10022, "tcp", "127.0.0.2"), []),
        (R(22, 10022, "tcp", nat.EVERY), ["::1"]),  # every address: loopback too, not published
    ],
)
def test_which_rules_are_relayed(rule, listens):
    assert [r.listen for r in relays.planned([forward(rule)], BRIDGE6)] == listens


def test_a_relay_is_named_by_everything_in_it():
    one = relays.Relay("vm 1", "::1", 10022, "192.168.214.11", 22)
    assert one.name.startswith("salt-kvm-relay-vm_1-10022-")
    assert one.name != relays.Relay("vm 1", "::1", 10022, "192.168.214.12", 22).name
    assert one.name == relays.Relay("vm 1", "::1", 10022, "192.168.214.11", 22).name


def test_the_systemd_unit_binds_exactly_the_address_and_runs_unprivileged():
    relay = relays.Relay("vm1", "::1", 10022, "192.168.214.11", 22)
    argv = relays.systemd_run_argv(relay, "/usr/lib/systemd/systemd-socket-proxyd", 8)
    assert argv[0] == "systemd-run" and f"--unit={relay.name}" in argv
    assert "--socket-property=ListenStream=[::1]:10022" in argv
    assert "--socket-property=BindIPv6Only=ipv6-only" in argv
    assert {"--property=DynamicUser=yes", "--property=NoNewPrivileges=yes"} <= set(argv)
    assert "--property=CapabilityBoundingSet=" in argv
    # the proxy and its one target, no shell
    assert argv[argv.index("--") + 1 :] == [
        "/usr/lib/systemd/systemd-socket-proxyd",
        "--connections-max=8",
        "192.168.214.11:22",
    ]


def test_systemd_is_used_only_where_it_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(relays, "SYSTEMD_MARKER", tmp_path / "absent")
    monkeypatch.delenv("SALT_KVM_RELAY_DIR", raising=False)
    assert relays.systemd_proxyd() is None
    assert isinstance(RUNNER(), relays.Supervised)
    monkeypatch.setattr(relays, "SYSTEMD_MARKER", tmp_path)
    proxyd = tmp_path / "systemd-socket-proxyd"
    proxyd.write_text("")
    monkeypatch.setattr(relays, "PROXYD", (str(proxyd),))
    monkeypatch.setattr(relays.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert relays.systemd_proxyd() == str(proxyd)
    assert isinstance(RUNNER(), relays.Systemd)


def test_bridge_addresses6_reads_the_global_ones(monkeypatch):
    out = (
        '[{"ifname":"virbr1","addr_info":[{"family":"inet6","local":"fd00:214::1"},'
        '{"family":"inet6","local":"fd00:214::9","tentative":true}]},'
        '{"ifname":"eth0","addr_info":[{"family":"inet6","local":"2001:db8::2"}]}]'
    )

    class Proc:
        stdout = out

    monkeypatch.undo()  # the real function, not the autouse stand-in
    monkeypatch.setattr(firewall, "_run", lambda *a, **k: Proc())
    assert firewall.bridge_addresses6({"virbr1"}) == {"virbr1": ["fd00:214::1"]}
    assert firewall.bridge_addresses6(set()) == {}


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    return Kernel(tmp_path, monkeypatch)


def test_forwards_start_and_stop_their_relays(kernel, tmp_path, relay_runner):
    store = Store(tmp_path / "nat.json")
    forwards.apply(None, "vm1", [22, {"guest": 53, "proto": "udp"}], store=store, placement=DUAL)
    relay = relays.Relay("vm1", "::1", 10022, "192.168.214.11", 22)
    assert relay_runner.running() == {relay.name}
    forwards.reapply(store)  # a hook: nothing new
    assert relay_runner.started == [relay]
    assert forwards.listing(store=store)["vm1"]["relays"] == [
        {"listen": "[::1]:10022", "to": "192.168.214.11:22", "running": True}
    ]
    relay_runner.stop(relay.name)  # died: shown, and started again by the next reapply
    assert forwards.listing(store=store)["vm1"]["relays"][0]["running"] is False
    forwards.reapply(store)
    assert relay_runner.running() == {relay.name}
    forwards.forget("vm1", store)  # salt-cloud -d, the qemu release hook
    assert relay_runner.running() == set()


def test_a_relay_that_cannot_start_refuses_the_forward_and_changes_nothing(
    kernel, tmp_path, relay_runner, monkeypatch
):
    from salt_kvm.errors import SaltKvmError

    store = Store(tmp_path / "nat.json")

    def busy(relay):
        raise SaltKvmError(f"relay {relay}: cannot listen: address in use")

    monkeypatch.setattr(relay_runner, "start", busy)
    with pytest.raises(SaltKvmError, match="cannot listen"):
        forwards.apply(None, "vm1", [22], store=store, placement=V4)
    assert store.load() == {} and "vm1" not in kernel.script
