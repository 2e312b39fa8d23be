"""
Snapshots and backups of KVM guests, from the hypervisor minion.

Backups use libvirt's backup API with checkpoints (``method=api``) or, where
libvirt is older than 7.6 or with ``method=snapshot``, an external snapshot,
a copy with qemu-img and a block commit back: the first backup of a domain
into a destination is full, the next ones incremental. Each run fires
``salt/kvm_backup/<domain>/<step>`` events (``start``, ``progress``, ``done``,
``failed``) on the Salt event bus. See the backup page of the documentation.

The libvirt URI comes from the ``uri`` argument, else the minion config or
pillar key ``kvm:connection:uri``, else ``qemu:///system``.
"""

import logging

try:
    import libvirt  # noqa: F401

    from salt_kvm import redact
    from salt_kvm.backup import hosts as backup_hosts
    from salt_kvm.backup import ops as backup_ops
    from salt_kvm.backup import restore as restoring
    from salt_kvm.backup import run as backup
    from salt_kvm.backup import snapshots
    from salt_kvm.backup import store as backup_store
    from salt_kvm.backup import takeover as takeovers
    from salt_kvm.saltutil import command_errors, config_value, connection_for, flag
    from salt_kvm.virt import qemuimg

    HAS_LIBS = True
except ImportError as _exc:  # pragma: no cover - depends on the minion
    HAS_LIBS = False
    _IMPORT_ERROR = str(_exc)

from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)
__virtualname__ = "kvm_backup"
__func_alias__ = {"list_": "list"}


def __virtual__():
    if not HAS_LIBS:
        return (False, f"kvm_backup needs salt_kvm and libvirt-python: {_IMPORT_ERROR}")
    if not qemuimg.available():
        return (False, "kvm_backup needs qemu-img (Debian package qemu-utils)")
    return __virtualname__


def _with_conn(uri, func, *args, **kwargs):
    with command_errors(), connection_for(__opts__, __pillar__, uri) as conn:
        return func(conn, *args, **kwargs)


def _emitter(domain, events):
    if not events or "event.send" not in __salt__:
        return None

    def emit(step, data):
        try:
            __salt__["event.send"](f"salt/kvm_backup/{domain}/{step}", data)
        except Exception as exc:  # noqa: BLE001 - an event must never fail a backup
            log.debug("kvm_backup event %s not sent: %s", step, exc)

    return emit


# ---- snapshots ----------------------------------------------------------------------
def snapshot(domain, name=None, disk_only=True, quiesce="auto", description=None, uri=None):
    """
    Take a snapshot of ``domain``. By default an external disk-only snapshot
    (an overlay per disk), with the guest's filesystems quiesced through its
    agent when it answers (``quiesce=auto``; ``True`` requires it). The result
    says whether they were. ``disk_only=False`` takes an internal snapshot
    (memory too when running), where the disks allow it.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_backup.snapshot web1 before-upgrade
        salt hypervisor kvm_backup.snapshot web1 quiesce=True
    """
    disk_only = flag(disk_only, "disk_only", True)
    return _with_conn(uri, snapshots.create, domain, name, disk_only, quiesce, description)


def snapshot_list(domain, uri=None):
    """
    List the snapshots of ``domain``: name, kind (external or internal),
    creation time, parent and overlay files.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_backup.snapshot_list web1
    """
    return _with_conn(uri, snapshots.list_snapshots, domain)


def snapshot_revert(domain, name, force=False, uri=None):
    """
    Return ``domain`` to snapshot ``name``. An external snapshot must be the
    newest of its chain; a running guest is powered off and started again only
    with ``force=True`` (a disk-only snapshot holds no memory state). A running
    guest is reverted to an internal snapshot only with ``force=True`` too (its
    memory and disk writes since are thrown away). Either
    kind drops salt-kvm's backup checkpoints (the next backup is full): an
    internal snapshot cannot be loaded while a disk has dirty bitmaps.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_backup.snapshot_revert web1 before-upgrade force=True
    """
    return _with_conn(uri, snapshots.revert, domain, name, flag(force, "force"))


