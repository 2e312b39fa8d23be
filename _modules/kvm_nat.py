"""
NAT port forwards from the hypervisor to its guests (host port → guest port).

Guest port ``p`` is forwarded from host port ``10000 + p`` unless a host port
is given (SlapOS's ``nat-rules``); ``rules=True`` means ports 22, 80 and 443.
The forwards live in salt-kvm's own nftables table, replaced in one
transaction per call, and come back after network restarts, libvirtd
restarts and reboots through libvirt hooks (``kvm_nat.install_hooks``);
``apply``, ``add`` and ``list`` say when those hooks are not active.

Settings (pillar or minion config): ``kvm:nat:max_rules`` (per domain,
default 64), ``kvm:connection:uri``.
"""

import logging

try:
    import libvirt  # noqa: F401

    from salt_kvm.errors import SaltKvmError
    from salt_kvm.nat import firewall as hostnet
    from salt_kvm.nat import forwards, hookfiles, hooks
    from salt_kvm.nat import rules as nat
    from salt_kvm.nat.store import Store
    from salt_kvm.saltutil import command_errors, config_value, connection_for, flag
    from salt_kvm.virt.checks import whole_number

    HAS_LIBS = True
except ImportError as _exc:  # pragma: no cover - depends on the minion
    HAS_LIBS = False
    _IMPORT_ERROR = str(_exc)

log = logging.getLogger(__name__)
__virtualname__ = "kvm_nat"
__func_alias__ = {"list_": "list"}


def __virtual__():
    if not HAS_LIBS:
        return (False, f"kvm_nat needs salt_kvm and libvirt-python: {_IMPORT_ERROR}")
    missing = hostnet.available()
    if missing:
        return (False, f"kvm_nat: {missing}")
    return __virtualname__


def _max_rules():
    value = config_value(__opts__, __pillar__, "kvm:nat:max_rules", nat.DEFAULT_MAX_RULES)
    with command_errors():
        return whole_number(value, "kvm:nat:max_rules", 0)


def _hooks_warning(changes, name=None):
    """``changes`` plus, when the hooks that keep forwards alive are not
    active, a ``warning`` saying so and what to do, and the hooks' latest
    logged failures about the domain or its network (``hook_errors``)."""
    active, why = hookfiles.status()
    if not active:
        changes = {**changes, "warning": why}
    if name is not None:
        errors = hooks.problems(_names(name))
        if errors:
            changes = {**changes, "hook_errors": errors}
    return changes


def _call(fn, uri=None):
    with command_errors(), connection_for(__opts__, __pillar__, uri) as conn:
        return fn(conn)


def add(name, guest_port, host_port=None, proto="tcp", host_address=None, uri=None):
    """
    Forward ``host_port`` (default 10000 + ``guest_port``) on the host to
    ``guest_port`` of domain ``name``. Returns the changes (empty: it existed).

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_nat.add vm1 22
        salt hypervisor kvm_nat.add vm1 53 host_port=5353 proto=udp
        salt hypervisor kvm_nat.add vm1 80 host_address=203.0.113.7
        salt hypervisor kvm_nat.add vm1 22 host_address=2001:db8::7  # IPv6 only
    """
    changes = _call(
        lambda conn: forwards.add(
            conn,
            name,
            guest_port,
            host_port=host_port,
            proto=proto,
            host_address=host_address,
            max_rules=_max_rules(),
        ),
        uri,
    )
    return _hooks_warning(changes, name)


def remove(name, guest_port=None, host_port=None, proto="tcp", uri=None):
    """
    Remove the forwards of domain ``name`` to ``guest_port`` (and/or from
    ``host_port``). Returns the changes (empty: there was none).

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_nat.remove vm1 22
        salt hypervisor kvm_nat.remove vm1 host_port=5353 proto=udp
    """
    return _call(
        lambda conn: forwards.remove(
            conn, name, guest_port, host_port=host_port, proto=proto, max_rules=_max_rules()
        ),
        uri,
    )


