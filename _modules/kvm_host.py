"""
Hypervisor facts and storage pools, from the hypervisor minion.

The libvirt URI comes from the ``uri`` argument, else the minion config or
pillar key ``kvm:connection:uri``, else ``qemu:///system``.
"""

import logging

try:
    import libvirt  # noqa: F401

    from salt_kvm.saltutil import command_errors, connection_for
    from salt_kvm.virt import host

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


def ensure_pool(name, path, uri=None):
    """
    Make ``name`` a running, autostarted ``dir`` storage pool on ``path``.
    Returns the changes (empty when there were none).

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_host.ensure_pool default /var/lib/libvirt/images
    """
    with command_errors(), connection_for(__opts__, __pillar__, uri) as conn:
        return host.ensure_dir_pool(conn, name, path)