def snapshot_delete(domain, name, uri=None):
    """
    Delete snapshot ``name`` of ``domain``, keeping the current data: an
    external snapshot's overlays are merged back into their images (block
    commit) first.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_backup.snapshot_delete web1 before-upgrade
    """
    return _with_conn(uri, snapshots.delete, domain, name)


# ---- backups ------------------------------------------------------------------------
def create(
    domain,
    dest,
    quiesce="auto",
    full=False,
    full_every=None,
    disks=None,
    copies=None,
    events=True,
    uri=None,
    method="auto",
    keep=None,
    compress=False,
):
    """
    Back up ``domain``'s disks into ``dest``/``domain``: full the first time
    (or with ``full=True``, or once a chain has ``full_every`` points),
    incremental after. Works on running guests (filesystems frozen through the
    agent when present; ``frozen`` in the result says whether) and shut-off ones.
    ``disks`` limits it to some targets (``vdb``, ``vda,vdb`` or ``[vda, vdb]``).

    ``keep``: the retention, in chains (a full and its incrementals). When
    given, ``dest`` is pruned to the newest ``keep`` chains after the backup
    (as ``prune`` does; ``pruned`` in the result), before the copies are sent.
    A prune refused there (something still stands on a chain it would delete)
    keeps nothing from the copies: they are sent, then the call fails saying
    so (the result in the error's ``info``).

    ``copies`` sends the new points to second destinations (see ``replicate``):
    a list of folders, ``ssh://user@host/path`` URLs or host names of
    ``kvm:hosts``, or dicts with ``target`` (or ``host``), ``key_filename``,
    ``host_key``, ``known_hosts``, ``password_pillar``, ``keep`` (a
    ``password`` is refused). Each copy is
    pruned with the same retention as ``dest`` (``keep``) unless its entry
    gives its own ``keep`` (e.g. more chains on a NAS). Bad entries are refused
    before the backup runs.

    ``method``: ``api`` (libvirt's backup API with checkpoints: an incremental
    reads and writes only the changed clusters), ``snapshot`` (an external
    snapshot, a copy with qemu-img, then a block commit back: needs no
    checkpoint, works with any libvirt and raw disks too; an incremental reads
    the whole disk but writes only what changed), or ``auto`` (default: ``api``
    with libvirt 7.6 or later, else ``snapshot``).

    ``compress``: ``True`` writes the point's images as qcow2 with compressed
    clusters (zstd where qemu-img has it, else zlib; the manifest's
    ``compression`` says which): smaller points on compressible data, at the
    cost of a second pass over what was copied (see the backup page of the
    documentation for the figures). ``method=api`` only (``snapshot`` refuses
    it). Restores, verify and copies read compressed points like any other, and
    an incremental may follow a compressed point or not, either way.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_backup.create web1 dest=/srv/backup
        salt hypervisor kvm_backup.create web1 dest=/srv/backup keep=7 \
            copies='[/mnt/nas/backup]'
        salt hypervisor kvm_backup.create web1 dest=/srv/backup keep=7 \
            copies='[{target: /mnt/nas/backup, keep: 30}]'
        salt hypervisor kvm_backup.create web1 dest=/srv/backup method=snapshot
        salt hypervisor kvm_backup.create web1 dest=/srv/backup compress=True
    """
    full = flag(full, "full")
    events = flag(events, "events", True)
    if keep is not None:
        with command_errors():
            backup_store.check_keep(keep)
    copy_args = [_copy_args(copy, keep) for copy in copies or []]  # refused before the backup
    result = _with_conn(
        uri,
        backup.create,
        domain,
        dest,
        quiesce=quiesce,
        full=full,
        full_every=full_every,
        disks=disks,
        emit=_emitter(domain, events),
        method=method,
        compress=compress,
    )
    refused = None
    if keep is not None:
        try:
            result["pruned"] = prune(domain, dest, keep, uri=uri)["deleted"]
        except CommandExecutionError as exc:
            refused = exc  # the new point still goes to the second place
    with command_errors():
        result["copies"] = [backup_ops.replicate(dest, domain, **args) for args in copy_args]
    if refused is not None:
        raise CommandExecutionError(
            f"the backup and its copies were made, but pruning {dest} was refused: {refused}",
            info=result,
        )
    return result


