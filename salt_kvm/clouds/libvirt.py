"""
salt-kvm's libvirt cloud driver for salt-cloud.

A drop-in replacement for the ``libvirt`` driver of Salt 3007 (dropped from
Salt 3008): the same provider and profile keys, with the same meaning.

.. code-block:: yaml

    # /etc/salt/cloud.providers.d/kvm.conf
    local-kvm:
      driver: libvirt
      url: qemu:///system

See the salt-kvm documentation for every profile key.
"""

import logging

from salt.exceptions import SaltCloudSystemExit

try:
    import libvirt  # noqa: F401

    from salt_kvm import __version__, host
    from salt_kvm.connection import connected
    from salt_kvm.errors import SaltKvmError

    HAS_LIBS = True
except ImportError as _exc:  # pragma: no cover - depends on the master
    HAS_LIBS = False
    _IMPORT_ERROR = str(_exc)

log = logging.getLogger(__name__)
__virtualname__ = "libvirt"


def __virtual__():
    if not HAS_LIBS:
        return (
            False,
            f"salt-kvm's libvirt driver needs salt_kvm and libvirt-python: {_IMPORT_ERROR}",
        )
    return __virtualname__


def _active_provider():
    return __active_provider_name__ or __virtualname__


def get_configured_provider():
    """Return the first configured provider of this driver (needs ``url``)."""
    import salt.config as config

    return config.is_provider_configured(__opts__, _active_provider(), ("url",))


def _provider_url():
    import salt.config as config

    provider = get_configured_provider()
    return config.get_cloud_config_value(
        "url", provider or {}, __opts__, search_global=False, default="qemu:///system"
    )


def avail_locations(call=None):
    """
    List the hypervisor this provider manages, with its versions.

    CLI Example:

    .. code-block:: bash

        salt-cloud --list-locations my-kvm-provider
    """
    if call == "action":
        raise SaltCloudSystemExit("avail_locations is a function: use -f or --list-locations")
    url = _provider_url()
    try:
        with connected(url) as conn:
            facts = host.info(conn)
    except SaltKvmError as exc:
        raise SaltCloudSystemExit(str(exc)) from exc
    facts["driver"] = f"salt-kvm {__version__}"
    return {url: facts}
