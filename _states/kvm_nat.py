"""
NAT port forwards of a domain, converged to exactly the listed set.

.. code-block:: yaml

    vm1-forwards:
      kvm_nat.forwarded:
        - name: vm1
        - rules:
          - 22                       # host 10022 -> guest 22
          - guest: 53
            host: 5353
            proto: udp

    vm2-no-forwards:
      kvm_nat.absent:
        - name: vm2

    nat-hooks:
      kvm_nat.hooks_installed
"""

try:
    from salt_kvm.nat.rules import check_rule_set
    from salt_kvm.saltutil import STATE_ERRORS, state_changed, state_failed, state_ret

    HAS_LIBS = True
except ImportError:  # pragma: no cover - depends on the minion
    HAS_LIBS = False

__virtualname__ = "kvm_nat"


def __virtual__():
    if not HAS_LIBS or "kvm_nat.apply" not in __salt__:
        return (False, "the kvm_nat execution module is not available")
    return __virtualname__


def _hooks_note():
    """Why forwards would not survive a restart, or ''."""
    status = __salt__["kvm_nat.hooks_status"]()
    note = "" if status["active"] else f" (warning: {status['status']})"
    if status["errors"]:
        note += f" (latest hook error: {status['errors'][-1]})"
    return note


def _converge(name, rules, uri, what, remove_all=False):
    ret = state_ret(name)
    not_changed = f"Forwards of {name} not changed: "
    try:
        check_rule_set(rules, remove_all)
        note = _hooks_note() if rules else ""
        would = __salt__["kvm_nat.apply"](
            name, rules=rules, test=True, uri=uri, remove_all=remove_all
        )
    except Exception as exc:  # noqa: BLE001 - CommandExecutionError: refused, nothing changed
        return state_failed(ret, exc, not_changed)
    if not would:
        ret["comment"] = f"Forwards of {name} are {what}{note}"
        return ret
    if __opts__["test"]:
        return state_changed(ret, would, f"Forwards of {name} would be made {what}{note}", True)
    try:
        changes = __salt__["kvm_nat.apply"](name, rules=rules, uri=uri, remove_all=remove_all)
    except Exception as exc:  # noqa: BLE001 - as above: the transaction changed nothing
        return state_failed(ret, exc, not_changed)
    changes.pop("warning", None)  # both said in the comment (_hooks_note)
    changes.pop("hook_errors", None)
    return state_changed(ret, changes, f"Forwards of {name} are {what}{note}")


def forwarded(name, rules=True, uri=None):
    """
    Ensure domain ``name`` has exactly the forwards ``rules`` (as
    ``kvm_nat.apply``: ports, mappings, or ``True`` for 22 80 443).

    name
        The domain.
    rules
        The whole set; forwards of the domain not listed are removed. An
        empty set (``[]``, or a pillar value that is missing) is refused:
        ``kvm_nat.absent`` removes every forward.
    uri
        libvirt URI; default from ``kvm:connection:uri`` or ``qemu:///system``.

    CLI Example:

    .. code-block:: bash

        salt hypervisor state.single kvm_nat.forwarded vm1 rules='[22, 80]'
    """
    return _converge(name, rules, uri, f"as listed ({_describe(rules)})")


def absent(name, uri=None):
    """
    Ensure domain ``name`` has no forwards.

    CLI Example:

    .. code-block:: bash

        salt hypervisor state.single kvm_nat.absent vm1
    """
    return _converge(name, None, uri, "absent", remove_all=True)


def hooks_installed(name="libvirt-hooks", hooks_dir="/etc/libvirt/hooks"):
    """
    Ensure salt-kvm's libvirt hooks (which keep forwards alive) are installed.

    CLI Example:

    .. code-block:: bash

        salt hypervisor state.single kvm_nat.hooks_installed
    """
    ret = state_ret(name, "Hooks are installed")
    try:
        missing = __salt__["kvm_nat.install_hooks"](hooks_dir, test=True)
        if not missing:
            status = __salt__["kvm_nat.hooks_status"](hooks_dir)
            if not status["active"]:
                ret["comment"] = f"Hooks are installed: {status['status']}"
            return ret
        if __opts__["test"]:
            return state_changed(ret, {"written": missing}, "Hooks would be written", test=True)
        written = __salt__["kvm_nat.install_hooks"](hooks_dir)
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    if written:
        ret["changes"] = {"written": written}
    status = __salt__["kvm_nat.hooks_status"](hooks_dir)
    ret["comment"] = "Hooks are installed" + ("" if status["active"] else f": {status['status']}")
    return ret


def _describe(rules):
    if rules is True:
        return "22 80 443"
    if isinstance(rules, list):
        return ", ".join(str(r.get("guest") if isinstance(r, dict) else r) for r in rules)
    return str(rules)
