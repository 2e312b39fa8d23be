"""A libvirt NAT network on libvirt's nftables firewall backend, in private
namespaces (issue #18 item 2).

On these machines libvirt's nftables backend cannot start a network: for the
DHCP checksum fix-up it runs ``tc filter ... action csum`` and the kernel
lacks the act_csum module. So the test runs its OWN libvirtd (the installed
11.3 binary) inside new network, mount and PID namespaces:

- ``/etc/libvirt`` is a private folder with ``firewall_backend = "nftables"``
  and salt-kvm's hooks (``network.d``/``qemu.d``); ``/run/libvirt``,
  ``/var/lib/libvirt``, ``/var/cache/libvirt``, ``/var/log/libvirt`` are private
  too, and its pid file is inside ``/run/libvirt``: the host's libvirtd, its
  networks, guests and files are never touched;
- ``/usr/sbin/tc`` is bind-mounted (in that mount namespace only) over a stub
  that answers 0 to the ``csum`` filter and runs the real ``tc`` for
  everything else. Nothing else of libvirt's is replaced: the network, its
  bridge, dnsmasq and its nftables rules are libvirt's own.

"Guests" and an outside "client" are further network namespaces joined by
veth pairs; nothing leaves the namespaces. Killing the namespace's first
process ends every process in it (PID namespace).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

TC_STUB = """#!/bin/sh
# salt-kvm test stub, bind-mounted in a private mount namespace only: this
# kernel has no act_csum (libvirt's nftables backend uses it for DHCP replies).
for a in "$@"; do [ "$a" = csum ] && exit 0; done
exec {real} "$@"
"""

INNER = """set -e
R={root}
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run/libvirt
mount --bind $R/etc /etc/libvirt
mount --bind $R/varlib /var/lib/libvirt
mount --bind $R/cache /var/cache/libvirt
mount --bind $R/log /var/log/libvirt
mount --bind $R/tc-stub /usr/sbin/tc
ip link set lo up
libvirtd -d -p /run/libvirt/test-libvirtd.pid
for i in $(seq 100); do virsh -q -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
touch $R/ready
exec sleep infinity
"""


class Namespace:
    """A process holding a network namespace (and maybe more); commands run in it."""

    def __init__(self, proc: subprocess.Popen, pid: int, mount: bool):
        self.proc, self.pid, self.mount = proc, pid, mount

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", *(["-m"] if self.mount else []), *cmd]

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=120, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: {proc.stderr or proc.stdout}")
        return proc

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*cmd), **kw)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.kill()
        self.proc.wait(timeout=30)


def _child(pid: int) -> int:
    for _ in range(100):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError(f"unshare {pid} started no child")


def netns() -> Namespace:
    proc = subprocess.Popen(["unshare", "--net", "--fork", "--kill-child", "sleep", "infinity"])
    ns = Namespace(proc, _child(proc.pid), mount=False)
    ns.run("ip", "link", "set", "lo", "up")
    return ns


def private_libvirtd(root: Path, hooks: callable) -> Namespace:
    """libvirtd on the nftables backend in its own namespaces; ``hooks(hooks_dir)``
    writes the hooks it will run."""
    for sub in ("etc/hooks", "varlib", "cache", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "network.conf").write_text('firewall_backend = "nftables"\n')
    (root / "etc" / "libvirtd.conf").write_text(
        'log_filters="1:util.firewall 1:network"\n'
        'log_outputs="1:file:/var/log/libvirt/libvirtd.log"\n'
    )
    hooks(root / "etc" / "hooks")
    real = root / "tc.real"
    shutil.copy2("/usr/sbin/tc", real)
    stub = root / "tc-stub"
    stub.write_text(TC_STUB.format(real=real))
    stub.chmod(0o755)
    script = root / "inner.sh"
    script.write_text(INNER.format(root=root))
    proc = subprocess.Popen(
        ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "sh", str(script)],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "inner.err", "w"),  # noqa: SIM115 - the child keeps it
    )
    ns = Namespace(proc, _child(proc.pid), mount=True)
    for _ in range(300):
        if (root / "ready").exists():
            return ns
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    ns.stop()
    raise AssertionError(f"the private libvirtd did not start: {(root / 'inner.err').read_text()}")
