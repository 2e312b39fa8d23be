"""The ``console`` and ``screenshot`` actions: how to reach a guest's console,
and what its screen shows (a PNG, what people look at when a guest does not
come up)."""

from __future__ import annotations

import urllib.parse

import libvirt

from salt_kvm.errors import SaltKvmError, SpecError
from salt_kvm.virt import connection, graphics, lifecycle


def _managed(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    dom = lifecycle.lookup(conn, name)
    if lifecycle.managed_info(dom) is None:
        raise SaltKvmError(f"{name!r} was not created by salt-kvm")
    return dom


def tunnel_line(uri: str, address: str, port: int) -> str:
    """The SSH command that brings a console on the hypervisor of ``uri`` to
    this machine's loopback, same port."""
    parsed = urllib.parse.urlparse(uri)
    target = f"{parsed.username}@{parsed.hostname}" if parsed.username else parsed.hostname
    ssh_port = f" -p {parsed.port}" if parsed.port else ""
    remote = "127.0.0.1" if address in ("0.0.0.0", "::") else address
    if ":" in remote:
        remote = f"[{remote}]"
    return f"ssh -N{ssh_port} -L 127.0.0.1:{port}:{remote}:{port} {target}"


def console(conn: libvirt.virConnect, name: str) -> dict:
    """Each console of a running guest: type, address, port, password, a URL and,
    for a hypervisor on another host, the SSH tunnel line to run first."""
    dom = _managed(conn, name)
    remote = connection.remote_host(conn)
    shown = []
    for item in graphics.console_info(dom):
        reach = "127.0.0.1" if remote else item["address"]
        host = f"[{reach}]" if ":" in reach else reach
        entry = {**item, "url": f"{item['type']}://{host}:{item['port']}"}
        if remote:
            entry["tunnel"] = tunnel_line(conn.getURI(), item["address"], item["port"])
        shown.append(entry)
    return {name: {"consoles": shown}}


def check_screenshot_path(path: object) -> str:
    """``path`` of ``-a screenshot``, checked before any connection is opened."""
    if not path or not isinstance(path, str):
        raise SpecError("path", "is required", "path=/some/file.png")
    graphics.check_file_path(path)
    return path


def screenshot(conn: libvirt.virConnect, name: str, path: str, overwrite: bool = False) -> dict:
    """Save the guest's screen as a PNG at ``path`` (on the machine salt-cloud
    runs on, as its user; refused if it exists unless ``overwrite``)."""
    dom = _managed(conn, name)
    data = graphics.screenshot(dom)
    written = graphics.write_new_file(path, data, overwrite)
    return {name: {"screenshot": written, "bytes": len(data)}}
