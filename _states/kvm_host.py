"""
States for a KVM hypervisor's own setup (storage pools).

.. code-block:: yaml

    images-pool:
      kvm_host.pool_present:
        - name: default
        - path: /var/lib/libvirt/images
"""

try:
    from salt_kvm.saltutil import STATE_ERRORS, state_changed, state_failed, state_ret

    HAS_LIBS = True
except ImportError:  # pragma: no cover - depends on the minion
    HAS_LIBS = False

__virtualname__ = "kvm_host"


def __virtual__():
    if not HAS_LIBS or "kvm_host.info" not in __salt__:
        return (False, "the kvm_host execution module is not available")
    return __virtualname__


def pool_present(name, path, uri=None, adopt=False):
    """
    Ensure a ``dir`` storage pool named ``name`` exists on ``path``, running
    and autostarted.

    name
        The pool's name.
    path
        The directory holding its volumes (created if missing).
    uri
        libvirt URI; default from ``kvm:connection:uri`` or ``qemu:///system``.
    adopt
        Define a new pool on a directory that already holds files (each
        becomes a volume); refused without it.
    """
    ret = state_ret(name)
    if isinstance(path, str) and path != "/":
        path = path.rstrip("/")  # as libvirt stores it
    try:
        before = __salt__["kvm_host.pool_info"](name, uri=uri)
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    wanted = {"type": "dir", "path": path, "active": True, "autostart": True}
    if before == wanted:
        ret["comment"] = f"Pool {name} is present on {path}"
        return ret
    if before is not None and before["path"] != path:
        return state_failed(ret, f"Pool {name} exists on {before['path']}, not {path}; not changed")
    if __opts__["test"]:
        return state_changed(
            ret,
            {"old": before, "new": wanted},
            f"Pool {name} would be made present on {path}",
            test=True,
        )
    try:
        changes = __salt__["kvm_host.ensure_pool"](name, path, uri=uri, adopt=adopt)
    except STATE_ERRORS as exc:
        return state_failed(ret, exc)
    return state_changed(ret, changes, f"Pool {name} is present on {path}")
