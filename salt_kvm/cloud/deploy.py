"""salt-cloud's deploy for salt-kvm guests: Salt's own helpers build the
minion's files (config, keys, grains, the deploy script: salt_kvm.saltutil
hands them over as ``MinionFiles``), salt_kvm.cloud.sshdeploy runs them in one
SSH session, and the master's event bus tells when the minion is up. Imports
no Salt: the master's side comes in as a ``Master``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import libvirt

from salt_kvm import ssh as ssh_lib
from salt_kvm.cloud import choices, cloudinit, provision, saltsource, seed, shares, sshdeploy
from salt_kvm.cloud.provision import Guest
from salt_kvm.cloud.spec import VMSpec
from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt import console, guestagent
from salt_kvm.virt.rollback import Rollback

log = logging.getLogger(__name__)
# How often the wait for the minion asks the guest whether its start failed.
CHECK_EVERY = 2.0


@dataclass
class MinionFiles:
    """What Salt's helpers made for the new minion (``saltutil.minion_files``)."""

    key_id: str
    pub: str
    # "minion", "minion.pem", "minion.pub" and maybe "grains": (data, mode)
    files: dict[str, tuple[bytes, int]]
    # The deploy script's text (an SSH deploy without deploy_command).
    script: str | None = None


class Listener(Protocol):
    def get_event(self, wait: float, tag: str, full: bool) -> Any: ...

    def destroy(self) -> None: ...


class Master(Protocol):
    """The salt master's side of a deploy (``saltutil.SaltMaster``)."""

    def accept_key(self, pub: str, key_id: str) -> None: ...

    def listen(self) -> Listener | None:
        """Subscribe to the event bus; None when there is none to wait on."""


@dataclass
class Plan:
    bundle: sshdeploy.Bundle
    key_id: str
    pub: str
    minion_timeout: float
    # Salt installed at first boot (deploy_method: cloud-init), None: the image has it.
    salt_source: saltsource.SaltSource | None = None


def prepare(spec: VMSpec, made: MinionFiles, keep_tmp: bool = False) -> Plan:
    """Everything the deploy needs, checked before any guest exists: the files
    Salt made, the deploy settings, credentials and host key trust."""
    deploy = spec.deploy
    bundle = sshdeploy.Bundle(
        files=made.files,
        script=made.script.encode() if made.script else None,
        deploy_command=deploy.deploy_command,
        script_args=deploy.script_args,
        bootstrap_style="bootstrap-salt" in str(deploy.script),
        force_minion_config=deploy.force_minion_config,
        tmp_dir=deploy.tmp_dir or sshdeploy.DEFAULT_TMP_DIR,
        keep_tmp=keep_tmp,
        sudo=deploy.sudo,
        sudo_password=deploy.sudo_password,
        hostname=spec.name.split(".", 1)[0],
    )
    if deploy.private_key and not os.access(deploy.private_key, os.R_OK):
        raise SpecError("private_key", f"cannot read {deploy.private_key!r}")
    host_trust(spec)  # a bad known_hosts_file stops here, before the guest exists
    return Plan(bundle, made.key_id, made.pub, deploy.minion_timeout, deploy.salt_source)


