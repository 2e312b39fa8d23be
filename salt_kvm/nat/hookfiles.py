"""The libvirt hook files for NAT forwards, and whether libvirtd runs them.

Standard library only: ``scripts/setup-host`` runs this with the system's
``python3`` before salt-kvm's virtualenv exists, so the hooks are in place
before libvirtd first starts (it looks for hook scripts only when it starts).

The hooks are small ``/bin/sh`` scripts, not Python: a distribution's AppArmor
profile for libvirtd (Debian, Ubuntu) runs hook files inside the profile, and
that profile lets them execute programs in /usr/bin and /usr/sbin (unconfined)
but not an interpreter elsewhere (a Salt onedir's). So each hook only execs
the launcher ``/usr/sbin/salt-kvm-libvirt-hook`` (also sh), which hands over
to salt-kvm's Python named in a root-owned configuration file (``hook.conf``);
when that Python is missing or the file is not root's, it logs why to a
root-only log and exits 0: a forward must never stop a guest or a network.

    python3 -m salt_kvm.nat.hookfiles [--python P] [--path DIR] [--state FILE]
        writes the hooks, the launcher and hook.conf; prints the files written
    python3 -m salt_kvm.nat.hookfiles --status
        prints whether libvirtd runs the hooks (exit 0) or why not (exit 1)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HOOKS_DIR = Path("/etc/libvirt/hooks")
HOOK_NAME = "salt-kvm-nat"
DRIVERS = ("network", "qemu")
CONF = Path("/etc/salt-kvm/hook.conf")
LOG_FILE = Path("/var/log/salt-kvm/nat-hook.log")
STATE = Path("/var/lib/salt-kvm/nat.json")
# The daemons that run network and qemu hooks: monolithic, or modular (libvirt ≥ 5.6).
DAEMONS = ("libvirtd", "virtqemud", "virtnetworkd")
PROC = Path("/proc")

# The program the hooks hand over to. libvirtd runs hooks under its AppArmor
# profile on Debian and Ubuntu (/etc/apparmor.d/usr.sbin.libvirtd): the hook
# files themselves are allowed (``/etc/libvirt/hooks/** rmix``: run inside the
# profile), and a program in /usr/sbin is run unconfined (``/usr/sbin/* PUx``,
# no profile attaches to it). A Python outside /usr/bin and /usr/sbin, such as
# a Salt onedir's /opt/saltstack/salt/bin/python3.X, is executable by no rule
# of that profile: the hook must not start it itself.
LAUNCHER = Path("/usr/sbin/salt-kvm-libvirt-hook")
LAUNCHER_NAME = LAUNCHER.name

HOOK = r"""#!/bin/sh
# salt-kvm: keeps NAT port forwards alive (see salt-kvm's docs/nat.rst).
# Written by kvm_nat.install_hooks or scripts/setup-host; libvirtd reads hooks
# when it starts. libvirtd runs this under its AppArmor profile (Debian,
# Ubuntu), which lets it run programs in /usr/sbin unconfined but not, say, a
# Salt onedir's Python: so it only hands over to LAUNCHER. Without LAUNCHER it
# logs why to LOG (root only) and exits 0: a forward never stops a guest or network.
DRIVER=@DRIVER@
LAUNCHER='@LAUNCHER@'
[ -x "$LAUNCHER" ] && exec "$LAUNCHER" "$DRIVER" '@CONF@' '@LOG@' "$@"
umask 077
mkdir -p '@LOGDIR@' 2>/dev/null
printf '%s ERROR %s %s %s: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S')" "$DRIVER" "$1" "$2" \
    "no $LAUNCHER: forwards not restored (run kvm_nat.install_hooks)" >>'@LOG@' 2>/dev/null
