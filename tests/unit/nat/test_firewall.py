"""NAT forwards on both of libvirt's firewall backends (issue #18 item 2),
against a fake kernel: salt-kvm's accept goes first into whichever forward
rules libvirt has in the kernel (iptables' LIBVIRT_FW* chains, nftables'
``ip libvirt_network`` table), once, found again by its comment; what cannot
work is refused with the reason and shown, never silently dead."""

import json
import shlex

import pytest

from salt_kvm.errors import ForwardsBlocked
from salt_kvm.nat import firewall, forwards
from salt_kvm.nat import rules as nat
from salt_kvm.nat.store import Store
from tests.unit.nat.test_safety import PLACE1, Kernel

LIBVIRT_JUMPS = ["jump guest_cross", "jump guest_input", "jump guest_output"]
OURS = firewall.ACCEPT_TAG
_real_ensure = firewall.ensure_forward_accept  # the fixtures below replace it


class FakeFirewall:
    """libvirt's forward rules as nft and iptables show them; the commands run."""

    def __init__(self, monkeypatch, tmp_path, nft=True, iptables=False, firewalld=False):
        self.nft_forward = (
            [{"handle": h, "expr": e} for h, e in enumerate(LIBVIRT_JUMPS, 1)] if nft else None
        )
        self.iptables = {"FORWARD": ["-j LIBVIRT_FWX", "-j LIBVIRT_FWI"]} if iptables else None
        self.firewalld = firewalld
        self.handle = 10
        self.nft_files = []
        self.binaries = {"nft", "iptables"}
        self.conf = tmp_path / "network.conf"
        proc = tmp_path / "proc"
        proc.mkdir()
        monkeypatch.setattr(firewall, "_run", self.run)
        monkeypatch.setattr(firewall, "NETWORK_CONF", self.conf)
        monkeypatch.setattr(firewall, "PROC", proc)
        monkeypatch.setattr(firewall.shutil, "which", lambda n: n if n in self.binaries else None)

    def configure(self, backend):
        self.conf.write_text(f'# libvirt\nfirewall_backend = "{backend}"  # chosen\n')

    # ---- the commands ----
    def run(self, cmd, data=None, check=True):
        out, rc = self._answer(cmd, data)
        if check and rc:
            raise firewall.SaltKvmError(f"{' '.join(cmd)} failed")
        return type("P", (), {"returncode": rc, "stdout": out, "stderr": ""})()

    def _answer(self, cmd, data):
        if cmd[0] == "nft":
            return self._nft(cmd[1:], data)
        if cmd[0] == "iptables":
            return self._iptables(cmd[4:])
        raise AssertionError(cmd)

    def _nft(self, args, data):
        if args[:2] == ["list", "table"] and args[2:] == ["inet", "firewalld"]:
            return "", 0 if self.firewalld else 1
        if "chain" in args and args[-3:] == ["ip", "libvirt_network", "forward"]:
            if self.nft_forward is None:
                return "", 1
            rules = [
                {"rule": {"chain": "forward", "handle": r["handle"], "expr": [],
                          **({"comment": r["comment"]} if "comment" in r else {})}}
                for r in self.nft_forward
            ]  # fmt: skip
            return json.dumps({"nftables": [{"chain": {}}, *rules]}), 0
        if args[:2] == ["-f", "-"]:
            self.nft_files.append(data)
            for line in data.splitlines():
                words = shlex.split(line)
                if words[:2] == ["delete", "rule"]:
                    self.nft_forward = [
                        r for r in self.nft_forward if r["handle"] != int(words[-1])
                    ]
                elif words[:2] == ["insert", "rule"]:
                    self.handle += 1
                    comment = words[words.index("comment") + 1]
                    self.nft_forward.insert(
                        0, {"handle": self.handle, "expr": line, "comment": comment}
                    )
            return "", 0
        raise AssertionError(args)

    def _iptables(self, args):
        chains = self.iptables
        if chains is None:
            return "", 1
        verb, chain = args[0], args[1]
        if verb == "-S":
            if chain == "LIBVIRT_FWI":
                return "-N LIBVIRT_FWI\n", 0
            if chain not in chains:
                return "", 1
            return "\n".join([f"-N {chain}", *(f"-A {chain} {r}" for r in chains[chain])]), 0
        rule = " ".join(args[2:] if verb != "-I" else args[3:])
        if verb == "-N":
            chains[chain] = []
        elif verb == "-C":
            return "", 0 if rule in chains.get(chain, []) else 1
        elif verb == "-A":
            chains[chain].append(rule)
        elif verb == "-I":
            chains[chain].insert(int(args[2]) - 1, rule)
        elif verb == "-D":
            chains[chain].remove(rule)
        return "", 0

    def comments(self):
        return [r.get("comment") for r in self.nft_forward]


