"""
salt-kvm's libvirt cloud driver for salt-cloud.

A drop-in replacement for the ``libvirt`` driver of Salt 3007 (dropped from
Salt 3008): the same provider and profile keys, with the same meaning, plus
sizing, NICs, DHCP reservations, virt_type and faster address learning.

.. code-block:: yaml

    # /etc/salt/cloud.providers.d/kvm.conf
    local-kvm:
      driver: libvirt
      url: qemu:///system

    # /etc/salt/cloud.profiles.d/kvm.conf
    centos7:
      provider: local-kvm
      base_domain: base-centos7-64
      ip_source: ip-learning
      ssh_username: root
      password: my-very-secret-password

See the salt-kvm documentation (docs/cloud.rst) for every key.
"""

import logging
import time
from typing import Any

import salt.config as config
import salt.utils.cloud
import salt.utils.yaml
from salt.exceptions import SaltCloudSystemExit

try:
    import libvirt

    from salt_kvm import __version__, saltcloud
    from salt_kvm.cloud import actions, intent, inventory, placement
    from salt_kvm.cloud import console as guest_console
    from salt_kvm.cloud import deploy as cloud_deploy
    from salt_kvm.cloud import migration as guest_migration
    from salt_kvm.cloud.spec import (
        build_spec,
        check_mapping,
        check_written_keys,
    )
    from salt_kvm.images import cache as images
    from salt_kvm.saltutil import (
        SaltMaster,
        cloud_errors,
        connection_args,
        create_errors,
        input_errors,
        minion_files,
        minion_id,
        profile_prefix,
        profile_values,
        written_config,
    )
    from salt_kvm.virt import host
    from salt_kvm.virt import migrate as vmigrate
    from salt_kvm.virt.checks import boolean, seconds
    from salt_kvm.virt.connection import DEFAULT_URI, connected, open_connection
    from salt_kvm.virt.rollback import Interrupted, Rollback, interruptible

    HAS_LIBS = True
except ImportError as _exc:  # pragma: no cover - depends on the master
    HAS_LIBS = False
    _IMPORT_ERROR = str(_exc)

log = logging.getLogger(__name__)
__virtualname__ = "libvirt"
# Injected by Salt's loader (declared for the type checker).
__opts__: dict[str, Any]
__utils__: dict[str, Any]
__active_provider_name__: str | None


def __virtual__():
    if not HAS_LIBS:
        why = f"salt-kvm's libvirt driver needs salt_kvm and libvirt-python: {_IMPORT_ERROR}"
        # salt-cloud itself says only "could not be loaded": the cause, at a
        # level the user sees by default.
        log.warning("%s (install them into Salt's Python, see salt-kvm's docs/install)", why)
        return (False, why)
    return __virtualname__


def _active_provider():
    return __active_provider_name__ or __virtualname__


def get_configured_provider():
    """Return the first configured provider of this driver (needs ``url``, or
    ``hosts`` for several hypervisors)."""
    several = config.is_provider_configured(
        __opts__, _active_provider(), ("hosts",), log_message=False
    )
    return several or config.is_provider_configured(__opts__, _active_provider(), ("url",))


def _provider_value(key, default=None):
    provider = get_configured_provider() or {}
    return config.get_cloud_config_value(
        key, provider, __opts__, search_global=False, default=default
    )


def _connection_args(vm_=None) -> dict:
    return connection_args(__opts__, vm_ if vm_ is not None else (get_configured_provider() or {}))


def _connect(vm_=None):
    return connected(**_connection_args(vm_))


def _fleet(source=None):
    """The provider's hosts (``hosts``: several hypervisors), or None (``url``: one)."""
    if source is None:
        # No providers in the options: no hosts to read (a call outside salt-cloud).
        source = (get_configured_provider() if __opts__.get("providers") else None) or {}
    return saltcloud.provider_fleet(__opts__, source)


def _guest_connection(name):
    return saltcloud.guest_connection(_fleet(), _connect, name)


def _fire(name, step, args):
    __utils__["cloud.fire_event"](
        "event",
        f"{step} instance" if step != "waiting_for_ip" else "waiting for ip",
        f"salt/cloud/{name}/{step}",
        args=args,
        sock_dir=__opts__["sock_dir"],
        transport=__opts__.get("transport", "zeromq"),
    )


