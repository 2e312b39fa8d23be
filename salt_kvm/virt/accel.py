"""Whether KVM acceleration really works on a host, and which domain type ``auto`` means.

Two facts libvirt does not tell. First, whether QEMU's own user can open
``/dev/kvm``: libvirtd (root) reports KVM available, QEMU then fails with
"Could not access KVM kernel module: Permission denied", and libvirtd re-probes
QEMU's capabilities on every define (30-60 s each) — typical of hosts where no
udev applied its rule. Second, whether a KVM guest keeps running: with broken
nested virtualization its firmware runs but the boot code it loads stops the
guest at once ("KVM internal error ... emulation failure"). ``auto`` probes the
second by booting the guest's own disk (read-only) in a small guest with no
NIC for a few seconds, and keeps the answer per host in a root-only cache,
keyed by what would change it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import hashlib
import json
import logging
import os
import pwd
import re
import secrets
import stat
import tempfile
import time

import libvirt
from lxml import etree

from salt_kvm.errors import SpecError
from salt_kvm.virt.connection import VIRT_AUTO, VIRT_KVM, VIRT_QEMU, kvm_available, remote_host

log = logging.getLogger(__name__)

KVM_NODE = "/dev/kvm"
QEMU_CONF = "/etc/libvirt/qemu.conf"
DEFAULT_QEMU_USER = "libvirt-qemu"  # Debian's build default (qemu.conf's "user")
FIX = (
    "chgrp kvm /dev/kvm; chmod 0660 /dev/kvm (what udev's rule "
    'KERNEL=="kvm", GROUP="kvm", MODE="0660" does; add QEMU\'s user to group kvm)'
)
# Access states.
ACCESS_OK = "ok"
ACCESS_DENIED = "denied"
ACCESS_ABSENT = "absent"
ACCESS_UNKNOWN = "unknown"
# A KVM probe guest works when it keeps running until it has had this much CPU
# (wall time says little on a loaded host), or this long at most (a guest that
# booted and idles). Where nested KVM is broken it stops the guest in its boot:
# on some machines after ~1.5 s of CPU, on others only later (a guest ran 3.1 s
# of CPU, then paused at ~8 s: a 3 s bar took KVM for working there and every
# create with virt_type auto failed), so the bar is well past a kernel's boot.
PROBE_CPU_SECONDS = 20.0
PROBE_SECONDS = 45.0
PROBE_NAME_PREFIX = "salt-kvm-kvmprobe-"
PROBE_MEMORY_MIB = 256
# 2: the probe's bar went from 3 to 20 s of CPU; answers of the weaker probe are redone.
CACHE_VERSION = 2

_warned: set[str] = set()
# QEMU's words when KVM itself fails (not a path that happens to contain "kvm").
_ABOUT_KVM = re.compile(
    r"KVM kernel module|/dev/kvm|(initiali[sz]e|create|enable) KVM|KVM (internal error|is not)",
    re.IGNORECASE,
)


# ---- can QEMU's user open /dev/kvm? ---------------------------------------------


def _conf_value(text: str, key: str) -> str | None:
    match = re.search(rf'^\s*{key}\s*=\s*"([^"]*)"', text, re.MULTILINE)
    return match.group(1) if match else None


def _lookup_user(value: str) -> pwd.struct_passwd | None:
    """qemu.conf's forms: ``"name"``, ``"+UID"``, or a number that is a name or a UID."""
    try:
        if value.startswith("+"):
            return pwd.getpwuid(int(value[1:]))
        try:
            return pwd.getpwnam(value)
        except KeyError:
            return pwd.getpwuid(int(value)) if value.isdigit() else None
    except (KeyError, ValueError):
        return None