@pytest.fixture
def fw(monkeypatch, tmp_path):
    return FakeFirewall(monkeypatch, tmp_path)


def test_nftables_backend_gets_our_accept_first_once(fw):
    state = firewall.firewall()
    assert state["backends"] == ["nftables"] and state["problem"] is None
    assert state["accept"] == {"nftables": False}
    assert firewall.ensure_forward_accept() is True
    assert fw.comments()[0] == OURS and fw.comments().count(OURS) == 1
    assert "ct mark and 0x100000 == 0x100000" in fw.nft_files[-1]
    assert f'comment "{OURS}"' in fw.nft_files[-1]
    assert firewall.ensure_forward_accept() is False  # idempotent: no nft write
    assert len(fw.nft_files) == 1
    assert firewall.firewall()["accept"] == {"nftables": True}


def test_nftables_accept_put_back_first_in_one_transaction(fw):
    firewall.ensure_forward_accept()
    # libvirt inserts its jumps at the head again (a net-start, a libvirtd start)
    ours = fw.nft_forward.pop(0)
    fw.nft_forward.append(ours)
    fw.nft_forward.insert(0, {"handle": 99, "expr": "jump guest_cross"})
    assert firewall.passable()[0] is False
    assert firewall.ensure_forward_accept() is True
    assert fw.comments()[0] == OURS and fw.comments().count(OURS) == 1
    last = fw.nft_files[-1].splitlines()
    assert last[0] == f"delete rule ip libvirt_network forward handle {ours['handle']}"
    assert last[1].startswith("insert rule ip libvirt_network forward ")
    assert firewall.passable() == (True, "accept first ahead of libvirt's nftables rules")


def test_iptables_backend_keeps_its_jump_first(monkeypatch, tmp_path):
    fw = FakeFirewall(monkeypatch, tmp_path, nft=False, iptables=True)
    assert firewall.firewall()["backends"] == ["iptables"]
    assert firewall.ensure_forward_accept() is True
    assert fw.iptables["FORWARD"][0] == f"-j {firewall.ACCEPT_CHAIN}"
    assert fw.iptables[firewall.ACCEPT_CHAIN] == [
        f"-m connmark --mark {nat.CT_MARK:#x}/{nat.CT_MARK:#x} -j ACCEPT"
    ]
    assert firewall.ensure_forward_accept() is False
    assert firewall.firewall()["accept"] == {"iptables": True}


def test_both_backends_rules_in_the_kernel_get_the_accept(monkeypatch, tmp_path):
    # A backend switch leaves the old backend's rules until libvirtd reloads them.
    fw = FakeFirewall(monkeypatch, tmp_path, nft=True, iptables=True)
    assert firewall.ensure_forward_accept() is True
    assert fw.comments()[0] == OURS
    assert fw.iptables["FORWARD"][0] == f"-j {firewall.ACCEPT_CHAIN}"
    assert firewall.passable()[0] is True


def test_no_libvirt_rules_yet_is_not_a_problem(monkeypatch, tmp_path):
    fw = FakeFirewall(monkeypatch, tmp_path, nft=False)
    fw.configure("nftables")
    assert firewall.firewall()["problem"] is None
    assert firewall.ensure_forward_accept() is False
    assert firewall.passable()[0] is True


@pytest.mark.parametrize(
    "setup, words",
    [
        ("unknown", ["firewall_backend 'pf'", "iptables, nftables"]),
        ("firewalld", ["firewalld is running"]),
        ("no-iptables", ["iptables command is missing"]),
        ("no-nft", ["nft command"]),
    ],
)
def test_what_cannot_work_is_refused_with_the_reason(monkeypatch, tmp_path, setup, words):
    fw = FakeFirewall(monkeypatch, tmp_path, nft=False, firewalld=setup == "firewalld")
    if setup == "unknown":
        fw.configure("pf")
    elif setup == "no-iptables":
        fw.configure("iptables")
        fw.binaries.discard("iptables")
    elif setup == "no-nft":
        fw.binaries.discard("nft")
    problem = firewall.forward_problem()
    assert problem and all(w in problem for w in words), problem
    with pytest.raises(ForwardsBlocked, match=words[0].split("'")[0]):
        firewall.ensure_forward_accept()
    assert firewall.passable() == (False, problem)


