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

import salt.config as config
import salt.utils.cloud
import salt.utils.yaml
from salt.exceptions import SaltCloudConfigError, SaltCloudSystemExit

try:
    import libvirt

    from salt_kvm import __version__
    from salt_kvm.cloud import deploy as cloud_deploy
    from salt_kvm.cloud import intent, inventory, provision
    from salt_kvm.cloud.spec import (
        DEPLOY_SETTING_KEYS,
        KNOWN_KEYS,
        PROFILE_KEYS,
        build_spec,
        check_key_typos,
        check_mapping,
    )
    from salt_kvm.disks import ops as diskops
    from salt_kvm.errors import SaltKvmError, SpecError
    from salt_kvm.images import cache as images
    from salt_kvm.nat import forwards
    from salt_kvm.saltutil import (
        SaltMaster,
        cloud_errors,
        minion_files,
        minion_id,
        profile_prefix,
    )
    from salt_kvm.virt import host, lifecycle
    from salt_kvm.virt.checks import boolean, seconds
    from salt_kvm.virt.connection import connected, open_connection
    from salt_kvm.virt.rollback import Interrupted, Rollback, interruptible

    HAS_LIBS = True
except ImportError as _exc:  # pragma: no cover - depends on the master
    HAS_LIBS = False
    _IMPORT_ERROR = str(_exc)

log = logging.getLogger(__name__)
__virtualname__ = "libvirt"


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
    """Return the first configured provider of this driver (needs ``url``)."""
    return config.is_provider_configured(__opts__, _active_provider(), ("url",))


def _provider_value(key, default=None):
    provider = get_configured_provider() or {}
    return config.get_cloud_config_value(
        key, provider, __opts__, search_global=False, default=default
    )


def _connection_args(vm_=None) -> dict:
    source = vm_ if vm_ is not None else (get_configured_provider() or {})
    get = lambda key, default=None: config.get_cloud_config_value(  # noqa: E731
        key, source, __opts__, search_global=False, default=default
    )
    return {
        "uri": get("url", "qemu:///system"),
        "username": get("libvirt_username"),
        "password": get("libvirt_password"),
    }


def _connect(vm_=None):
    return connected(**_connection_args(vm_))


def _fire(name, step, args):
    __utils__["cloud.fire_event"](
        "event",
        f"{step} instance" if step != "waiting_for_ip" else "waiting for ip",
        f"salt/cloud/{name}/{step}",
        args=args,
        sock_dir=__opts__["sock_dir"],
        transport=__opts__.get("transport", "zeromq"),
    )


def _profile_values(vm_):
    """What build_spec reads; salt-cloud's deploy settings are looked up as
    salt-cloud's own deploy does (the master config too)."""
    values = {"name": vm_.get("name")}
    for key in PROFILE_KEYS + DEPLOY_SETTING_KEYS:
        value = config.get_cloud_config_value(
            key, vm_, __opts__, search_global=key in DEPLOY_SETTING_KEYS
        )
        if value is not None:
            values[key] = value
    return values


def _written_keys(vm_):
    """The keys the user wrote for this VM: its profile's and its provider's
    (``vm_`` also holds every master option)."""
    alias, _, driver = str(vm_.get("provider", "")).partition(":")
    provider = (__opts__.get("providers") or {}).get(alias, {}).get(driver or "libvirt", {})
    profile = (__opts__.get("profiles") or {}).get(vm_.get("profile")) or {}
    return set(profile) | set(provider)


# Keys that widen what the hypervisor exposes: its operator sets them (provider
# or master configuration), never a profile, which a requester may write.
HYPERVISOR_KEYS = ("disk_allowed_dirs", "image_allowed_dirs")


def _check_profile_keys(vm_):
    profile = (__opts__.get("profiles") or {}).get(vm_.get("profile")) or {}
    for key in HYPERVISOR_KEYS:
        if key in profile:
            raise SpecError(
                key,
                "is the hypervisor's setting, not a profile's: a profile could open any "
                "host directory to its guest",
                f"{key} in the provider configuration (cloud.providers.d), or leave it out",
            )