cat >/dev/null 2>&1  # take libvirt's XML on stdin
exit 0
"""

# The launcher: runs unconfined (see LAUNCHER), reads CONF, starts salt-kvm's Python.
SCRIPT = r"""#!/bin/sh
# salt-kvm's libvirt hook launcher (see salt-kvm's docs/nat.rst), run by the
# hooks in /etc/libvirt/hooks/{network,qemu}.d/ as: LAUNCHER DRIVER CONF LOG ARGS...
# It hands over to salt-kvm's Python named in CONF, logs problems to LOG (root
# only) and always exits 0, so a forward never stops a guest or network.
[ $# -ge 3 ] || exit 0
DRIVER=$1 CONF=$2 LOG=$3
shift 3
umask 077
cd / || exit 0
fail() {
    mkdir -p "${LOG%/*}" 2>/dev/null
    printf '%s ERROR %s %s %s: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S')" \
        "$DRIVER" "$OBJECT" "$OPERATION" "$1" >>"$LOG" 2>/dev/null
    cat >/dev/null 2>&1  # take libvirt's XML on stdin
    exit 0
}
OBJECT=$1 OPERATION=$2
case $DRIVER in network|qemu) ;; *) fail "unknown hook driver '$DRIVER'" ;; esac
python='' path='' state=''
[ -f "$CONF" ] || fail "no $CONF: forwards not restored (run kvm_nat.install_hooks)"
owner=$(stat -c %u "$CONF" 2>/dev/null) mode=$(stat -c %a "$CONF" 2>/dev/null)
[ "$owner" = 0 ] && [ $((0$mode & 022)) -eq 0 ] ||
    fail "$CONF is not root's alone (owner $owner, mode $mode): not used"
while IFS='=' read -r key value; do
    case $key in
        python) python=$value ;;
        path) path=$value ;;
        state) state=$value ;;
    esac
done <"$CONF"
[ -n "$python" ] && [ -x "$python" ] ||
    fail "salt-kvm's python '${python}' (from $CONF) is missing: forwards not restored"
mkdir -p "${LOG%/*}" 2>/dev/null
"$python" -E -s -c 'import sys
if sys.argv[1]:
    sys.path.insert(0, sys.argv[1])
from salt_kvm.nat import hooks
sys.exit(hooks.main(sys.argv[2], sys.argv[5:], state=sys.argv[3] or None, log_file=sys.argv[4]))
' "$path" "$DRIVER" "$state" "$LOG" "$@" 2>>"$LOG" ||
    fail "salt-kvm's python exited $? (see the lines above)"
