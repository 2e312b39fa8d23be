"""
States for guest backups and snapshots.

.. code-block:: yaml

    web1-nightly:
      kvm_backup.backed_up:
        - name: web1
        - dest: /srv/backup
        - max_age: 24h
        - keep: 7
        - copies:
          - /mnt/nas/backup              # pruned to 7 chains as well
          - target: ssh://root@kvm2/srv/replica
            key_filename: /root/.ssh/id_ed25519
            keep: 30                     # this copy keeps more
          - kvm3                         # a host of kvm:hosts, by name

    web1-before-upgrade:
      kvm_backup.snapshot_present:
        - name: web1
        - snapshot: before-upgrade
"""

import datetime

try:
    from salt_kvm.backup.core import check_compress, check_method
    from salt_kvm.saltutil import STATE_ERRORS, state_changed, state_failed, state_ret
    from salt_kvm.virt.units import parse_duration

    HAS_LIBS = True
except ImportError:  # pragma: no cover - depends on the minion
    HAS_LIBS = False

__virtualname__ = "kvm_backup"


def __virtual__():
    if not HAS_LIBS or "kvm_backup.create" not in __salt__:
        return (False, "the kvm_backup execution module is not available")
    return __virtualname__


def _age(created):
    when = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc
    )
    return (datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()


def backed_up(
    name,
    dest,
    max_age="24h",
    keep=7,
    full_every=7,
    quiesce="auto",
    disks=None,
    copies=None,
    uri=None,
    method="auto",
    compress=False,
):
    """
    Ensure ``dest`` holds a backup of domain ``name`` younger than ``max_age``
    (``90s``, ``30m``, ``24h``, ``7d``); otherwise take one (incremental when
    the chain allows, a new full chain every ``full_every`` points), send it to
    ``copies`` and prune ``dest`` and every copy to the newest ``keep`` chains.
    With Salt's scheduler this gives nightly backups (see the backup page of
    the documentation).

    name
        The domain.
    dest
        The backup folder (one subfolder per domain).
    max_age
        How old the newest backup may be before a new one is taken.
    keep
        How many chains (a full and its incrementals) to keep, in ``dest`` and
        in each copy. ``dest`` is pruned before the copies are sent, so they
        receive only the kept chains.
    copies
        Second destinations (see ``kvm_backup.create``): folders, ``ssh://``
        URLs, host names of ``kvm:hosts`` (another hypervisor's ``backup``
        folder, with its SSH options), or dicts with ``target`` (or ``host``)
        and its options. A dict's own ``keep`` overrides the retention for
        that copy (e.g. ``keep: 30`` on a NAS).
    method
        ``auto`` (default), ``api`` or ``snapshot``: how the disks are copied
        (see ``kvm_backup.create``).
    compress
        ``True``: the new points' images are qcow2 with compressed clusters
        (``method`` ``api`` or ``auto`` on libvirt 7.6 or later; see
        ``kvm_backup.create``). Default ``False``.
    """
    ret = state_ret(name)
    try:
        limit = parse_duration(max_age, "max_age")
        method = check_method(method)
        compress = check_compress(compress)
        points = __salt__["kvm_backup.list"](name, dest)
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    if points:
        age = _age(points[-1]["created"])
        if age < limit:
            ret["comment"] = (
                f"Newest backup of {name} ({points[-1]['id']}) is {int(age)}s old, "
                f"younger than max_age {max_age}"
            )
            return ret
    if __opts__["test"]:
        return state_changed(
            ret,
            {"backup": {"old": points[-1]["id"] if points else None, "new": "new"}},
            f"A backup of {name} would be taken into {dest}",
            test=True,
        )
    try:
        made = __salt__["kvm_backup.create"](
            name,
            dest,
            quiesce=quiesce,
            full_every=full_every,
            disks=disks,
            copies=copies,
            uri=uri,
            method=method,
            keep=keep,
            compress=compress,
        )
    except STATE_ERRORS as exc:
        return state_failed(ret, exc, f"Backup of {name} failed: ")
    ret["changes"] = {
        "backup": {
            "old": points[-1]["id"] if points else None,
            "new": made["point"],
            "kind": made["kind"],
            "bytes": made["bytes"],
            "frozen": made["frozen"],
            "method": made.get("method"),
            "compression": made.get("compression"),
        }
    }
    if made.get("pruned"):
        ret["changes"]["pruned"] = made["pruned"]
    if made.get("copies"):
        ret["changes"]["copies"] = {c["target"]: c["copied"] for c in made["copies"]}
    ret["comment"] = f"Took a {made['kind']} backup of {name}: {made['point']}"
    return ret


def _snapshot_names(name, uri):
    return [s["name"] for s in __salt__["kvm_backup.snapshot_list"](name, uri=uri)]


def snapshot_present(name, snapshot, disk_only=True, quiesce="auto", description=None, uri=None):
    """
    Ensure domain ``name`` has a snapshot called ``snapshot`` (taken now when
    missing; an existing one is left as it is).

    name
        The domain.
    snapshot
        The snapshot's name.
    disk_only
        External disk-only snapshot (default) or internal (``False``).
    """
    ret = state_ret(name)
    try:
        existing = _snapshot_names(name, uri)
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    if snapshot in existing:
        ret["comment"] = f"Snapshot {snapshot} of {name} exists"
        return ret
    if __opts__["test"]:
        return state_changed(
            ret,
            {"snapshot": {"old": None, "new": snapshot}},
            f"Snapshot {snapshot} of {name} would be taken",
            test=True,
        )
    try:
        made = __salt__["kvm_backup.snapshot"](
            name, snapshot, disk_only=disk_only, quiesce=quiesce, description=description, uri=uri
        )
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    ret["changes"] = {
        "snapshot": {
            "old": None,
            "new": snapshot,
            "kind": made["kind"],
            "quiesced": made["quiesced"],
        }
    }
    ret["comment"] = f"Took snapshot {snapshot} of {name}"
    return ret


def snapshot_absent(name, snapshot, uri=None):
    """
    Ensure domain ``name`` has no snapshot called ``snapshot``; an external
    one is merged back into the disks, so the current data stays.

    name
        The domain.
    snapshot
        The snapshot's name.
    """
    ret = state_ret(name)
    try:
        existing = _snapshot_names(name, uri)
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    if snapshot not in existing:
        ret["comment"] = f"Snapshot {snapshot} of {name} is absent"
        return ret
    if __opts__["test"]:
        return state_changed(
            ret,
            {"snapshot": {"old": snapshot, "new": None}},
            f"Snapshot {snapshot} of {name} would be deleted",
            test=True,
        )
    try:
        __salt__["kvm_backup.snapshot_delete"](name, snapshot, uri=uri)
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    ret["changes"] = {"snapshot": {"old": snapshot, "new": None}}
    ret["comment"] = f"Deleted snapshot {snapshot} of {name}"
    return ret