def _lookup_gid(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        if value.startswith("+"):
            return int(value[1:])
        return grp.getgrnam(value).gr_gid
    except (KeyError, ValueError):
        return int(value) if value.isdigit() else None


def qemu_identity(conf_path: str = QEMU_CONF) -> tuple[str, int, set[int]] | None:
    """QEMU's user on this host (qemu.conf's ``user``, else Debian's default),
    its UID and every GID its processes carry; None when the user is unknown."""
    try:
        with open(conf_path, encoding="utf-8", errors="replace") as conf:
            text = conf.read()
    except OSError:
        text = ""
    user = _lookup_user(_conf_value(text, "user") or DEFAULT_QEMU_USER)
    if user is None:
        return None
    gids = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    group = _lookup_gid(_conf_value(text, "group"))
    if group is not None:
        gids.add(group)
    return user.pw_name, user.pw_uid, gids


def node_access(node: str = KVM_NODE, identity: tuple[str, int, set[int]] | None = None) -> dict:
    """Whether ``identity`` (QEMU's user) can open ``node`` read-write, from the
    node's owner, group and mode: no root-only trick, nothing opened."""
    try:
        st = os.stat(node)
    except FileNotFoundError:
        return {"state": ACCESS_ABSENT, "node": node}
    except OSError as exc:
        return {"state": ACCESS_UNKNOWN, "node": node, "reason": str(exc)}
    mode = stat.S_IMODE(st.st_mode)
    owner = _name(pwd.getpwuid, st.st_uid, "pw_name")
    group = _name(grp.getgrgid, st.st_gid, "gr_name")
    facts = {"node": node, "owner": owner, "group": group, "mode": f"{mode:04o}"}
    if identity is None:
        return {**facts, "state": ACCESS_UNKNOWN, "reason": "QEMU's user is unknown"}
    user, uid, gids = identity
    facts["qemu_user"] = user
    if uid == 0:
        can = True
    elif st.st_uid == uid:
        can = mode & 0o600 == 0o600
    elif st.st_gid in gids:
        can = mode & 0o060 == 0o060
    else:
        can = mode & 0o006 == 0o006
    return {**facts, "state": ACCESS_OK if can else ACCESS_DENIED}


def _name(lookup, number: int, attr: str) -> str:
    try:
        return getattr(lookup(number), attr)
    except KeyError:
        return str(number)


def kvm_access(conn: libvirt.virConnect) -> dict:
    """Whether QEMU on ``conn``'s host can open /dev/kvm: ``state`` is ok, denied,
    absent or unknown (a remote host: its files are out of reach), with the fix
    in ``warning`` when denied. The warning is logged once per host per process."""
    if conn.getType() != "QEMU":
        return {"state": ACCESS_UNKNOWN, "node": KVM_NODE, "reason": "not a QEMU host"}
    host = remote_host(conn)
    if host is not None:
        return {
            "state": ACCESS_UNKNOWN,
            "node": KVM_NODE,
            "reason": f"{host} is a remote host: its /dev/kvm cannot be checked from here",
        }
    access = node_access(KVM_NODE, qemu_identity())
    if access["state"] == ACCESS_DENIED:
        access["warning"] = (
            f"QEMU's user {access['qemu_user']} cannot open {KVM_NODE} "
            f"({access['owner']}:{access['group']} {access['mode']}): guests cannot use KVM "
            "and libvirtd re-probes QEMU on every define (30-60 s each). "
            f"Fix: {FIX}"
        )
        key = f"{conn.getURI()} access"
        if key not in _warned:
            _warned.add(key)
            log.warning("%s: %s", conn.getURI(), access["warning"])
    return access


# ---- does a KVM guest keep running? ----------------------------------------------


def _probe_xml(name: str, disk: tuple[str, str]) -> str:
    dom = etree.Element("domain", type=VIRT_KVM)
    etree.SubElement(dom, "name").text = name
    etree.SubElement(dom, "memory", unit="MiB").text = str(PROBE_MEMORY_MIB)
    etree.SubElement(dom, "vcpu").text = "1"
    os_node = etree.SubElement(dom, "os")
    etree.SubElement(os_node, "type", arch="x86_64", machine="pc").text = "hvm"
    etree.SubElement(os_node, "boot", dev="hd")
    etree.SubElement(dom, "on_crash").text = "destroy"
    devices = etree.SubElement(dom, "devices")
    node = etree.SubElement(devices, "disk", type="file", device="disk")
    etree.SubElement(node, "driver", name="qemu", type=disk[1])
    etree.SubElement(node, "source", file=disk[0])
    etree.SubElement(node, "target", dev="vda", bus="virtio")
    # Read-only: QEMU takes a shared lock, as the quick clones standing on the
    # disk do (a <transient/> disk is opened writable first and collides).
    etree.SubElement(node, "readonly")
    etree.SubElement(devices, "memballoon", model="none")
    return etree.tostring(dom, encoding="unicode")


def probe_kvm(
    conn: libvirt.virConnect, disk: tuple[str, str], seconds: float | None = None
) -> tuple[bool | None, str]:
    """Boot ``disk`` ((path, format): the guest-to-be's own disk, read-only) in a
    transient ``type='kvm'`` guest with no NIC and watch it until it has had
    ``PROBE_CPU_SECONDS`` of CPU (or ``seconds``): paused or gone before means KVM
    does not work here. Returns (works, what was seen); works is
    None when the probe could not say (it did not start for a reason not about KVM)."""
    seconds = PROBE_SECONDS if seconds is None else seconds
    name = PROBE_NAME_PREFIX + secrets.token_hex(4)
    try:
        # AUTODESTROY: the probe dies with this connection, whatever happens to us.
        dom = conn.createXML(_probe_xml(name, disk), libvirt.VIR_DOMAIN_START_AUTODESTROY)
    except libvirt.libvirtError as exc:
        message = exc.get_error_message() or str(exc)
        if _ABOUT_KVM.search(message):  # "Could not access KVM kernel module: ..."
            return False, f"a KVM guest does not start: {message}"
        # Not about KVM (the disk is locked by a running guest, ...): no answer.
        return None, f"the KVM probe guest did not start: {message}"
    try:
        deadline = time.monotonic() + seconds
        while True:
            try:
                state, reason = dom.state()
                cpu = dom.info()[4] / 1e9
            except libvirt.libvirtError:
                return False, "a KVM guest stopped at once (it is gone)"
            if state != libvirt.VIR_DOMAIN_RUNNING:
                what = {libvirt.VIR_DOMAIN_PAUSED: "paused"}.get(state, f"state {state}")
                return False, (
                    f"a KVM guest stopped running after {cpu:.1f} s of CPU "
                    f"({what}, reason {reason})"
                )
            if cpu >= PROBE_CPU_SECONDS:
                return True, f"a KVM guest kept running ({cpu:.1f} s of CPU)"
            if time.monotonic() >= deadline:
                return True, f"a KVM guest kept running {seconds:g} s"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()


# ---- the per-host cache ----------------------------------------------------------


def default_cache_dir() -> str:
    if os.geteuid() == 0:
        return os.path.join(os.environ.get("SALT_KVM_CACHE", "/var/cache/salt-kvm"), "kvm-probe")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "salt-kvm", "kvm-probe")