def list_(name=None):
    """
    The forwards of every domain (or of ``name``): ports, guest address,
    whether each one is in the kernel's table and passes libvirt's forward
    rules now (``active``; ``firewall`` says how, or why not), whether the libvirt hooks
    that put them back after restarts are active (``hooks``), the hooks'
    latest failures about the domain or its network (``hook_errors``) and the
    userspace relays for ``[::1]`` and IPv6 to an IPv4-only guest (``relays``:
    ``listen``, ``to``, ``running``).

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_nat.list
        salt hypervisor kvm_nat.list vm1
    """
    with command_errors():
        listed = forwards.listing(name)
        active, why = hookfiles.status()
    for domain, info in listed.items():
        info["hooks"] = "active" if active else why
        info["hook_errors"] = hooks.problems({domain, info["network"]})
    return listed


def apply(name, rules=None, test=False, uri=None, remove_all=False):
    """
    Make ``rules`` exactly the forwards of domain ``name``, in one transaction:
    what is missing is added, what is not listed is removed, and the guest's
    current address is used. ``rules``: a list of ports or of ``{guest, host,
    proto, host_address}`` mappings, or ``True`` for 22 80 443. Removing every
    forward takes ``remove_all=True`` (without ``rules``): a call without
    rules, or with an empty set (``[]``, ``''``, ``0``: a pillar lookup that
    found nothing), is refused by name and changes nothing. Returns old/new
    (empty: nothing changed).

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_nat.apply vm1 rules='[22, 80, 443]'
        salt hypervisor kvm_nat.apply vm1 rules='[{guest: 53, host: 5353, proto: udp}]'
        salt hypervisor kvm_nat.apply vm1 remove_all=True
    """
    with command_errors():
        rules = nat.check_rule_set(rules, flag(remove_all, "remove_all"))
    test = flag(test, "test")
    changes = _call(lambda conn: forwards.apply(conn, name, rules, _max_rules(), test=test), uri)
    return changes if test else _hooks_warning(changes, name)


def reapply(uri=None):
    """
    Look every domain with forwards up again (new addresses are followed,
    removed domains lose their forwards) and put the table back if it is gone.

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_nat.reapply
    """
    return _call(lambda conn: forwards.refresh(conn, max_rules=_max_rules()), uri)


def install_hooks(hooks_dir="/etc/libvirt/hooks", test=False):
    """
    Install the libvirt hooks that keep forwards alive across network
    restarts, libvirtd restarts and reboots: ``/bin/sh`` scripts in
    ``network.d``/``qemu.d`` that hand over to the launcher
    ``/usr/sbin/salt-kvm-libvirt-hook`` (which libvirtd's AppArmor profile
    runs unconfined), and ``/etc/salt-kvm/hook.conf`` naming this minion's
    Python (a Salt onedir's too). Returns the files written (with ``test=True``: that would
    be written); libvirtd must be restarted once after the first installation
    (``kvm_nat.hooks_status`` says whether it runs them).

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_nat.install_hooks
    """
    with command_errors("cannot install the hooks: ", also=(OSError, ValueError)):
        return hooks.install(hooks_dir, test=flag(test, "test"))


def hooks_status(hooks_dir="/etc/libvirt/hooks"):
    """
    Whether the running libvirtd runs salt-kvm's hooks (installed, and
    written before it started), why not and what to do, the hooks' latest
    logged failures, and libvirt's firewall backend(s) with whether
    forwards pass them (``firewall``: ``backends``, ``configured``,
    ``passable``, ``why``).

    CLI Example:

    .. code-block:: bash

        salt hypervisor kvm_nat.hooks_status
    """
    with command_errors():
        active, why = hookfiles.status(hooks_dir)
        state = hostnet.firewall()
        through, how = hostnet.passable(state)
    firewall = {
        "backends": state["backends"],
        "configured": state["configured"],
        "passable": through,
        "why": how,
    }
    return {
        "active": active,
        "status": why,
        "errors": hooks.problems(_names()),
        "firewall": firewall,
    }


def _names(domain=None):
    """The domains with forwards (or ``domain``) and their networks: the names
    the hooks' log lines are about. Read from the desired state alone (no
    kernel or firewall queries)."""
    try:
        entries = Store().load()
    except SaltKvmError:
        return {domain} if domain is not None else set()
    names = set() if domain is None else {domain}
    for name, entry in entries.items():
        if domain is None or name == domain:
            names |= {name, entry.placement.network}
    return names