def test_a_blocked_host_refuses_new_forwards_and_changes_nothing(tmp_path, monkeypatch):
    kernel = Kernel(tmp_path, monkeypatch)
    store = Store(tmp_path / "nat.json")
    forwards.apply(None, "vm1", [22], store=store, placement=PLACE1)
    script = kernel.script
    blocked = {"backends": [], "configured": "pf", "problem": "firewall_backend 'pf'", "accept": {}}
    monkeypatch.setattr(firewall, "firewall", lambda: blocked)
    monkeypatch.setattr(firewall, "ensure_forward_accept", _real_ensure)
    for call in (
        lambda: forwards.apply(None, "vm2", [80], store=store, placement=PLACE1),
        lambda: forwards.add(None, "vm1", 443, store=store, placement=PLACE1),
        lambda: forwards.check_free("vm3", nat.parse_rules([8080])),
    ):
        with pytest.raises(
            ForwardsBlocked, match="cannot work on this host: firewall_backend 'pf'"
        ):
            call()
    assert kernel.script == script and list(store.load()) == ["vm1"]
    # A removal still goes through (the table shrinks); the hooks' reapply says why.
    forwards.remove(None, "vm1", 22, store=store)
    assert store.load() == {} and "vm1" not in kernel.script


def test_reapply_and_listing_say_when_forwards_cannot_pass(tmp_path, monkeypatch):
    Kernel(tmp_path, monkeypatch)
    store = Store(tmp_path / "nat.json")
    forwards.apply(None, "vm1", [22], store=store, placement=PLACE1)
    listed = forwards.listing(store=store)["vm1"]
    assert listed["forwards"][0]["active"] is True and "iptables" in listed["firewall"]
    blocked = {"backends": [], "configured": None, "problem": "firewalld is running", "accept": {}}
    monkeypatch.setattr(firewall, "firewall", lambda: blocked)
    monkeypatch.setattr(firewall, "ensure_forward_accept", _real_ensure)
    with pytest.raises(ForwardsBlocked, match="firewalld is running"):
        forwards.reapply(store)  # the hooks log this as an ERROR line
    listed = forwards.listing(store=store)["vm1"]
    assert listed["forwards"][0]["active"] is False
    assert listed["firewall"] == "firewalld is running"
    missing = {"backends": ["nftables"], "configured": None, "problem": None,
               "accept": {"nftables": False}}  # fmt: skip
    monkeypatch.setattr(firewall, "firewall", lambda: missing)
    listed = forwards.listing(store=store)["vm1"]
    assert listed["forwards"][0]["active"] is False and "kvm_nat.reapply" in listed["firewall"]


def test_configured_backend_reads_network_conf(tmp_path):
    conf = tmp_path / "network.conf"
    assert firewall.configured_backend(conf) is None
    conf.write_text('#firewall_backend = "iptables"\n')
    assert firewall.configured_backend(conf) is None
    conf.write_text('firewall_backend = "nftables"\n')
    assert firewall.configured_backend(conf) == "nftables"
    conf.write_text("firewall_backend='iptables' # here\n")
    assert firewall.configured_backend(conf) == "iptables"


def _kvm_nat_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "_modules" / "kvm_nat.py"
    spec = importlib.util.spec_from_file_location("kvm_nat_module_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__opts__, module.__pillar__ = {}, {}
    return module


def test_kvm_nat_shows_the_firewall_and_recent_hook_errors(tmp_path, monkeypatch):
    from salt_kvm.nat import hookfiles, hooks

    Kernel(tmp_path, monkeypatch)
    monkeypatch.setenv("SALT_KVM_NAT_STATE", str(tmp_path / "nat.json"))
    forwards.apply(None, "vm1", [22], store=Store(tmp_path / "nat.json"), placement=PLACE1)
    log = tmp_path / "hook.log"
    log.write_text(
        "2026-11-30 10:00:00 ERROR network net1 started: firewalld is running\n"
        "2026-11-30 10:00:01 ERROR network other started: not ours\n"
    )
    real = hooks.problems
    monkeypatch.setattr(hooks, "problems", lambda names, log_file=None, last=5: real(names, log))
    monkeypatch.setattr(hookfiles, "status", lambda *a: (True, "active (libvirtd runs them)"))
    mod = _kvm_nat_module()
    listed = mod.list_()
    assert listed["vm1"]["firewall"].startswith("accept first")
    assert listed["vm1"]["hook_errors"] == [log.read_text().splitlines()[0]]
    status = mod.hooks_status()
    assert status["firewall"]["passable"] is True and status["firewall"]["backends"] == ["iptables"]
    # apply/add answers carry the hooks' latest errors about the domain's network
    assert mod._hooks_warning({}, "vm1") == {"hook_errors": [log.read_text().splitlines()[0]]}
    blocked = {"backends": [], "configured": None, "problem": "firewalld is running", "accept": {}}
    monkeypatch.setattr(firewall, "firewall", lambda: blocked)
    status = mod.hooks_status()
    assert status["firewall"]["passable"] is False
    assert status["firewall"]["why"] == "firewalld is running"