# Start the minion as soon as cloud-init's write_files has put its files in
# place, not in cloud-init's last stage (and not after the rest of its first
# stage: SSH host key generation alone takes ~20 s of a TCG guest). bootcmd runs
# first, before write_files: it queues, once per instance, a transient unit that
# waits for write_files' last file, then runs START_SCRIPT (written by
# write_files: a script there may use "$", a systemd-run command line may not).
# runcmd (last stage) only covers a guest without systemd-run.
STATE_DIR = "/run/salt-kvm"
SEEDED = f"{STATE_DIR}/seeded"
START_SCRIPT = f"{STATE_DIR}/start-minion"
# What the start script leaves for the host (read through the guest agent):
# "started ..." or "failed: <the guest-side cause>".
STATUS_FILE = f"{STATE_DIR}/minion-status"
# A failure is also written to the serial console (read through libvirt: no
# guest agent needed) on a line starting with this, repeated REPEAT times
# 2 s apart: the host may open the console after the guest has failed.
CONSOLE_MARK = "salt-kvm-status: failed: "
REPEAT = 300
TRANSIENT_UNIT = "salt-kvm-minion.service"
MINION_START = "systemctl enable salt-minion; systemctl restart salt-minion"
EARLY_START = [
    "cloud-init-per",
    "instance",
    "salt-kvm-minion-start",
    "systemd-run",
    "--no-block",
    "--unit=salt-kvm-minion-start",
    # Not after basic.target: cloud-init's first stage runs before sysinit.target.
    "--property=DefaultDependencies=no",
    "/bin/sh",
    "-c",
    # No "$" here: systemd would take it for one of its own variables.
    f"timeout 60 sh -c 'until [ -e {SEEDED} ]; do sleep 0.1; done'; exec /bin/sh {START_SCRIPT}",
]
LATE_START = "command -v systemd-run >/dev/null 2>&1 || { " + MINION_START + "; }"
# When (seconds apart) the start script looks whether the minion's unit failed.
WATCH_AT = (2, 8)
START_SCRIPT_TEXT = f"""#!/bin/sh
# salt-kvm: start salt-minion now that its config and keys are in place; leave
# the outcome in {STATUS_FILE} for the host (salt-cloud fails fast on "failed").
STATUS={STATUS_FILE}
say() {{ printf '%s\\n' "$*" > "$STATUS.tmp"; mv -f "$STATUS.tmp" "$STATUS"; }}
fail() {{
  say "failed: $*"
  echo "salt-kvm: the minion cannot start: $*" > /dev/console 2>/dev/null
  line="{CONSOLE_MARK}$(printf '%s' "$*" | tr -c '[:print:]' ' ' | cut -c1-600)"
  n=0
  while [ "$n" -lt {REPEAT} ]; do
    printf '\r\n%s\r\n' "$line" > /dev/console 2>/dev/null
    n=$((n + 1))
    sleep 2
  done
  exit 1
}}
# salt_source: Salt installed now, before it is started.
if [ -e {saltsource.SOURCE_FILE} ]; then
  command -v python3 >/dev/null 2>&1 ||
    fail "installing Salt needs python3 (cloud-init's own), and the image has none on PATH"
  OUT=$(python3 {saltsource.INSTALLER} {saltsource.SOURCE_FILE} 2>&1) ||
    fail "installing Salt failed: $(printf '%s' "$OUT" | tail -n 1)"
fi
if systemctl cat salt-minion.service >/dev/null 2>&1; then
  UNIT=salt-minion.service
  # Queued first (each systemctl costs a TCG guest 0.1-0.2 s). Its own ordering
  # would wait for all of cloud-init's first stage (after
  # network-online.target); the network is already up at this point.
  systemctl restart --no-block --job-mode=ignore-dependencies salt-minion.service ||
    fail "systemctl restart salt-minion.service failed"
  # The rest of cloud-init's boot work (host keys, later stages) yields the CPU
  # to the minion for this boot (applied to the unit's cgroup as it starts or
  # runs): it is what the user is waiting for.
  systemctl set-property --runtime salt-minion.service CPUWeight=10000
  # The next boots start it too (a link; no manager reload mid-boot).
  systemctl --no-reload enable salt-minion.service >/dev/null 2>&1
else
  # An image whose Salt lives elsewhere (a virtualenv) with no unit: run the
  # minion as a transient unit now, and give it a unit for the next boots
  # (enabled by its link: no daemon-reload in the middle of the boot).
  BIN=$(command -v salt-minion) ||
    fail "the image has no salt-minion.service unit and no salt-minion on PATH ($PATH)"
  UNIT={TRANSIENT_UNIT}
  mkdir -p /etc/systemd/system/multi-user.target.wants
  printf '%s\\n' '[Unit]' 'Description=Salt minion (written by salt-kvm)' \\
    'After=network-online.target' 'Wants=network-online.target' '[Service]' \\
    "ExecStart=$BIN" 'Restart=on-failure' '[Install]' 'WantedBy=multi-user.target' \\
    > /etc/systemd/system/salt-minion.service
  ln -sf /etc/systemd/system/salt-minion.service \\
    /etc/systemd/system/multi-user.target.wants/salt-minion.service
  systemd-run --no-block --unit=$UNIT --property=CPUWeight=10000 "$BIN" ||
    fail "systemd-run $BIN failed"
fi
# Two looks, not a loop: systemctl is costly in a TCG guest that is busy booting.
for wait in {" ".join(str(w) for w in WATCH_AT)}; do
  sleep "$wait"
  if systemctl is-failed --quiet "$UNIT"; then
    fail "$UNIT failed: $(journalctl -u "$UNIT" -n 5 -o cat --no-pager 2>/dev/null | tr '\\n' ' ')"
  fi
done
say "started $UNIT"
"""


