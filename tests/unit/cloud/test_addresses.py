import libvirt
import pytest

from salt_kvm.cloud import addresses
from salt_kvm.errors import SpecError, TimeoutError_


@pytest.mark.parametrize(
    "addr,ok",
    [
        ("192.168.1.5", True),
        ("169.254.3.4", False),
        ("fe80::1%eth0", False),
        ("127.0.0.1", False),
        ("2001:db8::5", True),
        ("garbage", False),
        ("0.0.0.0", False),
    ],
)
def test_usable(addr, ok):
    assert addresses.usable(addr) is ok


def test_check_source_accepts_3007_names_and_aliases():
    assert addresses.check_source("ip-learning") == "ip-learning"
    assert addresses.check_source("lease") == "ip-learning"
    assert addresses.check_source("qemu-agent") == "qemu-agent"
    with pytest.raises(SpecError) as err:
        addresses.check_source("dhcp")
    assert err.value.key == "ip_source" and "qemu-agent" in err.value.accepted


class FakeDomain:
    """Answers interfaceAddresses like libvirt does, per source."""

    def __init__(self, answers, active=True, state=libvirt.VIR_DOMAIN_RUNNING):
        self.answers = answers
        self.active = active
        self._state = state if active else libvirt.VIR_DOMAIN_SHUTOFF

    def interfaceAddresses(self, source, flags):  # noqa: N802 - libvirt's name
        answer = self.answers.get(source)
        if isinstance(answer, Exception):
            raise answer
        return answer or {}

    def isActive(self):  # noqa: N802
        return self.active

    def state(self):
        return self._state, 0

    def name(self):
        return "vm1"


def iface(mac, *addrs):
    return {"hwaddr": mac, "addrs": [{"addr": a, "prefix": 24, "type": t} for a, t in addrs]}


V4, V6 = libvirt.VIR_IP_ADDR_TYPE_IPV4, libvirt.VIR_IP_ADDR_TYPE_IPV6


def test_only_our_mac_and_ipv4_first():
    dom = FakeDomain(
        {
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE: {
                "vnet0": iface("52:54:00:00:00:02", ("10.0.0.9", V4)),
                "vnet1": iface(
                    "52:54:00:00:00:01", ("2001:db8::1", V6), ("169.254.1.1", V4), ("10.0.0.5", V4)
                ),
            }
        }
    )
    assert addresses.lookup(dom, "ip-learning", ["52:54:00:00:00:01"]) == [
        "10.0.0.5",
        "2001:db8::1",
    ]


def test_auto_falls_back_from_lease_to_agent_to_arp():
    err = libvirt.libvirtError("Guest agent is not responding")
    dom = FakeDomain(
        {
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE: {},
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT: err,
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP: {
                "vnet0": iface("52:54:00:00:00:01", ("10.1.1.1", V4))
            },
        }
    )
    assert addresses.lookup(dom, "auto", ["52:54:00:00:00:01"]) == ["10.1.1.1"]


def test_wait_times_out_with_a_clear_message():
    now = [0.0]
    dom = FakeDomain({})
    with pytest.raises(TimeoutError_, match="no IP address from ip-learning within 5s"):
        addresses.wait_for_addresses(
            dom,
            "ip-learning",
            5,
            0.5,
            ["52:54:00:00:00:01"],
            clock=lambda: now[0],
            sleep=lambda s: now.__setitem__(0, now[0] + s),
        )
    assert now[0] == pytest.approx(5.0)


def test_wait_stops_when_the_guest_dies():
    dom = FakeDomain({}, active=False)
    with pytest.raises(TimeoutError_, match="stopped"):
        addresses.wait_for_addresses(
            dom, "ip-learning", 5, macs=["52:54:00:00:00:01"], sleep=lambda s: None
        )


def test_wait_stops_at_once_when_the_guest_pauses_and_suggests_tcg():
    dom = FakeDomain({}, state=libvirt.VIR_DOMAIN_PAUSED)
    with pytest.raises(TimeoutError_, match="paused.*virt_type: qemu"):
        addresses.wait_for_addresses(
            dom,
            "ip-learning",
            600,
            macs=["52:54:00:00:00:01"],
            sleep=lambda s: pytest.fail("should not wait"),
        )


def test_wait_asks_the_check_now_and_then_and_stops_with_its_error():
    # A guest that reports it cannot come up (its agent install failed, say)
    # ends the wait with that cause, not at the timeout.
    now = [0.0]
    asked = []

    def check():
        asked.append(now[0])
        if now[0] >= 4:
            raise RuntimeError("the guest says: installing the agent failed")

    with pytest.raises(RuntimeError, match="installing the agent failed"):
        addresses.wait_for_addresses(
            FakeDomain({}),
            "ip-learning",
            600,
            0.5,
            ["52:54:00:00:00:01"],
            clock=lambda: now[0],
            sleep=lambda s: now.__setitem__(0, now[0] + s),
            check=check,
            check_every=2.0,
        )
    assert asked == [2.0, 4.0]


def test_wait_can_ask_for_an_ipv4_address_beside_an_early_ipv6_one():
    # A dual-stack network may lease IPv6 first; nat_rules forward to the
    # guest's IPv4 address, so such a create waits for that one too.
    v6 = {"vnet0": iface("52:54:00:00:00:01", ("fd00::5", V6))}
    both = {
        "vnet0": iface(
            "52:54:00:00:00:01",
            ("fd00::5", V6),
            ("10.1.1.5", V4),
        )
    }
    answers = [v6, v6, both]
    dom = FakeDomain({libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE: None})
    dom.interfaceAddresses = lambda source, flags=0: (
        answers.pop(0) if len(answers) > 1 else answers[0]
    )
    found = addresses.wait_for_addresses(
        dom,
        "ip-learning",
        60,
        0.5,
        ["52:54:00:00:00:01"],
        sleep=lambda s: None,
        accept=addresses.has_ipv4,
    )
    assert "10.1.1.5" in found and answers == [both]
