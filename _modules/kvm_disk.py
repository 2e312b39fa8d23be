"""
External disks of KVM guests, from the hypervisor minion.

The libvirt URI comes from the ``uri`` argument, else the minion config or
pillar key ``kvm:connection:uri``, else ``qemu:///system``. Paths given with
``path=`` must be inside a storage pool or below a directory of
``kvm:disk:allowed_dirs`` (minion config or pillar, a list).

Every request is checked first; a refusal changes nothing. See the salt-kvm
documentation (docs/disks.rst).
"""

import logging

try:
    import libvirt

    from salt_kvm.disks import ops as diskops
    from salt_kvm.disks import spec as disks
    from salt_kvm.saltutil import command_errors, connection_for, flag
    from salt_kvm.virt import lifecycle
    from salt_kvm.virt.checks import seconds

    HAS_LIBS = True
except ImportError as _exc:  # pragma: no cover - depends on the minion
    HAS_LIBS = False
    _IMPORT_ERROR = str(_exc)

log = logging.getLogger(__name__)
__virtualname__ = "kvm_disk"
__func_alias__ = {"list_": "list"}
ALLOWED_DIRS_KEY = "kvm:disk:allowed_dirs"


def __virtual__():
    if not HAS_LIBS:
        return (False, f"kvm_disk needs salt_kvm and libvirt-python: {_IMPORT_ERROR}")
    return __virtualname__


def _run(uri, domain, action):
    with command_errors(also=(libvirt.libvirtError,)):
        with connection_for(__opts__, __pillar__, uri) as conn:
            return action(conn, lifecycle.lookup(conn, domain))


def _allowed_dirs():
    with command_errors():
        value = __salt__["config.get"](ALLOWED_DIRS_KEY, [])
        return disks.parse_allowed_dirs(value, ALLOWED_DIRS_KEY)


def list_(domain, uri=None):
    """
    Return every disk of ``domain`` by name: target, bus, source, format, size
    and allocation (bytes), index, read-only/shareable, whether it is in the
    running guest (``live``) and the definition (``persistent``), and whether
    salt-kvm created its volume (``created``).

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_disk.list vm1
    """
    return _run(uri, domain, diskops.describe)


def attach(
    domain,
    name,
    size=None,
    path=None,
    format=None,  # noqa: A002 - the user-facing argument name
    pool=None,
    bus=None,
    cache=None,
    index=None,
    readonly=False,
    shareable=False,
    preallocation=None,
    live=True,
    persistent=True,
    uri=None,
    test=False,
):
    """
    Attach disk ``name`` to ``domain``: a new sparse volume of ``size`` in
    ``pool`` (default ``default``), or an existing image or block device at
    ``path``. ``format``: qcow2 (default for new volumes), raw, vdi, vmdk,
    cloop, qed; ``bus``: virtio (default), scsi, sata, ide; ``index`` (1 =
    the second disk, e.g. vdb) gives a stable order; ``preallocation``:
    off, metadata (qcow2) or full (raw). ``live`` hot-plugs into a running
    guest, ``persistent`` adds it to the definition (both default true).
    Returns the disk as ``kvm_disk.list`` shows it. ``test=True`` makes every
    check of the real call (its refusals are the same) and changes nothing.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_disk.attach vm1 data size=10G
        salt hypervisor kvm_disk.attach vm1 archive path=/srv/images/a.raw format=raw readonly=True
    """
    values = {
        "size": size,
        "path": path,
        "format": format,
        "pool": pool,
        "bus": bus,
        "cache": cache,
        "index": index,
        "readonly": readonly,
        "shareable": shareable,
        "preallocation": preallocation,
    }
    with command_errors():
        spec = disks.parse_disk(name, {k: v for k, v in values.items() if v is not None})
    allowed = _allowed_dirs()
    live, persistent = flag(live, "live", True), flag(persistent, "persistent", True)
    if flag(test, "test"):
        return _run(
            uri,
            domain,
            lambda conn, dom: _planned(diskops.plan(conn, dom, spec, allowed, live, persistent)),
        )
    return _run(
        uri,
        domain,
        lambda conn, dom: diskops.attach(conn, dom, spec, allowed, live, persistent),
    )


def _planned(plan):
    """What a checked attach would make (``test=True``)."""
    source = plan.source
    return {
        "name": plan.spec.name,
        "target": plan.target,
        "source": source.path if source is not None else None,
        "format": source.format if source is not None else plan.spec.format,
        "new_volume": source is None,
    }


def detach(
    domain,
    name,
    delete=False,
    live=True,
    persistent=True,
    timeout=120,
    force=False,
    uri=None,
    test=False,
):
    """
    Detach disk ``name`` from ``domain`` (the running guest and the definition).
    ``delete=True`` also deletes its volume: only a volume salt-kvm created
    and no other domain uses. Waits up to ``timeout`` seconds for the guest
    to release a hot-plugged disk. The boot disk is detached only with
    ``force=True`` (the guest would not start again). ``test=True`` makes
    every check of the real call (its refusals are the same) and changes nothing.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_disk.detach vm1 data
        salt hypervisor kvm_disk.detach vm1 vda test=True
        salt hypervisor kvm_disk.detach vm1 data delete=True
    """
    return _run(
        uri,
        domain,
        lambda conn, dom: diskops.detach(
            conn,
            dom,
            name,
            delete=flag(delete, "delete"),
            live=flag(live, "live", True),
            persistent=flag(persistent, "persistent", True),
            timeout=seconds(timeout, "timeout", 0),
            force=flag(force, "force"),
            check_only=flag(test, "test"),
        ),
    )


def resize(domain, name, size, uri=None):
    """
    Grow disk ``name`` of ``domain`` to ``size`` (``20G``; a bare number is
    GiB): live when the guest runs, else its volume. Never shrinks. Returns
    ``{"old": bytes, "new": bytes}``, or ``{}`` when it already has that size.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_disk.resize vm1 data 20G
    """
    with command_errors():
        wanted = disks.parse_size_arg(size)
    return _run(uri, domain, lambda conn, dom: diskops.resize(conn, dom, name, wanted))
