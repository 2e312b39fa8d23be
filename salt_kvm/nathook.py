"""libvirt hooks that keep NAT forwards alive, and their installer.

libvirt runs ``/etc/libvirt/hooks/network.d/*`` and ``qemu.d/*`` (libvirt ≥ 6.5)
with ``<object> <operation> <phase> -`` and the object's XML on stdin:

- network ``started`` (a network start, every autostarted network at host boot):
  put the guests of our forwards back on the new bridge (libvirt leaves their
  taps off it after ``net-destroy``/``net-start``), set route_localnet on it,
  and restore the table if it is missing (after a reboot the kernel has none).
- qemu ``started`` / ``reconnect`` (a guest start; every running guest when
  libvirtd restarts): restore the table and the accept ahead of libvirt's rules.
- qemu ``release`` of a domain that has no persistent definition any more
  (transient, or undefined while running): drop its forwards.

Hooks must not call libvirtd (it waits for them): they work from the state
file only. A hook always exits 0 so it never blocks a network or a guest;
problems go to the log file. libvirtd looks for hook scripts when it starts:
after the first installation, restart it once.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from . import forwards, hostnet
from .natstore import Store

log = logging.getLogger(__name__)

HOOKS_DIR = Path("/etc/libvirt/hooks")
HOOK_NAME = "salt-kvm-nat"
DRIVERS = ("network", "qemu")
QEMU_CONFIG = Path("/etc/libvirt/qemu")
LOG_FILE = Path("/var/log/salt-kvm/nat-hook.log")


def on_network(name: str, operation: str, store: Store) -> list[str]:
    if operation != "started":
        return []
    entries = store.load()
    mine = {d for d, e in entries.items() if e.placement.network == name}
    done = [
        f"{tap} on {br}"
        for tap, br in hostnet.running_taps(name, mine)
        if hostnet.reattach(tap, br)
    ]
    return done + forwards.reapply(store)


def on_qemu(name: str, operation: str, store: Store) -> list[str]:
    if operation in ("started", "reconnect"):
        return forwards.reapply(store)
    if operation == "release" and name in store.load():
        if not (QEMU_CONFIG / f"{name}.xml").exists():
            forwards.forget(name, store)
            return [f"forgot {name}"]
    return []


HANDLERS = {"network": on_network, "qemu": on_qemu}


def main(driver: str, argv: list[str], state: str | None = None) -> int:
    """The hook script's body. Always 0: a forward must never stop a guest or network."""
    try:
        sys.stdin.read()  # libvirt writes the object's XML; take it all
    except (OSError, ValueError):
        pass
    try:
        LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(
            filename=str(LOG_FILE),
            level=logging.INFO,
            format="%(asctime)s %(process)d %(message)s",
        )
    except OSError:
        pass
    if len(argv) < 2:
        return 0
    name, operation = argv[0], argv[1]
    try:
        done = HANDLERS[driver](name, operation, Store(state))
        if done:
            log.info("%s %s %s: %s", driver, name, operation, ", ".join(done))
    except Exception as exc:  # noqa: BLE001 - report, never fail libvirt's operation
        log.error("%s %s %s failed: %s", driver, name, operation, exc)
    return 0


def _script(driver: str, state: Path) -> str:
    package_parent = Path(__file__).resolve().parent.parent
    return (
        f"#!{sys.executable}\n"
        "# salt-kvm: keeps NAT port forwards alive (see salt-kvm's docs/nat.rst).\n"
        "# Written by kvm_nat.install_hooks; libvirtd reads hooks when it starts.\n"
        "import sys\n"
        f"sys.path.insert(0, {str(package_parent)!r})\n"
        "try:\n"
        "    from salt_kvm import nathook\n"
        "except Exception as exc:  # never block libvirt: a hook failure stops the guest\n"
        "    print(f'salt-kvm NAT hook not loaded: {exc}', file=sys.stderr)\n"
        "    sys.exit(0)\n"
        f"sys.exit(nathook.main({driver!r}, sys.argv[1:], state={str(state)!r}))\n"
    )


def install(
    hooks_dir: Path | str = HOOKS_DIR, state: Path | str | None = None, test: bool = False
) -> list[str]:
    """Write the hook scripts (idempotent); returns the files written (or, with
    ``test``, that would be)."""
    hooks_dir = Path(hooks_dir)
    state = Store(state).path
    written = []
    for driver in DRIVERS:
        path = hooks_dir / f"{driver}.d" / HOOK_NAME
        text = _script(driver, state)
        if path.exists() and path.read_text() == text and os.access(path, os.X_OK):
            continue
        written.append(str(path))
        if test:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(path)
    return written


def installed(hooks_dir: Path | str = HOOKS_DIR) -> dict[str, bool]:
    return {d: (Path(hooks_dir) / f"{d}.d" / HOOK_NAME).exists() for d in DRIVERS}