def _spec(vm_):
    with cloud_errors(profile_prefix(vm_)):
        check_written_keys(*written_config(__opts__, vm_))
        for key in ("minion", "grains"):
            check_mapping(key, config.get_cloud_config_value(key, vm_, __opts__, default=None))
        return build_spec(profile_values(__opts__, vm_))


# ---- create ------------------------------------------------------------------


def create(vm_):
    """
    Clone the profile's base domain into a new guest, boot it, learn its IP
    and make it a minion.

    CLI Example:

    .. code-block:: bash

        salt-cloud -p centos7 vm1
    """
    # Any failure rolls back: an error of any type, and SIGINT, SIGTERM or
    # SIGHUP (they raise inside the block; the process then exits as it would
    # have, with nothing of this run left).
    try:
        with interruptible():
            return _create(vm_)
    except Interrupted as exc:
        raise SaltCloudSystemExit(
            f"creating {vm_['name']} was {exc}; everything this run created was removed."
        ) from exc
    finally:
        if "cachedir" in __opts__:
            placement.Placements(__opts__["cachedir"]).release(vm_["name"])


def _create(vm_):
    name = vm_["name"]
    # The intent journal: what a SIGKILL of this run would leave, for the next
    # create of the name (or -f cleanup) to undo. A killed run's is taken over.
    journal = intent.Journal.in_cache(__opts__, name)
    with cloud_errors(profile_prefix(vm_), f"creating {name}: ", also=(OSError,)):
        journal.begin(keep=journal.stale())
    rollback = Rollback(reconnect=lambda: open_connection(**_connection_args(vm_)), journal=journal)
    if vm_.get("pub_key"):
        # salt-cloud accepted this minion's key before calling us: a failed
        # create (even on bad input) must not leave it behind.
        key_id = minion_id(__opts__, vm_)
        rollback.intend("key", id=key_id)
        rollback.add(
            f"minion key {key_id}", lambda: salt.utils.cloud.remove_key(__opts__["pki_dir"], key_id)
        )
    # Bad input stops here, before anything is made; whatever the failure, nothing stays.
    with input_errors(profile_prefix(vm_)), rollback:
        spec = _spec(vm_)
        deploy_plan = None
        if spec.deploy.enabled:
            made = minion_files(__opts__, vm_, spec)
            deploy_plan = cloud_deploy.prepare(spec, made, bool(__opts__.get("keep_tmp", False)))
        grains = config.get_cloud_config_value("grains", vm_, __opts__, default={})
        seed_iso = cloud_deploy.seed_iso(
            spec, deploy_plan, grains, profile=vm_.get("profile"), provider=vm_.get("provider")
        )
    placed = saltcloud.place(__opts__, vm_, spec, rollback, journal)
    started = time.monotonic()
    log.info("creating %s (profile %s)", name, vm_.get("profile"))

    def emit(step, data):
        _fire(name, step, {**data, "elapsed": round(time.monotonic() - started, 2)})

    if __opts__.get("update_cachedir", False) is True:
        __utils__["cloud.cachedir_index_add"](
            name, vm_.get("profile"), "libvirt", vm_.get("driver", _active_provider())
        )

    emit(
        "creating",
        __utils__["cloud.filter_event"]("creating", vm_, ["name", "profile", "provider", "driver"]),
    )
    # The rollback runs on leaving the block with an error, connection still open.
    with create_errors(name, profile_prefix(vm_), lambda: rollback.failed or rollback.run()):
        with _connect(vm_) as conn, rollback:
            if journal.pending:
                undone = journal.recover(conn)  # the minion key is this run's now
                log.warning("removed what a killed create of %s left: %s", name, undone)
            with saltcloud.peer_leases(placed):
                guest, deployed = cloud_deploy.create(
                    SaltMaster(__opts__), conn, spec, deploy_plan, seed_iso, rollback, emit
                )
            vm_["ssh_host"] = guest.addresses[0]
            result = actions.created(conn, guest, deployed)
            if placed is not None:
                result["location"] = placed[1]
            rollback.forget()
    guest.mark("total")
    result["timings"] = dict(guest.timings)
    emit("created", {"name": name, "ip_address": guest.addresses[0], "timings": result["timings"]})
    if __opts__.get("update_cachedir", False) is True:
        __utils__["cloud.cache_node"](
            {k: v for k, v in result.items() if k != "deploy"}, _active_provider(), __opts__
        )
    return result