def _private_dir(path: str) -> bool:
    """Make or check ``path``: a real directory of ours that no one else can write
    or read. A directory that is not is never trusted (the probe is redone)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        log.warning("KVM probe cache %s unusable: %s", path, exc)
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        log.warning(
            "KVM probe cache %s is not a private directory of uid %d (mode 0700): not used",
            path,
            os.geteuid(),
        )
        return False
    return True


def cache_key(conn: libvirt.virConnect) -> str:
    """What a probe's answer depends on: the host, its QEMU and libvirt versions,
    and (local hosts) the kernel and /dev/kvm's identity, owner and mode."""
    parts: list = [
        CACHE_VERSION,
        conn.getURI(),
        conn.getHostname(),
        conn.getVersion(),
        conn.getLibVersion(),
    ]
    if remote_host(conn) is None:
        try:
            st = os.stat(KVM_NODE)
            parts += [st.st_rdev, st.st_uid, st.st_gid, st.st_mode, st.st_ino]
        except OSError:
            parts.append(None)
        identity = qemu_identity()
        parts.append(os.uname().release)
        parts.append(identity and [identity[0], identity[1], sorted(identity[2])])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _read_cached(path: str) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, encoding="utf-8") as f:
            data = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("kvm_works"), bool):
        return None
    return {"kvm_works": data["kvm_works"], "detail": str(data.get("detail", ""))}


