"""
Hypervisor facts and storage pools, from the hypervisor minion.

The libvirt URI comes from the ``uri`` argument, else the minion config or
pillar key ``kvm:connection:uri``, else ``qemu:///system``.
"""

import logging

try:
    import libvirt  # noqa: F401

    from salt_kvm import redact
    from salt_kvm.cloud import migration
    from salt_kvm.errors import SpecError
    from salt_kvm.saltutil import command_errors, connection_for, flag
    from salt_kvm.virt import host
    from salt_kvm.virt import migrate as vmigrate
    from salt_kvm.virt.checks import uri as check_uri
    from salt_kvm.virt.connection import connected

    HAS_LIBS = True
except ImportError as _exc:  # pragma: no cover - depends on the minion
    HAS_LIBS = False
    _IMPORT_ERROR = str(_exc)

log = logging.getLogger(__name__)
__virtualname__ = "kvm_host"


def __virtual__():
    if not HAS_LIBS:
        return (False, f"kvm_host needs salt_kvm and libvirt-python: {_IMPORT_ERROR}")
    return __virtualname__


def info(uri=None):
    """
    Return the hypervisor's versions, whether KVM acceleration is available,
    whether QEMU's user can open ``/dev/kvm`` (``kvm_access``: ok, denied,
    absent, or unknown for a remote URI; ``warnings`` holds the fix when
    denied), and its storage pools and networks.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_host.info
        salt hypervisor kvm_host.info uri=qemu+ssh://root@kvm1/system
    """
    with command_errors(), connection_for(__opts__, __pillar__, uri) as conn:
        return host.info(conn)


def pool_info(name, uri=None):
    """
    Return a storage pool's type, path and whether it is active and autostarted,
    or ``None`` when it does not exist.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_host.pool_info default
    """
    with command_errors(), connection_for(__opts__, __pillar__, uri) as conn:
        return host.pool_state(conn, name)


def ensure_pool(name, path, uri=None, adopt=False):
    """
    Make ``name`` a running, autostarted ``dir`` storage pool on ``path``.
    Returns the changes (empty when there were none). ``path`` is absolute,
    without ``.``/``..`` parts; on this host a path through a symlink is
    refused naming where it leads, and a new pool on a directory that already
    holds files needs ``adopt=True`` (each file becomes a volume).

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_host.ensure_pool default /var/lib/libvirt/images
    """
    with command_errors(), connection_for(__opts__, __pillar__, uri) as conn:
        return host.ensure_dir_pool(conn, name, path, flag(adopt, "adopt"))


def migrate(name, uri, copy_base=False, address=None, port=None, source_uri=None):
    """
    Move domain ``name`` from this hypervisor to the one at ``uri`` with its
    disks (no shared storage needed): live when it runs, offline when it is
    shut off; for states and orchestration (``salt-cloud -a migrate`` does
    the same with the provider's host names). Everything the target must
    offer is checked first and every cause of a refusal named; on failure the
    guest stays here as it was and nothing is left on the target. A quick
    clone's base must be on the target (``copy_base=True`` copies it there).
    ``address``/``port``: where the QEMU stream goes (default: the host of
    ``uri``, on a port the target's libvirtd picks). Fires
    ``salt/kvm/<name>/migrating`` ... ``migrated`` events.

    CLI Example:

    .. code-block:: bash

        salt hv1 kvm_host.migrate vm1 uri=qemu+ssh://root@hv2.example.com/system
        salt hv1 kvm_host.migrate vm1 uri=qemu+ssh://root@hv2/system copy_base=True port=49300
    """
    with command_errors(f"migrate {name}: ", also=(libvirt.libvirtError,)):
        if not isinstance(uri, str) or not uri.strip():
            raise SpecError("uri", "is required", "the target hypervisor's libvirt URI")
        check_uri(uri, "uri")
        request = vmigrate.parse_request({"copy_base": copy_base, "address": address, "port": port})
        target = redact.url(uri)
        with connection_for(__opts__, __pillar__, source_uri) as conn, connected(uri) as dconn:
            planned = migration.plan(conn, dconn, name, ("this host", target), uri, request)
            return migration.run(conn, dconn, planned, _event_sender(name))


def _event_sender(name):
    def send(step, data):
        try:
            __salt__["event.send"](f"salt/kvm/{name}/{step}", data)
        except Exception as exc:  # noqa: BLE001 - an event never fails the migration
            log.debug("event %s of %s not sent: %s", step, name, exc)

    return send