COPY_KEYS = (
    "target",
    "host",
    "key_filename",
    "host_key",
    "known_hosts",
    "password_pillar",
    "keep",
)
NO_PASSWORD = (
    "{where}: a password is never taken as an argument (arguments land in the job cache "
    "and on the event bus); accepted: key_filename (a key file), or password_pillar naming "
    "a pillar or minion-config key that holds it"
)


def _password(password_pillar):
    """The SSH password from the pillar or minion-config key ``password_pillar``."""
    if password_pillar in (None, ""):
        return None
    if not isinstance(password_pillar, str):
        raise CommandExecutionError(
            f"password_pillar: {password_pillar!r} is not a key name "
            "(accepted: a pillar or minion-config key such as kvm:backup:ssh_password)"
        )
    value = __salt__["config.get"](password_pillar)
    if not isinstance(value, str) or not value:
        raise CommandExecutionError(
            f"password_pillar: no password under {password_pillar!r} in the pillar or the "
            "minion config (accepted: a key holding a non-empty string)"
        )
    return value


def _hosts():
    """The other hypervisors by name (``kvm:hosts`` in pillar or the minion config)."""
    with command_errors():
        return backup_hosts.parse_hosts(config_value(__opts__, __pillar__, backup_hosts.KEY))


def _by_host(copy):
    """A copy entry naming a host (``kvm2``, or ``{host: kvm2, ...}``) as the
    target and SSH options of that host's entry; the entry's own keys win."""
    if isinstance(copy, str) and backup_hosts.is_host_name(copy):
        copy = {"host": copy}
    if not isinstance(copy, dict) or "host" not in copy:
        return copy
    if "target" in copy:
        raise CommandExecutionError(
            "copies: give target or host, not both (accepted: host=<name of kvm:hosts>, "
            "or target=<folder or ssh:// URL>)"
        )
    with command_errors("copies: "):
        entry = backup_hosts.lookup(_hosts(), copy["host"])
        args = entry.copy_args()
    args.update({k: v for k, v in copy.items() if k != "host"})
    return args


def _copy_args(copy, keep=None):
    """Library arguments for one ``copies`` entry (pruned to ``keep`` chains
    unless it says its own ``keep``); a ``password`` is refused."""
    if isinstance(copy, dict) and "password" in copy:
        raise CommandExecutionError(NO_PASSWORD.format(where="copies.password"))
    copy = _by_host(copy)
    if isinstance(copy, str):
        copy = {"target": copy}
    if not isinstance(copy, dict) or "target" not in copy:
        raise CommandExecutionError(
            f"copies: {redact.mapping(copy)!r} is not a copy destination "
            f"(accepted: a folder, an ssh:// URL, or a dict with {', '.join(COPY_KEYS)})"
        )
    if "password" in copy:
        raise CommandExecutionError(NO_PASSWORD.format(where="copies.password"))
    unknown = sorted(str(k) for k in set(copy) - set(COPY_KEYS))
    if unknown:
        raise CommandExecutionError(
            f"copies: unknown key(s) {', '.join(unknown)} (accepted: {', '.join(COPY_KEYS)})"
        )
    args = {k: v for k, v in copy.items() if k != "password_pillar"}
    if args.get("keep") is None:
        args["keep"] = keep
    else:
        with command_errors("copies: "):
            backup_store.check_keep(args["keep"])
    password = _password(copy.get("password_pillar"))
    if password is not None:
        args["password"] = password
    with command_errors("copies: "):
        backup_ops.parse_target(args["target"])
    return args


def list_(domain, dest):
    """
    List the complete backup points of ``domain`` in ``dest``, oldest first
    (a run in progress or killed is never listed).

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_backup.list web1 /srv/backup
    """
    with command_errors():
        return backup_ops.list_points(dest, domain)


def verify(domain, dest, point=None, deep=True):
    """
    Check the backups of ``domain`` in ``dest`` (or one ``point`` and the chain
    it needs): every image against its stored checksum (``deep=False`` skips
    that), its header (backing file exactly the parent point's image, no
    external data file) and ``qemu-img check``. A point whose manifest does not
    fit the store's layout is reported, naming the field.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_backup.verify web1 /srv/backup
    """
    with command_errors():
        return backup_ops.verify(dest, domain, point, flag(deep, "deep", True))