def _write_cached(directory: str, path: str, record: dict) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".probe-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot keep the KVM probe result in %s: %s", directory, exc)


# ---- which type ``auto`` means ---------------------------------------------------


@dataclasses.dataclass
class KvmVerdict:
    works: bool
    detail: str
    cached: bool


def kvm_works(
    conn: libvirt.virConnect, disk: tuple[str, str] | None, cache_dir: str | None = None
) -> KvmVerdict:
    """Whether KVM guests work on ``conn``'s host: libvirt offers KVM, QEMU's user
    can open /dev/kvm (checked first: a denied node fails in an instant, not after
    libvirt's minute of re-probing), and a probe guest keeps running. A probe's
    answer is kept per host in ``cache_dir`` (root-only) and reused. With no disk
    to boot and nothing cached, libvirt's word is taken (not cached)."""
    if not kvm_available(conn):
        return KvmVerdict(False, "libvirt offers no KVM on this host", False)
    access = kvm_access(conn)
    if access["state"] == ACCESS_DENIED:
        return KvmVerdict(False, access["warning"], False)
    directory = cache_dir or default_cache_dir()
    usable = _private_dir(directory)
    path = os.path.join(directory, f"probe-{cache_key(conn)}.json")
    cached = _read_cached(path) if usable else None
    if cached is not None:
        return KvmVerdict(cached["kvm_works"], cached["detail"], True)
    if disk is None:
        return KvmVerdict(True, "libvirt offers KVM (not probed: no disk to boot)", False)
    log.info("%s: probing whether a KVM guest keeps running", conn.getURI())
    works, detail = probe_kvm(conn, disk)
    if works is None:
        log.warning("%s: %s; taking libvirt's word that KVM works", conn.getURI(), detail)
        return KvmVerdict(True, detail, False)
    if usable:
        _write_cached(
            directory,
            path,
            {"kvm_works": works, "detail": detail, "uri": conn.getURI(), "when": time.time()},
        )
    return KvmVerdict(works, detail, False)


@dataclasses.dataclass
class VirtChoice:
    virt_type: str
    note: str | None = None  # why ``auto`` did not give kvm, for logs and the create's result


def choose_virt_type(
    conn: libvirt.virConnect,
    wanted: str,
    base_type: str | None,
    disk: tuple[str, str] | None = None,
    cache_dir: str | None = None,
) -> VirtChoice:
    """The domain type a new guest gets.

    ``auto`` keeps a base domain's ``qemu`` (its owner booted it that way); else it
    is ``kvm`` when KVM guests work here (see :func:`kvm_works`), otherwise
    ``qemu`` (TCG emulation) — said in a warning and in the returned note.
    ``disk`` ((path, format)) is what a probe boots: the new guest's base disk.
    """
    kvm_access(conn)  # a host QEMU cannot use /dev/kvm on is worth a warning whatever the type
    if wanted != VIRT_AUTO:
        if wanted == VIRT_KVM and not kvm_available(conn):
            raise SpecError(
                "virt_type", f"kvm is not available on {conn.getURI()}", ("qemu", "auto")
            )
        return VirtChoice(wanted)
    if base_type == VIRT_QEMU:
        return VirtChoice(VIRT_QEMU)
    verdict = kvm_works(conn, disk, cache_dir)
    if verdict.works:
        return VirtChoice(VIRT_KVM)
    note = f"virt_type auto: using qemu (TCG emulation) on {conn.getURI()}: {verdict.detail}" + (
        " (probe result cached)" if verdict.cached else ""
    )
    key = f"{conn.getURI()} fallback"
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", note)
    else:
        log.info("%s", note)
    return VirtChoice(VIRT_QEMU, note)