def _host_connection(kwargs):
    return saltcloud.host_connection(_fleet(), _connect, kwargs)


# ---- destroy and actions -----------------------------------------------------


def destroy(name, kwargs=None, call=None):
    """
    Remove a guest salt-kvm created: the domain, the volumes it created (never
    the base's), its DHCP reservations and its minion key. External disks
    (``disks:``) are kept unless the profile had ``delete_disks: true`` or the
    call passes ``delete_disks=true``; disks attached from a path never go.

    CLI Example:

    .. code-block:: bash

        salt-cloud -d vm1
        salt-cloud -a destroy vm1 delete_disks=true
    """
    _only(call != "function", "destroy is an action: use -d or -a destroy")
    with cloud_errors():
        delete_disks = boolean(kwargs or {}, "delete_disks", False)
    _fire(name, "destroying", {"name": name})
    with cloud_errors():
        removed = _destroy_on_hypervisor(name, delete_disks)
    for key_id in _minion_keys(name, removed.get("minion_id")):
        salt.utils.cloud.remove_key(__opts__["pki_dir"], key_id)
    if __opts__.get("update_cachedir", False) is True:
        __utils__["cloud.delete_minion_cachedir"](name, _active_provider().split(":")[0], __opts__)
    _fire(name, "destroyed", {"name": name})
    return {"destroyed": True, **removed}


def _minion_keys(name, recorded):
    """The VM's name, and the minion id recorded at create when it differs
    (``minion: id``, ``append_domain``): only a plain key name, never a path."""
    keys = [name]
    if (
        isinstance(recorded, str)
        and recorded != name
        and recorded not in ("", ".", "..")
        and "/" not in recorded
        and recorded.isprintable()
    ):
        keys.append(recorded)
    return keys


def _destroy_on_hypervisor(name, delete_disks):
    with _guest_connection(name) as conn:
        return actions.destroy(conn, name, delete_disks)


def _only(allowed, refusal):
    """salt-cloud's -a (action) / -f (function) check."""
    if not allowed:
        raise SaltCloudSystemExit(refusal)


def _action(name, call, what, fn):
    _only(call == "action", f"{what} is an action: use -a {what}")
    with cloud_errors(also=(libvirt.libvirtError,)), _guest_connection(name) as conn:
        return actions.on_managed(conn, name, fn)


def start(name, call=None):
    """
    Start a stopped guest.

    CLI Example:

    .. code-block:: bash

        salt-cloud -a start vm1
    """
    return _action(name, call, "start", lambda dom: dom.isActive() or dom.create())


def stop(name, call=None):
    """
    Shut a guest down cleanly (guest agent, else the ACPI power button) and
    wait until it is off (``stop_timeout`` seconds in the provider, default 180).

    CLI Example:

    .. code-block:: bash

        salt-cloud -a stop vm1
    """
    with cloud_errors():
        timeout = seconds(_provider_value("stop_timeout", 180), "stop_timeout", 0)
    return _action(name, call, "stop", actions.stopper(name, timeout))


def reboot(name, call=None):
    """
    Reboot a running guest.

    CLI Example:

    .. code-block:: bash

        salt-cloud -a reboot vm1
    """
    return _action(name, call, "reboot", lambda dom: dom.reboot(0))


def show_instance(name, call=None):
    """
    Show a guest's state, addresses, size, base and NAT forwards.

    CLI Example:

    .. code-block:: bash

        salt-cloud -a show_instance vm1
    """
    _only(call == "action", "show_instance is an action: use -a show_instance")
    with cloud_errors():
        hosts = _fleet()
        if hosts is None:
            with _connect() as conn:
                return actions.describe(conn, name)
        with hosts.guest(name) as (host, conn):
            return {**actions.describe(conn, name), "location": host}