def prune(domain, dest, keep, test=False, uri=None):
    """
    Delete the oldest backup chains of ``domain`` in ``dest``, keeping the
    newest ``keep`` chains. A chain is never cut: incrementals go with their full.
    Refused, deleting nothing, while a volume or a domain's disk on the
    hypervisor has one of the doomed images in its backing chain.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_backup.prune web1 /srv/backup keep=4
    """
    test = flag(test, "test")
    return _with_conn(uri, lambda conn: backup_ops.prune(dest, domain, keep, test, conn=conn))


def restore(
    domain,
    dest,
    point="latest",
    target=None,
    force=False,
    pool="default",
    start=False,
    uri=None,
    new_identity=None,
):
    """
    Restore backup ``point`` (``latest`` or an id from ``list``) of ``domain``
    from ``dest``: as a new domain ``target`` with its volumes in ``pool``, or,
    without ``target``, over ``domain``'s own disks (it must be shut off, and
    ``force=True``; each disk keeps its definition's format, a raw block device
    is written into). ``dest`` may be a second copy: on the host holding it
    this is a takeover. The store is untrusted: a manifest or image that does
    not fit its layout is refused by name before anything is written.

    ``target=<domain>`` where the domain no longer exists (its host or disks
    were lost, or on another host from a copy) brings the same guest back: its
    UUID and MAC addresses are kept, and its disks (the minion's id and keys
    with them) are restored as they were, so DHCP reservations still match and
    the master knows the minion. Under a new name the restored domain gets a new
    UUID and new MACs (the original may still run). ``new_identity=True`` gives
    new ones under the own name too, ``new_identity=False`` keeps them under a
    new name. A kept UUID or MAC that another domain on this host has is
    refused by name before anything is written.

    A point's UEFI variables come back as the restored domain's own NVRAM file
    (``<target>_VARS.fd`` in ``pool``, never an existing one), its emulated
    TPM's state only with a kept identity (a new UUID starts with an empty
    TPM); ``nvram`` and ``tpm_state`` in the result say what was done.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_backup.restore web1 /srv/backup target=web1-restored start=True
        salt hypervisor kvm_backup.restore web1 /srv/backup point=20261121T041100Z force=True
        salt kvm2 kvm_backup.restore web1 /srv/replica target=web1 start=True
    """
    force, start = flag(force, "force"), flag(start, "start")
    new_identity = flag(new_identity, "new_identity", None)
    return _with_conn(
        uri, restoring.restore, domain, dest, point, target, force, pool, start, new_identity
    )


