"""What a running guest writes to its serial console, read through libvirt.

A channel from guest to host that needs nothing in the guest (no agent) and
works on remote connections (``qemu+ssh://``) too: libvirt's console stream,
opened without ``force`` (a user's ``virsh console`` keeps the console, and
this channel is then simply absent) and read without blocking, a little at a
time. Only what arrives after the stream is opened is seen: a guest that wants
to be heard repeats itself. The guest is untrusted: only the last ``KEEP``
characters are kept, and a message is taken from a whole line only.
"""

from __future__ import annotations

import contextlib
import logging

import libvirt

log = logging.getLogger(__name__)
KEEP = 16384  # characters of the console kept
READ = 4096
MAX_READS = 64  # per poll: a guest flooding its console cannot hold the caller


class ConsoleTail:
    """The tail of one guest's serial console; ``poll`` reads what came since."""

    def __init__(self, dom: libvirt.virDomain) -> None:
        self.dom = dom
        self.text = ""
        self._stream: libvirt.virStream | None = None
        self._unavailable = False

    def _open(self) -> libvirt.virStream | None:
        if self._stream is None and not self._unavailable:
            try:
                stream = self.dom.connect().newStream(libvirt.VIR_STREAM_NONBLOCK)
                self.dom.openConsole(None, stream, 0)
                self._stream = stream
            except libvirt.libvirtError as exc:
                # No serial console, one in use, a driver without consoles.
                log.debug("no console stream for %s: %s", self.dom.name(), exc)
                self._unavailable = True
        return self._stream

    def poll(self) -> str:
        """The console's last ``KEEP`` characters, with whatever came since the last poll."""
        stream = self._open()
        for _ in range(MAX_READS):
            if stream is None:
                break
            try:
                data = stream.recv(READ)
            except libvirt.libvirtError as exc:  # the guest went away
                log.debug("console of %s: %s", self.dom.name(), exc)
                self.close()
                break
            if not isinstance(data, bytes) or not data:  # -2: nothing now; b"": closed
                break
            self.text = (self.text + data.decode("utf-8", "replace"))[-KEEP:]
        return self.text

    def last_line(self, marker: str) -> str | None:
        """What follows ``marker`` on the last whole line that holds it, or None."""
        text = self.poll()
        end = max(text.rfind("\n"), text.rfind("\r"))
        found = text.rfind(marker, 0, end if end >= 0 else 0)
        if found < 0:
            return None
        start = found + len(marker)
        stops = [i for i in (text.find("\n", start), text.find("\r", start)) if i >= 0]
        return text[start : min(stops)] if stops else None

    def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.abort()
            self._stream = None
            self._unavailable = True