def console(name, call=None):
    """
    How to reach a running guest's console (profile key ``graphics``): type,
    address, port, its password and, for a hypervisor on another host, the SSH
    tunnel line to run first. The password is shown to the caller only.

    CLI Example:

    .. code-block:: bash

        salt-cloud -a console vm1
    """
    _only(call == "action", "console is an action: use -a console")
    with cloud_errors(also=(libvirt.libvirtError,)), _guest_connection(name) as conn:
        return guest_console.console(conn, name)


def screenshot(name, kwargs=None, call=None):
    """
    Save a running guest's screen as a PNG at ``path`` (on this machine, as
    this user; an existing file only with ``overwrite=true``).

    CLI Example:

    .. code-block:: bash

        salt-cloud -a screenshot vm1 path=/tmp/vm1.png
    """
    _only(call == "action", "screenshot is an action: use -a screenshot")
    kwargs = kwargs or {}
    with cloud_errors(also=(libvirt.libvirtError, OSError)):
        path = guest_console.check_screenshot_path(kwargs.get("path"))
        overwrite = boolean(kwargs, "overwrite", False)
        with _guest_connection(name) as conn:
            return guest_console.screenshot(conn, name, path, overwrite)


def list_nodes_full(call=None):
    """
    Every guest salt-kvm created on this provider's hypervisor, with all details.

    CLI Example:

    .. code-block:: bash

        salt-cloud -F
    """
    _only(call != "action", "list_nodes_full is a function: use -F or -f list_nodes_full")
    return _live_nodes(inventory.managed)


def _live_nodes(lister):
    with cloud_errors():
        hosts = _fleet()
        if hosts is not None:
            return hosts.nodes(__opts__, lister)
        with _connect() as conn:
            return actions.live_nodes(conn, __opts__, lister)


def list_nodes(call=None):
    """
    Every guest salt-kvm created, with the fields salt-cloud -Q shows.

    CLI Example:

    .. code-block:: bash

        salt-cloud -Q
    """
    _only(call != "action", "list_nodes is a function: use -Q or -f list_nodes")
    keys = ("id", "name", "state", "public_ips", "private_ips", "size", "image")
    nodes = list_nodes_full()
    return {
        name: {k: node.get(k) for k in (*keys, "location") if k in node or k in keys}
        for name, node in nodes.items()
    }


def list_nodes_min(call=None):
    """
    Every guest salt-kvm created, with only its state: what salt-cloud needs
    to know which names exist (a map run asks this first), without the disks,
    leases and agent of ``list_nodes``.

    CLI Example:

    .. code-block:: bash

        salt-cloud -f list_nodes_min my-provider
    """
    _only(call != "action", "list_nodes_min is a function: use -f list_nodes_min")
    return _live_nodes(inventory.managed_min)


def list_nodes_select(call=None):
    """
    The fields of ``query.selection`` for every guest salt-kvm created.

    CLI Example:

    .. code-block:: bash

        salt-cloud -S
    """
    return salt.utils.cloud.list_nodes_select(list_nodes_full(), __opts__["query.selection"], call)


def avail_images(call=None):
    """
    Domains usable as ``base_domain``: shut-off domains salt-kvm did not create.

    CLI Example:

    .. code-block:: bash

        salt-cloud --list-images my-kvm-provider
    """
    _only(call != "action", "avail_images is a function: use --list-images")
    with cloud_errors():
        hosts = _fleet()
        if hosts is not None:
            return hosts.base_domains()
        with _connect() as conn:
            return inventory.base_domains(conn)


def avail_sizes(call=None):
    """
    libvirt has no fixed sizes: profiles set ``cpus``, ``memory`` and ``disk_size``.

    CLI Example:

    .. code-block:: bash

        salt-cloud --list-sizes my-kvm-provider
    """
    return {}


def avail_locations(call=None):
    """
    The hypervisor this provider manages, with its versions; with ``hosts``,
    each host with its memory, committed memory (running and autostart
    guests), uncommitted memory and salt-kvm guests (a host that does not
    answer: its error).

    CLI Example:

    .. code-block:: bash

        salt-cloud --list-locations my-kvm-provider
    """
    _only(call != "action", "avail_locations is a function: use -f or --list-locations")
    with cloud_errors():
        hosts = _fleet()
    if hosts is not None:
        return hosts.locations()
    url = _provider_value("url", DEFAULT_URI)
    with cloud_errors(), _connect() as conn:
        facts = host.info(conn)
    facts["driver"] = f"salt-kvm {__version__}"
    return {url: facts}