def replicate(
    domain,
    dest,
    target=None,
    key_filename=None,
    keep=None,
    host_key=None,
    known_hosts=None,
    password_pillar=None,
    host=None,
    **kwargs,
):
    """
    Copy every backup point of ``domain`` in ``dest`` that ``target`` lacks to
    ``target``: another folder, or ``ssh://user@host[:port]/path`` (paramiko),
    or, with ``host=<name>`` (or a bare name as ``target``), another hypervisor
    of the minion's ``kvm:hosts`` setting: its ``backup`` folder, with the SSH
    options of its entry (arguments given here win). An unknown name is refused
    listing the configured ones.
    Each copy is verified by checksum there before it counts; a point whose
    manifest or image does not fit the store's layout is not copied (listed
    under ``refused``). ``keep`` prunes the copy to that many chains.

    Over SSH the other host must prove it is the one meant before anything
    is sent: its host key must be in ``known_hosts`` (a file or a list of
    files; default: ``/etc/ssh/ssh_known_hosts`` and the minion user's
    ``~/.ssh/known_hosts``) or match ``host_key``, a fingerprint
    (``SHA256:...`` as ``ssh-keygen -lf`` prints it) or a list of them. An
    unknown or different key is refused before logging in.

    Log in with ``key_filename`` (a private key file on the minion) or a
    password stored in pillar or the minion config under the key named by
    ``password_pillar`` (e.g. ``kvm:backup:ssh_password``). A ``password``
    argument is refused: arguments land in the job cache and on the event bus.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_backup.replicate web1 /srv/backup /mnt/nas/backup
        salt hypervisor kvm_backup.replicate web1 /srv/backup ssh://root@kvm2/srv/replica \
            key_filename=/root/.ssh/id_ed25519
        salt hypervisor kvm_backup.replicate web1 /srv/backup ssh://root@kvm2/srv/replica \
            host_key=SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s \
            password_pillar=kvm:backup:ssh_password
        salt kvm1 kvm_backup.replicate web1 /srv/backup host=kvm2
    """
    if "password" in kwargs:
        raise CommandExecutionError(NO_PASSWORD.format(where="password"))
    unknown = sorted(k for k in kwargs if not k.startswith("__"))
    if unknown:
        raise CommandExecutionError(
            f"replicate: unknown argument(s) {', '.join(unknown)} "
            "(accepted: host, key_filename, keep, host_key, known_hosts, password_pillar)"
        )
    if host is not None or (target is not None and backup_hosts.is_host_name(target)):
        if host is not None and target is not None:
            raise CommandExecutionError(
                "replicate: give target or host, not both (accepted: host=<name of "
                "kvm:hosts>, or target=<folder or ssh:// URL>)"
            )
        with command_errors():
            entry = backup_hosts.lookup(_hosts(), host if host is not None else target)
            named = entry.copy_args()
        target = named.pop("target")
        given = {
            "key_filename": key_filename,
            "host_key": host_key,
            "known_hosts": known_hosts,
            "password_pillar": password_pillar,
        }
        given.update({k: v for k, v in named.items() if given.get(k) is None})
        key_filename, host_key = given["key_filename"], given["host_key"]
        known_hosts, password_pillar = given["known_hosts"], given["password_pillar"]
    if target is None:
        raise CommandExecutionError(
            "replicate: no target (accepted: a folder, an ssh:// URL, or host=<name of kvm:hosts>)"
        )
    password = _password(password_pillar)
    with command_errors():
        return backup_ops.replicate(
            dest,
            domain,
            target,
            password=password,
            key_filename=key_filename,
            keep=keep,
            host_key=host_key,
            known_hosts=known_hosts,
        )


def takeover(
    domain,
    dest=None,
    pool="default",
    force=False,
    timeout=10,
    uri=None,
    host=None,
    start=True,
):
    """
    Take ``domain`` over on this hypervisor after its host is lost, as one call:
    the newest point of its replica here that verifies (newer ones that do not
    are skipped and listed under ``skipped`` with why) is restored under its own
    name, its UUID, MAC addresses and disks (the minion's id and key) kept, and
    started. What the call made is removed again when a step fails.

    ``dest``: the replica folder; default the ``backup`` folder of this host's
    entry in ``kvm:hosts`` (this host: ``host``, else ``kvm:host``, else the
    minion id). Every other host of ``kvm:hosts`` with a ``uri`` is asked first,
    each within ``timeout`` seconds: where the guest still runs the takeover is
    refused (two copies would share its MACs and minion key) unless
    ``force=True``; a host that does not answer does not block it and is listed
    under ``unreachable``. A domain of that name on this host is refused.

    CLI Example:

    .. code-block:: bash

        salt kvm2 kvm_backup.takeover web1
        salt kvm2 kvm_backup.takeover web1 dest=/srv/replica timeout=5
        salt kvm2 kvm_backup.takeover web1 force=True
    """
    force, start = flag(force, "force"), flag(start, "start", True)
    hosts = _hosts()
    with command_errors():
        mine = config_value(__opts__, __pillar__, backup_hosts.SELF_KEY)
        if host is not None:
            mine = backup_hosts.lookup(hosts, host, "host").name
        elif mine is not None or dest is None:
            mine = backup_hosts.this_host(hosts, mine, __opts__.get("id")).name
        elif __opts__.get("id") in hosts:
            mine = __opts__["id"]
        if dest is None:
            dest = hosts[mine].replica_folder()
        peers = {h.name: h.uri for h in hosts.values() if h.uri and h.name != mine}
        takeovers.check_timeout(timeout)
    return _with_conn(
        uri,
        takeovers.takeover,
        domain,
        dest,
        peers=peers,
        pool=pool,
        force=force,
        timeout=timeout,
        start=start,
    )
