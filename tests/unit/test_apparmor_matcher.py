"""The AppArmor exec-rule matcher the hook tests rely on (tests/apparmor.py)."""

import pytest

from tests import apparmor

PROFILE = """#include <tunables/global>
@{LIBVIRT}="libvirt"
@{UUID}=[0-9a-f]*-[0-9a-f]*
profile libvirtd /usr/sbin/libvirtd flags=(attach_disconnected) {
  #include <abstractions/base>
  /** rwmkl,
  /bin/* PUx,
  /usr/bin/* PUx,
  /usr/sbin/virtlogd pix,
  /usr/sbin/* PUx,
  /usr/{lib,lib64,libexec}/xen/bin/* Ux,
  /usr/lib/libvirt/* PUxr,
  /usr/lib/libvirt/libvirt_iohelper ix,
  /etc/libvirt/hooks/** rmix,
  audit deny /{usr/,}sbin/apparmor_parser rwxl,
  change_profile -> @{LIBVIRT}-@{UUID},
  /usr/{lib,libexec}/qemu-bridge-helper Cx -> qemu_bridge_helper,
  profile qemu_bridge_helper {
   /opt/** ix,
  }
}
/usr/sbin/dnsmasq {
  /usr/sbin/dnsmasq mr,
}
"""


@pytest.mark.parametrize(
    "glob, path, hit",
    [
        ("/usr/bin/*", "/usr/bin/python3", True),
        ("/usr/bin/*", "/usr/bin/x/python3", False),  # * never crosses /
        ("/etc/libvirt/hooks/**", "/etc/libvirt/hooks/qemu.d/salt-kvm-nat", True),
        ("/etc/libvirt/hooks/**", "/etc/libvirt/hooksx", False),
        ("/{usr/,}sbin/tc", "/sbin/tc", True),
        ("/{usr/,}sbin/tc", "/usr/sbin/tc", True),
        ("/{usr/,}sbin/tc", "/usr/local/sbin/tc", False),
        ("/usr/{lib,lib64,lib/qemu}/helper", "/usr/lib/qemu/helper", True),
        ("/usr/{lib,{a,b}x}/h", "/usr/bx/h", True),  # nested braces
        ("/dev/sd[a-c]", "/dev/sdb", True),
        ("/dev/sd[a-c]", "/dev/sdd", False),
        ("/dev/sd[^a-c]", "/dev/sdd", True),
        ("/tmp/?", "/tmp/a", True),
        ("/tmp/?", "/tmp/ab", False),
        ("/tmp/a.b", "/tmp/axb", False),  # literal characters are literal
    ],
)
def test_glob(glob, path, hit):
    assert apparmor.glob_match(glob, path) is hit


def test_unbalanced_braces_are_an_error():
    with pytest.raises(ValueError):
        apparmor.glob_regex("/usr/{lib")


def load():
    profiles = apparmor.parse(PROFILE, apparmor.TUNABLES)
    return profiles[0], profiles


def test_profiles_and_their_own_exec_rules_only():
    libvirtd, profiles = load()
    assert [(p.name, p.attach) for p in profiles] == [
        ("libvirtd", "/usr/sbin/libvirtd"),
        ("/usr/sbin/dnsmasq", "/usr/sbin/dnsmasq"),
    ]
    # the child profile's '/opt/** ix' is not libvirtd's; '/** rwmkl' is no exec rule
    assert not any(r.glob.startswith("/opt") or r.glob == "/**" for r in libvirtd.rules)


@pytest.mark.parametrize(
    "path, allowed, confined",
    [
        ("/etc/libvirt/hooks/network.d/salt-kvm-nat", True, True),  # ix: stays confined
        ("/usr/sbin/salt-kvm-libvirt-hook", True, False),  # PUx, no profile: unconfined
        ("/usr/bin/python3.11", True, False),
        ("/opt/saltstack/salt/bin/python3.10", False, True),  # no rule: denied
        ("/usr/local/bin/python3", False, True),
        ("/usr/sbin/virtlogd", True, True),  # exact 'pix' beats '/usr/sbin/* PUx'
        ("/usr/lib/libvirt/libvirt_iohelper", True, True),
        ("/usr/sbin/apparmor_parser", False, True),  # deny beats '/usr/sbin/* PUx'
        ("/usr/lib/qemu-bridge-helper", True, True),  # Cx: a child profile
        ("/usr/lib/xen/bin/x", True, False),  # Ux
        ("/usr/sbin/dnsmasq", True, True),  # PUx and a profile attaches: confined there
    ],
)
def test_exec_outcomes(path, allowed, confined):
    libvirtd, profiles = load()
    outcome = apparmor.exec_outcome(libvirtd, path, profiles)
    assert (outcome.allowed, outcome.confined) == (allowed, confined), outcome.why


STRACE = """\
100 execve("/etc/libvirt/hooks/qemu.d/salt-kvm-nat", ["x"], 0x7ffc /* 1 var */) = 0
100 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|SIGCHLD <unfinished ...>
101 execve("/usr/local/sbin/mkdir", ["mkdir"], 0x55 /* 1 var */) = -1 ENOENT (No such file)
101 execve("/usr/bin/mkdir", ["mkdir"], 0x55 /* 1 var */) = 0
100 <... clone resumed>, child_tidptr=0x7f) = 101
100 execve("/usr/sbin/salt-kvm-libvirt-hook", ["l"], 0x55 /* 1 var */) = 0
100 clone3({flags=CLONE_VM, exit_signal=SIGCHLD}, 88) = 102
102 execve("/opt/saltstack/salt/bin/python3.10", ["p"], 0x55 /* 1 var */) = 0
"""


def test_strace_events_follow_forks_and_resumed_lines():
    first, events = apparmor.strace_events(STRACE)
    assert first == 100
    assert events[100] == [
        ("exec", "/etc/libvirt/hooks/qemu.d/salt-kvm-nat"),
        ("fork", 101),
        ("exec", "/usr/sbin/salt-kvm-libvirt-hook"),
        ("fork", 102),
    ]
    assert events[101] == [("exec", "/usr/bin/mkdir")]  # failed execs are not execs


def test_confined_execs_stop_at_the_unconfined_launcher():
    libvirtd, profiles = load()
    steps = apparmor.confined_execs(STRACE, libvirtd, profiles)
    assert [s.path for s in steps] == [
        "/etc/libvirt/hooks/qemu.d/salt-kvm-nat",
        "/usr/bin/mkdir",
        "/usr/sbin/salt-kvm-libvirt-hook",
    ]  # python3.10 runs under the unconfined launcher: not the profile's business
    assert all(s.outcome.allowed for s in steps)
    direct = STRACE.replace("/usr/sbin/salt-kvm-libvirt-hook", "/opt/saltstack/salt/bin/python3.10")
    denied = [
        s.path for s in apparmor.confined_execs(direct, libvirtd, profiles) if not s.outcome.allowed
    ]
    assert denied[0] == "/opt/saltstack/salt/bin/python3.10"