def _spec(vm_):
    with cloud_errors(profile_prefix(vm_)):
        _check_profile_keys(vm_)
        check_key_typos(_written_keys(vm_), KNOWN_KEYS)
        for key in ("minion", "grains"):
            check_mapping(key, config.get_cloud_config_value(key, vm_, __opts__, default=None))
        return build_spec(_profile_values(vm_))


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
    try:
        # Bad input stops here, before anything is made.
        spec = _spec(vm_)
        deploy_plan = None
        if spec.deploy.enabled:
            made = minion_files(__opts__, vm_, spec)
            deploy_plan = cloud_deploy.prepare(spec, made, bool(__opts__.get("keep_tmp", False)))
        grains = config.get_cloud_config_value("grains", vm_, __opts__, default={})
        seed_iso = cloud_deploy.seed_iso(
            spec, deploy_plan, grains, profile=vm_.get("profile"), provider=vm_.get("provider")
        )
    except BaseException as exc:
        # Whatever the type (a Jinja TypeError, an interrupt): nothing stays.
        rollback.run()
        if isinstance(exc, SpecError):
            raise SaltCloudConfigError(f"{profile_prefix(vm_)}{exc}") from exc
        if isinstance(exc, SaltCloudConfigError) or not isinstance(exc, Exception):
            raise
        raise SaltCloudConfigError(f"{profile_prefix(vm_)}{type(exc).__name__}: {exc}") from exc
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
    try:
        with _connect(vm_) as conn, rollback:
            if journal.pending:
                undone = journal.recover(conn)  # the minion key is this run's now
                log.warning("removed what a killed create of %s left: %s", name, undone)
            guest, deployed = cloud_deploy.create(
                SaltMaster(__opts__), conn, spec, deploy_plan, seed_iso, rollback, emit
            )
            vm_["ssh_host"] = guest.addresses[0]
            result = {"name": name, "ip_address": guest.addresses[0], "addresses": guest.addresses}
            if deployed is not None:
                result["deploy"] = deployed
            if guest.virt_type_note:
                result["virt_type_note"] = guest.virt_type_note
            result.update(inventory.describe(conn, guest.domain))
            rollback.forget()
    except Exception as exc:
        # The rollback ran on leaving the block, connection still open.
        failed = rollback.failed or rollback.run()
        leftover = f"; could not remove: {', '.join(failed)}" if failed else ""
        if isinstance(exc, SpecError):
            raise SaltCloudConfigError(f"{profile_prefix(vm_)}{exc}") from exc
        raise SaltCloudSystemExit(
            f"creating {name} failed: {exc}. Everything this run created was removed{leftover}."
        ) from exc
    guest.mark("total")
    result["timings"] = dict(guest.timings)
    emit("created", {"name": name, "ip_address": guest.addresses[0], "timings": result["timings"]})
    if __opts__.get("update_cachedir", False) is True:
        __utils__["cloud.cache_node"](
            {k: v for k, v in result.items() if k != "deploy"}, _active_provider(), __opts__
        )
    return result


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
    if call == "function":
        raise SaltCloudSystemExit("destroy is an action: use -d or -a destroy")
    _fire(name, "destroying", {"name": name})
    with cloud_errors():
        removed = _destroy_on_hypervisor(name, kwargs)
    salt.utils.cloud.remove_key(__opts__["pki_dir"], name)
    if __opts__.get("update_cachedir", False) is True:
        __utils__["cloud.delete_minion_cachedir"](name, _active_provider().split(":")[0], __opts__)
    _fire(name, "destroyed", {"name": name})
    return {"destroyed": True, **removed}


def _destroy_on_hypervisor(name, kwargs):
    delete_disks = boolean(kwargs or {}, "delete_disks", False)
    with _connect() as conn:
        dom = lifecycle.lookup(conn, name)
        info = lifecycle.managed_info(dom) or {}
        doomed, kept = diskops.split_for_destroy(dom, delete_disks)
        removed = lifecycle.remove(conn, name, also=doomed)
        removed["reservations"] = provision.release_reservations(conn, info)
        removed.update(disks=diskops.delete_volumes(conn, doomed), kept_disks=kept)
    removed["nat"] = forwards.forget(name)
    return removed


def _action(name, call, what, fn):
    if call != "action":
        raise SaltCloudSystemExit(f"{what} is an action: use -a {what}")
    with cloud_errors(also=(libvirt.libvirtError,)), _connect() as conn:
        dom = lifecycle.lookup(conn, name)
        if lifecycle.managed_info(dom) is None:
            raise SaltKvmError(f"{name!r} was not created by salt-kvm")
        fn(dom)
        return {name: inventory.state_of(dom)}


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

    def stop_domain(dom):
        if not lifecycle.shutdown(dom, timeout):
            raise SaltKvmError(f"{name} is still running {timeout:g}s after the shutdown request")

    return _action(name, call, "stop", stop_domain)


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
    if call != "action":
        raise SaltCloudSystemExit("show_instance is an action: use -a show_instance")
    with cloud_errors():
        with _connect() as conn:
            info = inventory.describe(conn, lifecycle.lookup(conn, name))
        info["nat"] = forwards.listing(name).get(name, {}).get("forwards", [])
        return info


