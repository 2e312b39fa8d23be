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


@pytest.mark.parametrize(
    "address,dual,v4_only",
    [
        ("fd99::7", [], ["fd99::7"]),  # DNAT to a dual-stack guest; a relay to an IPv4-only one
        (nat.EVERY6, ["::1"], ["::"]),  # every IPv6 address: one socket on [::] covers ::1 too
        ("::1", ["::1"], ["::1"]),  # never DNATed
    ],
)
def test_an_ipv6_host_address_is_relayed_for_ipv4_only_guests(address, dual, v4_only):
    rule = R(22, 10022, "tcp", address)
    assert [r.listen for r in relays.planned([forward(rule, DUAL)], BRIDGE6)] == dual
    assert [r.listen for r in relays.planned([forward(rule)], BRIDGE6)] == v4_only


@pytest.mark.parametrize("listen", ["fd99::7", "::", "::1"])
def test_relays_are_found_again_by_exact_name_whatever_the_address(listen, tmp_path):
    """kvm_nat.list's ``running`` and reapply's dead-relay detection match a
    relay by its name, which has no address in it (brackets and colons never
    reach a match), and the command line by whole arguments."""
    relay = relays.Relay("vm1", listen, 10022, "192.168.214.11", 22)
    other = relays.Relay("vm1", "fd99::70", 10022, "192.168.214.11", 22)
    assert ":" not in relay.name and "[" not in relay.name and relay.name != other.name
    argv = relays.systemd_run_argv(relay, "/usr/lib/systemd/systemd-socket-proxyd", 8)
    assert f"--socket-property=ListenStream=[{listen}]:10022" in argv
    supervised = relays.Supervised(tmp_path)
    command = supervised.argv(relay, 3, 4)
    assert command[command.index("--name") + 1] == relay.name
    assert other.name not in command and relay.name.startswith(relays.PREFIX)


def test_forwards_on_a_host_ipv6_address(kernel, tmp_path, relay_runner, monkeypatch):
    monkeypatch.setattr(firewall, "local_addresses", lambda: {"127.0.0.1", "fd99::7", "::1"})
    store = Store(tmp_path / "nat.json")
    rules = [{"guest": 22, "host_address": "FD99::7"}]
    forwards.apply(None, "vm1", rules, store=store, placement=DUAL)
    assert "ip6 daddr fd99::7 tcp dport 10022" in kernel.script
    assert "ip daddr" not in kernel.script and relay_runner.running() == set()
    forwards.apply(None, "vm1", rules, store=store, placement=V4)  # its IPv6 lease gone
    assert "ip6 daddr fd99::7" not in kernel.script
    relay = relays.Relay("vm1", "fd99::7", 10022, "192.168.214.11", 22)
    assert relay_runner.running() == {relay.name}
    assert forwards.listing(store=store)["vm1"]["relays"] == [
        {"listen": "[fd99::7]:10022", "to": "192.168.214.11:22", "running": True}
    ]


@pytest.mark.parametrize("address", ["fd99::8", "2001:db8::1"])
def test_an_ipv6_address_the_host_does_not_have_is_refused_first(
    kernel, tmp_path, relay_runner, monkeypatch, address
):
    from salt_kvm.errors import SpecError

    monkeypatch.setattr(firewall, "local_addresses", lambda: {"127.0.0.1", "fd99::7", "::1"})
    store = Store(tmp_path / "nat.json")
    with pytest.raises(SpecError) as err:
        forwards.apply(
            None, "vm1", [{"guest": 22, "host_address": address}], store=store, placement=DUAL
        )
    assert err.value.key == "rules.host_address" and "::" in str(err.value)
    with pytest.raises(SpecError):
        forwards.check_free("vm1", [R(22, 10022, "tcp", address)], store)
    assert store.load() == {} and kernel.script == "" and relay_runner.started == []


def test_local_addresses_are_both_families(monkeypatch):
    out = (
        '[{"ifname":"lo","addr_info":[{"local":"127.0.0.1"},{"local":"::1"}]},'
        '{"ifname":"dummy0","addr_info":[{"local":"FD99::7"}]}]'
    )

    class Proc:
        stdout = out

    monkeypatch.setattr(firewall, "_run", lambda argv, **k: Proc())
    assert firewall.local_addresses() == {"127.0.0.1", "::1", "fd99::7"}


def test_an_ipv6_only_forward_is_shown_active_by_its_table_or_its_relay(
    kernel, tmp_path, relay_runner, monkeypatch
):
    monkeypatch.setattr(firewall, "local_addresses", lambda: {"127.0.0.1", "fd99::7"})
    store = Store(tmp_path / "nat.json")
    rules = [{"guest": 22, "host_address": "fd99::7"}]
    forwards.apply(None, "vm1", rules, store=store, placement=V4)
    assert forwards.listing(store=store)["vm1"]["forwards"][0]["active"] is True
    relay_runner.stop(next(iter(relay_runner.running())))
    assert forwards.listing(store=store)["vm1"]["forwards"][0]["active"] is False
