"""Reading a small file a guest left for the host, through the QEMU guest agent.

The guest is untrusted: what comes back is bounded in size, decoded leniently
and stripped of control characters before anyone prints it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from typing import Any

import libvirt
import libvirt_qemu

log = logging.getLogger(__name__)
AGENT_TIMEOUT = 2  # seconds per agent command: a busy TCG guest answers slowly
MAX_BYTES = 4096


def _command(dom: libvirt.virDomain, execute: str, arguments: dict) -> Any:
    reply = libvirt_qemu.qemuAgentCommand(
        dom, json.dumps({"execute": execute, "arguments": arguments}), AGENT_TIMEOUT, 0
    )
    return json.loads(reply)["return"]


def clean(text: str, limit: int = 500) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    line = "".join(c if c.isprintable() else " " for c in text).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_file(dom: libvirt.virDomain, path: str) -> str | None:
    """The first ``MAX_BYTES`` of ``path`` in the guest, or None when the agent
    does not answer (not started yet, not installed) or the file is absent."""
    try:
        handle = _command(dom, "guest-file-open", {"path": path, "mode": "r"})
    except (libvirt.libvirtError, ValueError, KeyError, TypeError):
        return None
    try:
        data = _command(dom, "guest-file-read", {"handle": handle, "count": MAX_BYTES})
        raw = base64.b64decode(data["buf-b64"], validate=False)[:MAX_BYTES]
        return raw.decode("utf-8", "replace")
    except (libvirt.libvirtError, ValueError, KeyError, TypeError) as exc:
        log.debug("reading %s in %s: %s", path, dom.name(), exc)
        return None
    finally:
        with contextlib.suppress(libvirt.libvirtError, ValueError, KeyError, TypeError):
            _command(dom, "guest-file-close", {"handle": handle})