def list_nodes_full(call=None):
    """
    Every guest salt-kvm created on this provider's hypervisor, with all details.

    CLI Example:

    .. code-block:: bash

        salt-cloud -F
    """
    if call == "action":
        raise SaltCloudSystemExit("list_nodes_full is a function: use -F or -f list_nodes_full")
    return _live_nodes(inventory.managed)


def _live_nodes(lister):
    """The nodes ``lister`` finds on the hypervisor. A killed create's
    half-made domain is not one: salt-cloud would refuse to create the name
    again ("already exists") instead of letting the driver clear it."""
    with cloud_errors(), _connect() as conn:
        nodes = lister(conn)
    for name in intent.killed(__opts__):
        nodes.pop(name, None)
    return nodes


def list_nodes(call=None):
    """
    Every guest salt-kvm created, with the fields salt-cloud -Q shows.

    CLI Example:

    .. code-block:: bash

        salt-cloud -Q
    """
    if call == "action":
        raise SaltCloudSystemExit("list_nodes is a function: use -Q or -f list_nodes")
    keys = ("id", "name", "state", "public_ips", "private_ips", "size", "image")
    return {name: {k: node.get(k) for k in keys} for name, node in list_nodes_full().items()}


def list_nodes_min(call=None):
    """
    Every guest salt-kvm created, with only its state: what salt-cloud needs
    to know which names exist (a map run asks this first), without the disks,
    leases and agent of ``list_nodes``.

    CLI Example:

    .. code-block:: bash

        salt-cloud -f list_nodes_min my-provider
    """
    if call == "action":
        raise SaltCloudSystemExit("list_nodes_min is a function: use -f list_nodes_min")
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
    if call == "action":
        raise SaltCloudSystemExit("avail_images is a function: use --list-images")
    with cloud_errors(), _connect() as conn:
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
    The hypervisor this provider manages, with its versions.

    CLI Example:

    .. code-block:: bash

        salt-cloud --list-locations my-kvm-provider
    """
    if call == "action":
        raise SaltCloudSystemExit("avail_locations is a function: use -f or --list-locations")
    url = _provider_value("url", "qemu:///system")
    with cloud_errors(), _connect() as conn:
        facts = host.info(conn)
    facts["driver"] = f"salt-kvm {__version__}"
    return {url: facts}


# ---- image cache ---------------------------------------------------------------


def _image_function(call, what):
    if call != "function":
        raise SaltCloudSystemExit(f"{what} is a function: use -f {what} <provider>")


def image_list(kwargs=None, call=None):
    """
    The base images cached in the hypervisor's pools (profile ``image:``), with
    the domains that use them; ``pool=NAME`` lists one pool only.

    CLI Example:

    .. code-block:: bash

        salt-cloud -f image_list my-kvm-provider
        salt-cloud -f image_list my-kvm-provider pool=default
    """
    _image_function(call, "image_list")
    kwargs = kwargs or {}
    with cloud_errors(), _connect() as conn:
        return images.list_images(conn, kwargs.get("pool"))


def image_delete(kwargs=None, call=None):
    """
    Delete a cached base image (``name=`` from ``image_list``); refused while
    any domain's disk is the image or a linked clone of it.

    CLI Example:

    .. code-block:: bash

        salt-cloud -f image_delete my-kvm-provider name=image-sha256-0123abcd....qcow2
    """
    _image_function(call, "image_delete")
    kwargs = kwargs or {}
    if not kwargs.get("name"):
        raise SaltCloudSystemExit("image_delete needs name=<a name from image_list>")
    with cloud_errors(), _connect() as conn:
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
    if call != "function":
        raise SaltCloudSystemExit("cleanup is a function: use -f cleanup <provider>")
    remove_key = lambda key_id: salt.utils.cloud.remove_key(__opts__["pki_dir"], key_id)  # noqa: E731
    removed = {}
    with cloud_errors(), _connect() as conn:
        for journal in intent.journals(__opts__):
            try:
                records = journal.stale()
                if records is None:
                    continue
                removed[journal.name] = intent.undo(conn, records, remove_key)
                journal.path.unlink()
            except SaltKvmError as exc:
                removed[journal.name] = {"error": str(exc)}
    return removed
