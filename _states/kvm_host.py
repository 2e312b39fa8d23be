"""
States for a KVM hypervisor's own setup (storage pools).

.. code-block:: yaml

    images-pool:
      kvm_host.pool_present:
        - name: default
        - path: /var/lib/libvirt/images
"""

__virtualname__ = "kvm_host"


def __virtual__():
    if "kvm_host.info" not in __salt__:
        return (False, "the kvm_host execution module is not available")
    return __virtualname__


def pool_present(name, path, uri=None):
    """
    Ensure a ``dir`` storage pool named ``name`` exists on ``path``, running
    and autostarted.

    name
        The pool's name.
    path
        The directory holding its volumes (created if missing).
    uri
        libvirt URI; default from ``kvm:connection:uri`` or ``qemu:///system``.
    """
    ret = {"name": name, "result": True, "changes": {}, "comment": ""}
    before = __salt__["kvm_host.pool_info"](name, uri=uri)
    wanted = {"type": "dir", "path": path, "active": True, "autostart": True}
    if before == wanted:
        ret["comment"] = f"Pool {name} is present on {path}"
        return ret
    if before is not None and before["path"] != path:
        ret["result"] = False
        ret["comment"] = f"Pool {name} exists on {before['path']}, not {path}; not changed"
        return ret
    if __opts__["test"]:
        ret["result"] = None
        ret["changes"] = {"old": before, "new": wanted}
        ret["comment"] = f"Pool {name} would be made present on {path}"
        return ret
    ret["changes"] = __salt__["kvm_host.ensure_pool"](name, path, uri=uri)
    ret["comment"] = f"Pool {name} is present on {path}"
    return ret
