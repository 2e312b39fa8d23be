"""A takeover: a guest whose host is gone comes up on this host from its replica.

One call on the surviving host: the newest point of the guest's replica that
verifies (every image of its chain against its checksum and header; newer
points that do not are skipped, each named with why) is restored under the
guest's own name, with its UUID and MACs kept and its disks as they were (so
the minion's id and keys), and started. ``restore`` rolls back what it made
when any step fails, the start included.

Two copies of one guest (one MAC, one minion key) must never run at once, so
the other hosts are asked first, each with a short timeout: a host where the
guest runs refuses the takeover unless ``force=True``; a host that does not
answer (the lost one, usually) does not block it and is named in the result.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import libvirt

from salt_kvm import redact
from salt_kvm.backup import restore as restoring
from salt_kvm.backup import store as bs
from salt_kvm.errors import ConflictError, SaltKvmError, SpecError
from salt_kvm.virt import names

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


def latest_verified(store: bs.Store) -> tuple[bs.Point, dict[str, str]]:
    """The newest point whose whole chain verifies, and the newer point folders
    skipped on the way (with why). None verifies: refused, naming each."""
    points, bad = store.scan()
    skipped = {folder: str(exc) for folder, exc in bad.items()}
    for point in reversed(points):
        try:
            found, _chain = restoring.checked_chain(store, point.id)
        except SaltKvmError as exc:
            skipped[point.id] = str(exc)
            continue
        newer = {k: v for k, v in skipped.items() if k > found.id}
        return found, dict(sorted(newer.items()))
    if not points and not bad:
        raise SaltKvmError(f"no backup of {store.domain} in {store.dest}")
    why = "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
    raise SaltKvmError(f"no backup point of {store.domain} in {store.dest} verifies ({why})")


def _open_within(uri: str, timeout: float) -> libvirt.virConnect:
    """``libvirt.open(uri)``, or ``TimeoutError`` after ``timeout`` seconds (a
    lost host's TCP or SSH connect can hang for minutes; the late connection,
    if it comes, is closed by its thread)."""
    result: dict[str, Any] = {}
    given_up = threading.Event()

    def connect() -> None:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            result["error"] = exc
            return
        if given_up.is_set():
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        else:
            result["conn"] = conn

    worker = threading.Thread(target=connect, name="salt-kvm-takeover-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        given_up.set()
        if "conn" not in result:
            raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["conn"]


def where_it_runs(name: str, peers: dict[str, str], timeout: float) -> dict[str, str]:
    """Ask each other host (name → libvirt URI) about domain ``name``:
    ``running``, ``defined, not running``, ``absent``, or ``no answer: ...``."""
    found: dict[str, str] = {}
    for host, uri in sorted(peers.items()):
        try:
            conn = _open_within(uri, timeout)
        except (libvirt.libvirtError, TimeoutError) as exc:
            found[host] = f"no answer: {redact.text(str(exc))}"
            continue
        try:
            dom = conn.lookupByName(name)
            found[host] = "running" if dom.isActive() else "defined, not running"
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                found[host] = "absent"
            else:
                found[host] = f"no answer: {redact.text(str(exc))}"
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
    return found


def check_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 300:
        raise SpecError("timeout", f"{value!r} is not a number of seconds", "0 < timeout <= 300")
    return float(value)


def takeover(
    conn: libvirt.virConnect,
    name: str,
    dest: str,
    peers: dict[str, str] | None = None,
    pool: str = "default",
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    start: bool = True,
) -> dict:
    """Bring ``name`` up here from its replica in ``dest`` (see the module).

    ``peers``: the other hosts (name → libvirt URI), asked first."""
    names.check_vm_name(name, "domain")
    timeout = check_timeout(timeout)
    if not isinstance(force, bool):
        raise SpecError("force", f"{force!r} is not a yes or no", "True, False")
    with contextlib.suppress(libvirt.libvirtError):
        conn.lookupByName(name)
        raise ConflictError(
            f"{name} is already defined on this host ({redact.url(conn.getURI())}): "
            "nothing to take over (kvm_backup.restore restores over it)"
        )
    elsewhere = where_it_runs(name, peers or {}, timeout)
    running = sorted(host for host, state in elsewhere.items() if state == "running")
    if running and not force:
        raise ConflictError(
            f"{name} still runs on {', '.join(running)}: a second copy would share its MACs "
            "and its minion key; refused (stop it there, or force=True when that host is "
            "being fenced)"
        )
    store = bs.Store(dest, name)
    point, skipped = latest_verified(store)
    for folder, why in skipped.items():
        log.warning("takeover of %s: skipped point %s: %s", name, folder, why)
    made = restoring.restore(
        conn, name, dest, point=point.id, target=name, pool=pool, start=start, new_identity=False
    )
    made.update(
        skipped=skipped,
        hosts=elsewhere,
        unreachable=sorted(h for h, s in elsewhere.items() if s.startswith("no answer")),
        forced=bool(running),
    )
    return made
