"""
External disks of KVM guests, as states on the hypervisor minion.

.. code-block:: yaml

    vm1-data:
      kvm_disk.attached:
        - name: data
        - domain: vm1
        - size: 10G
        - index: 1

    vm1-archive:
      kvm_disk.attached:
        - name: archive
        - domain: vm1
        - path: /srv/images/archive.raw
        - format: raw
        - readonly: true

    vm1-scratch:
      kvm_disk.detached:
        - name: scratch
        - domain: vm1
"""

try:
    from salt_kvm.disks import spec as disks
    from salt_kvm.saltutil import STATE_ERRORS, state_changed, state_failed, state_ret
    from salt_kvm.virt.units import human_size

    HAS_LIBS = True
except ImportError:  # pragma: no cover - depends on the minion
    HAS_LIBS = False

__virtualname__ = "kvm_disk"


def __virtual__():
    if not HAS_LIBS or "kvm_disk.list" not in __salt__:
        return (False, "the kvm_disk execution module is not available")
    return __virtualname__


def _current(domain, name, uri):
    return __salt__["kvm_disk.list"](domain, uri=uri).get(name)


def attached(
    name,
    domain,
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
):
    """
    Ensure ``domain`` has a disk named ``name``: a new volume of ``size`` or the
    image at ``path``, with the arguments of ``kvm_disk.attach``. A disk that is
    already attached is left alone, except that a larger ``size`` grows it; a
    disk that differs otherwise (path, bus, read-only...) is reported, not
    changed: detach it first.

    CLI Example:

    .. code-block:: bash

        salt hypervisor state.single kvm_disk.attached data domain=vm1 size=10G
    """
    ret = state_ret(name)
    given = (size, path, format, pool, bus, cache, index, readonly, shareable, preallocation)
    args = {k: v for k, v in zip(disks.DISK_KEYS, given, strict=True) if v is not None}
    try:
        spec = disks.parse_disk(name, args)
        current = _current(domain, name, uri)
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    if current is not None:
        return _attached_already(ret, domain, current, spec, uri)
    where = f"{human_size(spec.size)} volume" if spec.new else spec.path
    if __opts__["test"]:
        # the real call's checks (allowed directories, probed formats...): its
        # refusals are the real run's
        try:
            __salt__["kvm_disk.attach"](
                domain, name, live=live, persistent=persistent, uri=uri, test=True, **args
            )
        except STATE_ERRORS as exc:
            return state_failed(ret, exc)
        return state_changed(
            ret,
            {"old": None, "new": {"name": name, "domain": domain, "source": where}},
            f"Disk {name} ({where}) would be attached to {domain}",
            test=True,
        )
    try:
        new = __salt__["kvm_disk.attach"](
            domain, name, live=live, persistent=persistent, uri=uri, **args
        )
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    return state_changed(
        ret,
        {"old": None, "new": new},
        f"Disk {name} ({where}) is attached to {domain} as {new['target']}",
    )


def _attached_already(ret, domain, current, spec, uri):
    name = spec.name
    fixed, grow = disks.differences(current, spec)
    if fixed:
        return state_failed(
            ret, f"Disk {name} of {domain} differs: {'; '.join(fixed)}. Detach it first"
        )
    if grow is None:
        ret["comment"] = f"Disk {name} is attached to {domain} as {current['target']}"
        return ret
    change = {"old": {"size": current["size"]}, "new": {"size": grow}}
    if __opts__["test"]:
        return state_changed(ret, change, f"Disk {name} would grow to {grow} bytes", test=True)
    try:
        __salt__["kvm_disk.resize"](domain, name, grow, uri=uri)
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    return state_changed(ret, change, f"Disk {name} of {domain} grew to {grow} bytes")


def detached(name, domain, delete=False, timeout=120, force=False, uri=None):
    """
    Ensure ``domain`` has no disk named ``name``. ``delete: true`` also deletes
    its volume (only one salt-kvm created). A missing domain is an error. The
    boot disk needs ``force: true``.

    CLI Example:

    .. code-block:: bash

        salt hypervisor state.single kvm_disk.detached data domain=vm1
    """
    ret = state_ret(name)
    try:
        current = _current(domain, name, uri)
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    if current is None:
        ret["comment"] = f"{domain} has no disk named {name}"
        return ret
    # test=True runs the real call's checks: its refusals are the real run's
    try:
        result = __salt__["kvm_disk.detach"](
            domain,
            name,
            delete=delete,
            timeout=timeout,
            force=force,
            uri=uri,
            test=bool(__opts__["test"]),
        )
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    if __opts__["test"]:
        return state_changed(
            ret,
            {"old": current, "new": None},
            f"Disk {name} would be detached from {domain}"
            + (" and its volume deleted" if delete else ""),
            test=True,
        )
    return state_changed(
        ret,
        {"old": current, "new": None, **({"deleted": result["deleted"]} if delete else {})},
        f"Disk {name} is detached from {domain}",
    )