exit 0
"""


def _check_paths(*values: Path | str) -> None:
    for value in values:
        if "'" in str(value) or "\n" in str(value):
            raise ValueError(f"{str(value)!r}: a hook path may not contain quotes or newlines")


def script(
    driver: str,
    conf: Path | str = CONF,
    log: Path | str = LOG_FILE,
    launcher: Path | str = LAUNCHER,
) -> str:
    """The hook file of ``driver``: hands over to ``launcher``."""
    if driver not in DRIVERS:
        raise ValueError(f"{driver!r}: a hook driver is one of {', '.join(DRIVERS)}")
    _check_paths(conf, log, launcher)
    return (
        HOOK.replace("@DRIVER@", driver)
        .replace("@CONF@", str(conf))
        .replace("@LOGDIR@", str(Path(log).parent))
        .replace("@LOG@", str(log))
        .replace("@LAUNCHER@", str(launcher))
    )


def launcher_script() -> str:
    return SCRIPT


def conf_text(python: str, path: str, state: Path | str) -> str:
    for value in (python, path, str(state)):
        if "\n" in value:
            raise ValueError(f"{value!r}: a hook.conf value may not contain a newline")
    return (
        "# salt-kvm's libvirt hooks hand over to this Python (root's file: the hooks\n"
        "# refuse it otherwise). Written by kvm_nat.install_hooks / scripts/setup-host.\n"
        f"python={python}\npath={path}\nstate={state}\n"
    )


def conf_for(hooks_dir: Path | str) -> Path:
    return CONF if Path(hooks_dir) == HOOKS_DIR else Path(hooks_dir) / "salt-kvm-hook.conf"


def launcher_for(hooks_dir: Path | str) -> Path:
    """/usr/sbin's launcher for libvirt's own hooks folder, else (tests) one inside it."""
    return LAUNCHER if Path(hooks_dir) == HOOKS_DIR else Path(hooks_dir) / LAUNCHER_NAME


def _write(path: Path, text: str, mode: int, test: bool) -> bool:
    """Write ``text`` atomically unless it is there already; whether it changed."""
    if path.exists() and path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
        return False
    if not test:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        tmp.replace(path)
    return True


def install(
    python: str,
    path: str = "",
    state: Path | str = STATE,
    hooks_dir: Path | str = HOOKS_DIR,
    conf: Path | str | None = None,
    log: Path | str = LOG_FILE,
    test: bool = False,
    launcher: Path | str | None = None,
) -> list[str]:
    """Write hook.conf, the launcher and the sh hooks (idempotent); the files
    written (or, with ``test``, that would be). For libvirt's own hooks folder
    hook.conf is /etc/salt-kvm/hook.conf and the launcher
    /usr/sbin/salt-kvm-libvirt-hook, else (another ``hooks_dir``, as in tests)
    both are inside that folder."""
    conf = conf or conf_for(hooks_dir)
    launcher = launcher or launcher_for(hooks_dir)
    _check_paths(conf, log, launcher)
    written = []
    if _write(Path(conf), conf_text(python, path, state), 0o644, test):
        written.append(str(conf))
    if _write(Path(launcher), launcher_script(), 0o755, test):
        written.append(str(launcher))
    for driver in DRIVERS:
        hook = Path(hooks_dir) / f"{driver}.d" / HOOK_NAME
        if _write(hook, script(driver, conf, log, launcher), 0o755, test):
            written.append(str(hook))
    return written


# ---- are they active? ---------------------------------------------------------


def _boot_time() -> float:
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def daemon_started() -> tuple[str, float] | None:
    """(name, start time, epoch seconds) of the running libvirt daemon, or None.

    With several (modular daemons), the oldest start is returned: each must
    have started after the hooks were written."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
            if name not in DAEMONS:
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        found.append((name, _boot_time() + int(fields[19]) / ticks))
    if not found:
        return None
    return min(found, key=lambda item: item[1])


def status(
    hooks_dir: Path | str = HOOKS_DIR,
    conf: Path | str | None = None,
    launcher: Path | str | None = None,
) -> tuple[bool, str]:
    """(active, why): hooks and launcher present, hooks older than the running libvirt daemon."""
    conf = conf or conf_for(hooks_dir)
    launcher = Path(launcher or launcher_for(hooks_dir))
    hooks = [Path(hooks_dir) / f"{d}.d" / HOOK_NAME for d in DRIVERS]
    missing = [str(h) for h in [*hooks, launcher] if not h.exists()]
    if missing or not Path(conf).exists():
        return False, (
            f"the libvirt hooks are not installed ({', '.join(missing) or conf} missing): "
            "forwards are lost at the next network or libvirtd restart; run "
            "kvm_nat.install_hooks, then restart libvirtd"
        )
    daemon = daemon_started()
    if daemon is None:
        return False, "libvirtd is not running: the hooks load when it starts"
    name, started = daemon
    newest = max(h.stat().st_mtime for h in hooks)
    if newest > started + 1:  # /proc/stat's btime is whole seconds
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started))
        return False, (
            f"the libvirt hooks were written after {name} started ({when} UTC), so it does "
            f"not run them: forwards are lost at the next network or libvirtd restart; "
            f"restart {name} once"
        )
    return True, f"active ({name} runs them)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m salt_kvm.nat.hookfiles")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--path", default="")
    parser.add_argument("--state", default=str(STATE))
    parser.add_argument("--hooks-dir", default=str(HOOKS_DIR))
    parser.add_argument("--status", action="store_true")
    args = parser.parse_args(argv)
    if args.status:
        active, why = status(args.hooks_dir)
        print(why)
        return 0 if active else 1
    for path in install(args.python, args.path, args.state, args.hooks_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
