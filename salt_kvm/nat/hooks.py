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
  (transient, or undefined while running): drop its forwards, unless it was
  migrated to another host on a bridged segment (``moved_to`` in the state
  file): its forwards stay here and still reach it.

Hooks must not call libvirtd (it waits for them): they work from the state
file only. The hook files themselves are small ``/bin/sh`` scripts
(``hookscript``) that run ``main`` below with salt-kvm's Python; a hook always
exits 0 so it never blocks a network or a guest, and problems go to a
root-only log that ``kvm_nat.list`` shows. libvirtd looks for hook scripts
when it starts: ``hookscript.status`` says whether the running one does.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import salt_kvm
from salt_kvm.nat import firewall as hostnet
from salt_kvm.nat import forwards
from salt_kvm.nat import hookfiles as hookscript
from salt_kvm.nat.store import Store

log = logging.getLogger(__name__)

HOOKS_DIR = hookscript.HOOKS_DIR
HOOK_NAME = hookscript.HOOK_NAME
DRIVERS = hookscript.DRIVERS
QEMU_CONFIG = Path("/etc/libvirt/qemu")
LOG_FILE = hookscript.LOG_FILE


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
    entry = store.load().get(name) if operation == "release" else None
    if entry is not None and not entry.moved_to:  # migrated away: the forwards stay
        if not (QEMU_CONFIG / f"{name}.xml").exists():
            forwards.forget(name, store)
            return [f"forgot {name}"]
    return []


HANDLERS = {"network": on_network, "qemu": on_qemu}


def main(
    driver: str, argv: list[str], state: str | None = None, log_file: str | None = None
) -> int:
    """The hook's body. Always 0: a forward must never stop a guest or network."""
    try:
        sys.stdin.read()  # libvirt writes the object's XML; take it all
    except (OSError, ValueError):
        pass
    os.umask(0o077)
    try:
        _log_to(Path(log_file or LOG_FILE))
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
        log.error("%s %s %s: %s", driver, name, operation, exc)
    return 0


def _log_to(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def problems(names: set[str], log_file: Path | str | None = None, last: int = 5) -> list[str]:
    """The hook log's latest errors about any of ``names`` (domains, networks)."""
    path = Path(log_file or LOG_FILE)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found = [
        line
        for line in lines
        if " ERROR " in line and names & set(line.split(" ERROR ", 1)[1].split()[:3])
    ]
    return found[-last:]


def install(
    hooks_dir: Path | str = HOOKS_DIR,
    state: Path | str | None = None,
    test: bool = False,
    conf: Path | str | None = None,
    log: Path | str = LOG_FILE,
) -> list[str]:
    """Write hook.conf (this Python, this package) and the sh hooks (idempotent);
    returns the files written (or, with ``test``, that would be)."""
    package_parent = str(Path(salt_kvm.__file__).resolve().parent.parent)
    return hookscript.install(
        sys.executable, package_parent, Store(state).path, hooks_dir, conf, log, test
    )


def installed(hooks_dir: Path | str = HOOKS_DIR) -> dict[str, bool]:
    return {d: (Path(hooks_dir) / f"{d}.d" / HOOK_NAME).exists() for d in DRIVERS}