def cloud_config(plan: Plan) -> dict:
    """The same files as the SSH deploy, as cloud-init ``write_files``, and the
    minion (re)started once they are in place: by its unit, or as a transient
    unit when the image has none. With ``salt_source`` the start script first
    installs Salt (saltsource); without it the image must already have Salt
    (as with the salt-preinstalled deploy script)."""
    targets = {
        "minion": ("/etc/salt/minion", "0644"),
        "minion.pem": ("/etc/salt/pki/minion/minion.pem", "0600"),
        "minion.pub": ("/etc/salt/pki/minion/minion.pub", "0644"),
        "grains": ("/etc/salt/grains", "0644"),
    }
    files = [
        {"path": path, "permissions": mode, "owner": "root:root", "content": data.decode()}
        for name, (data, _) in plan.bundle.files.items()
        for path, mode in [targets[name]]
    ]
    if plan.salt_source is not None:
        files.extend(saltsource.guest_files(plan.salt_source))
    files.append({"path": START_SCRIPT, "permissions": "0700", "content": START_SCRIPT_TEXT})
    files.append({"path": SEEDED, "permissions": "0600", "content": plan.key_id})
    return {
        "bootcmd": [EARLY_START],
        "write_files": files,
        "runcmd": [["sh", "-c", LATE_START]],
    }


@contextlib.contextmanager
def minion_watch(
    master: Master,
    plan: Plan,
    guest_of: Callable[[], Guest],
    guest_check: Callable[[Guest], None] | None = None,
) -> Iterator[None]:
    """Accept the minion's key and subscribe to the master's bus before the guest
    can start its minion; on leaving the block without an error, wait for the
    minion's start event (``wait_for_minion_timeout``; 0: do not wait), calling
    ``guest_check`` now and then: it raises when the guest says it cannot start one."""
    master.accept_key(plan.pub, plan.key_id)
    listener = master.listen() if plan.minion_timeout > 0 else None
    try:
        yield
        if listener is not None:
            check = None
            if guest_check is not None:
                checker = guest_check
                check = lambda: checker(guest_of())  # noqa: E731
            _wait_for_minion(listener, plan.key_id, plan.minion_timeout, check)
            guest_of().mark("minion")
    finally:
        if listener is not None:
            listener.destroy()


def host_trust(spec: VMSpec) -> ssh_lib.HostTrust | None:
    """salt-cloud's convention: with ``known_hosts_file`` the guest's host key
    must be in that file (the image or the seed gave the guest a key known in
    advance); without it, the key of the guest just created is accepted: it is
    new by design and reached on the address of its own DHCP lease."""
    if not spec.deploy.known_hosts_file:
        return None
    try:
        return ssh_lib.HostTrust.build(known_hosts=spec.deploy.known_hosts_file)
    except SpecError as exc:  # named by the profile's key, not the library's
        raise SpecError("known_hosts_file", exc.problem, exc.accepted) from exc


def check_minion_start(guest: Guest, tail: console.ConsoleTail | None = None) -> None:
    """Raise, naming the guest-side cause, when the guest's start script (see
    ``START_SCRIPT_TEXT``) reported that the minion cannot start: in its
    status file (through the guest agent) or on its serial console (``tail``,
    for images without the agent)."""
    status = guestagent.read_file(guest.domain, STATUS_FILE)
    cause = None
    if status is not None and status.startswith("failed"):
        cause = status.partition(":")[2]
    elif tail is not None:
        cause = tail.last_line(CONSOLE_MARK)
    if cause is not None:
        raise SaltKvmError(
            f"the minion cannot start in the guest {guest.name}: {guestagent.clean(cause)}"
        )


class StartCheck:
    """``check_minion_start`` with each guest's console kept open between calls."""

    def __init__(self) -> None:
        self.tails: dict[str, console.ConsoleTail] = {}

    def __call__(self, guest: Guest) -> None:
        if guest.name not in self.tails and guest.domain is not None:
            self.tails[guest.name] = console.ConsoleTail(guest.domain)
        check_minion_start(guest, self.tails.get(guest.name))

    def close(self) -> None:
        for tail in self.tails.values():
            tail.close()


def run(master: Master, plan: Plan, spec: VMSpec, guest: Guest) -> dict:
    """Make ``guest`` a minion the way salt-cloud does (files + deploy script), in
    one SSH session, then wait until the minion has started on the master."""
    with minion_watch(master, plan, lambda: guest):
        with ssh_lib.connect(
            guest.addresses[0],
            spec.deploy.ssh_username,
            password=spec.deploy.password,
            key_filename=spec.deploy.private_key,
            allow_agent=spec.deploy.ssh_agent,
            port=spec.deploy.ssh_port,
            timeout=spec.wait_for_ip_timeout,
            # sshd may start after the lease: a refused probe costs nothing.
            interval=0.25,
            trust=host_trust(spec),
        ) as session:
            guest.mark("ssh")
            sshdeploy.run(session, plan.bundle)
        guest.mark("deploy")
    return {"method": "ssh", "minion_id": plan.key_id}