# ---- image cache ---------------------------------------------------------------


def image_list(kwargs=None, call=None):
    """
    The base images cached in the hypervisor's pools (profile ``image:``), with
    the domains that use them; ``pool=NAME`` lists one pool only.

    CLI Example:

    .. code-block:: bash

        salt-cloud -f image_list my-kvm-provider
        salt-cloud -f image_list my-kvm-provider pool=default
        salt-cloud -f image_list my-cluster location=hv2
    """
    _only(call == "function", "image_list is a function: use -f image_list <provider>")
    kwargs = kwargs or {}
    with cloud_errors(), _host_connection(kwargs) as conn:
        return images.list_images(conn, kwargs.get("pool"))


def image_delete(kwargs=None, call=None):
    """
    Delete a cached base image (``name=`` from ``image_list``); refused while
    any domain's disk is the image or a linked clone of it.

    CLI Example:

    .. code-block:: bash

        salt-cloud -f image_delete my-kvm-provider name=image-sha256-0123abcd....qcow2
        salt-cloud -f image_delete my-cluster location=hv2 name=image-sha256-0123abcd....qcow2
    """
    _only(call == "function", "image_delete is a function: use -f image_delete <provider>")
    kwargs = kwargs or {}
    if not kwargs.get("name"):
        raise SaltCloudSystemExit("image_delete needs name=<a name from image_list>")
    with cloud_errors(), _host_connection(kwargs) as conn:
        return images.delete_image(conn, kwargs["name"], kwargs.get("pool"))


# ---- what killed runs left ------------------------------------------------------


def cleanup(kwargs=None, call=None):
    """
    Remove what creates killed with SIGKILL (or a power cut) left: the domain,
    volumes, seed, DHCP reservations, NAT forwards and minion key each had
    written down before making them. Only runs whose process is gone are
    touched; a create of the same name does this by itself first.

    CLI Example:

    .. code-block:: bash

        salt-cloud -f cleanup my-kvm-provider
    """
    _only(call == "function", "cleanup is a function: use -f cleanup <provider>")
    remove_key = lambda key_id: salt.utils.cloud.remove_key(__opts__["pki_dir"], key_id)  # noqa: E731
    with cloud_errors():
        hosts = _fleet()
        if hosts is None:
            with _connect() as conn:
                return actions.cleanup(conn, __opts__, remove_key)
        return saltcloud.cleanup_hosts(__opts__, hosts, remove_key)


# ---- migration (issue #15 item 2) ----------------------------------------------


def migrate(name, kwargs=None, call=None):
    """
    Move a guest to another host of the provider (``location=<host>``) with
    its disks, no shared storage needed: a running guest live, a shut-off one
    offline. Refused before anything moves, naming every cause. A quick
    clone's base must be on the target (``copy_base=true`` copies it there);
    ``address``/``port`` set where the QEMU stream goes (default: the target's
    host name, on a port the target's libvirtd picks). Fires
    ``salt/cloud/<name>/migrating`` ... ``migrated`` events.

    CLI Example:

    .. code-block:: bash

        salt-cloud -a migrate vm1 location=hv2
        salt-cloud -a migrate vm1 location=hv2 copy_base=true address=10.0.0.2 port=49300
    """
    _only(call == "action", "migrate is an action: use -a migrate")
    kwargs = dict(kwargs or {})
    with cloud_errors(f"migrate {name}: ", f"migrate {name}: ", also=(libvirt.libvirtError,)):
        hosts = _fleet()
        guest_migration.check_target(kwargs.get("location"), hosts.hosts if hosts else None)
        request = vmigrate.parse_request(kwargs, ignore=("location",))
        return guest_migration.across(
            hosts,
            name,
            kwargs["location"],
            request,
            __opts__["cachedir"],
            lambda step, data: _fire(name, step, data),
        )