def _wait_for_minion(
    listener: Listener, minion_id: str, timeout: float, check: Callable[[], None] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + CHECK_EVERY
    tag = f"salt/minion/{minion_id}/start"
    while time.monotonic() < deadline:
        event = listener.get_event(
            wait=min(1.0, max(0.1, deadline - time.monotonic())), tag=tag, full=True
        )
        if event:
            return
        if check is not None and time.monotonic() >= next_check:
            check()
            next_check = time.monotonic() + CHECK_EVERY
    raise SaltKvmError(f"the minion {minion_id} did not connect to the master within {timeout:g}s")


def seed_iso(spec: VMSpec, plan: Plan | None, grains: dict | None, **extra: Any) -> bytes | None:
    """The guest's NoCloud seed, None when it needs none: the profile's
    ``cloud_init`` and, with ``deploy_method: cloud-init``, the minion preseed
    (a cloud-config) merged. Built before anything is created: a bad template
    stops here. ``extra``: more names for a user_data template (profile...)."""
    minion = cloud_config(plan) if plan is not None and spec.deploy.method == "cloud-init" else None
    # shares[].mount: the guest mounts them at first boot (and keeps them in fstab).
    mounts = shares.cloud_config(spec.shares)
    if mounts:
        minion = cloudinit.merge(mounts, minion or {})
    # nics[].ip6: the guest's DHCPv6 client asks with the reservation's DUID.
    duid = cloudinit.duid_config(spec.nics or [])
    if duid:
        minion = cloudinit.merge(duid, minion or {})
    ci = spec.cloud_init
    # nics[].ip on a bridge: the guest's network config (the spec refuses it
    # beside cloud_init.network_config).
    network = cloudinit.network_config(spec.nics or []) or (ci.network_config if ci else None)
    if minion is None and ci is None and network is None:
        return None
    extra.setdefault("minion_id", plan.key_id if plan is not None else spec.name)
    variables = cloudinit.context(spec.name, spec.nics or [], grains, **extra)
    data = cloudinit.user_data(ci, spec.deploy.ssh_username, minion, variables)
    return seed.nocloud(spec.name, data, network, dict(ci.meta_data) if ci else None)


def create(
    master: Master,
    conn: libvirt.virConnect,
    spec: VMSpec,
    plan: Plan | None,
    seed: bytes | None,
    rollback: Rollback,
    emit: provision.Emit,
) -> tuple[Guest, dict | None]:
    """Create the guest and make it a minion by the profile's ``deploy_method``;
    returns the guest and what the deploy reports (None: no deploy).

    With ``ip_source: plan`` (a static ip on a bridge) the create does not wait
    for an address: the deploy waits for the guest to answer on the planned
    one. The seed stays attached until then; without a deploy (or a wait for
    the minion) nothing tells that the guest has read it, and it stays until
    ``salt-cloud -d``."""
    planned = spec.ip_source == choices.SOURCE_PLAN
    # The minion's key id, when it is not the VM's name (minion: id or
    # append_domain), is recorded with the guest: -d removes that key too.
    record = {"minion_id": plan.key_id} if plan is not None and plan.key_id != spec.name else None
    if plan is not None and spec.deploy.method == "cloud-init":
        # The minion's config and accepted keys are in the seed; no SSH. The
        # seed is ejected and deleted as soon as the minion has started.
        created: list[Guest] = []
        check = StartCheck()
        try:
            with minion_watch(master, plan, lambda: created[0], check):
                emit("deploying", {"name": spec.name, "method": "cloud-init"})
                created.append(
                    provision.create(
                        conn, spec, rollback, emit, seed_iso=seed, watch=check, record=record
                    )
                )
        finally:
            check.close()
        if plan.minion_timeout > 0 or not planned:
            provision.detach_seed(conn, created[0])
        return created[0], {"method": "cloud-init", "minion_id": plan.key_id}
    guest = provision.create(conn, spec, rollback, emit, seed_iso=seed, record=record)
    # cloud-init read the seed in its local stage, before the guest's network
    # (and so its address) came up: with an address learned, it can go now;
    # with a planned one, once the guest answers on it.
    if not planned:
        provision.detach_seed(conn, guest)
    if plan is None:
        return guest, None
    emit("deploying", {"name": spec.name, "ip_address": guest.addresses[0]})
    deployed = run(master, plan, spec, guest)
    if planned:
        provision.detach_seed(conn, guest)
    return guest, deployed
