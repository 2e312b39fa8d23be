"""A TCP relay for one NAT forward: what nft cannot DNAT (``[::1]``, IPv6 to
an IPv4-only guest) is carried in userspace to the guest's IPv4 address.

Run by ``relays`` (the supervised fallback where the host has no systemd) as
``python3 -I relay.py --fd N --to ADDRESS:PORT ...``: the supervisor, as root,
binds exactly the forward's address and port and hands the listening socket
over (``--fd``), so this program never binds anything itself. It drops root
first (``--user``, no supplementary groups), then accepts connections and
connects each one to the one target it was given: a client cannot choose
where it goes. At most ``--max-connections`` at once (more are closed at
accept), each with bounded buffers (reads of ``CHUNK`` bytes, writes wait for
the peer), so a local user or a guest cannot make it grow.

Standard library only, and no import from salt_kvm: it runs with ``-I``
(isolated: no environment, no user site, no script directory on the path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import pwd
import resource
import signal
import socket

CHUNK = 65536
CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 64


def target(value: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` (IPv4) or ``[ADDRESS]:PORT`` (IPv6)."""
    host, _, port = value.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]"))
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port {port} is out of range")
    return str(address), number


def drop_root(user: str) -> None:
    """Become ``user`` (and its group, no others); refuse to go on as root."""
    if os.getuid() != 0:
        return
    entry = pwd.getpwnam(user)
    if entry.pw_uid == 0:
        raise SystemExit(f"relay: will not run as {user} (uid 0)")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise SystemExit("relay: could regain root after dropping it")


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One direction until EOF, then half-close the other side."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()  # waits while the peer is slow: memory stays bounded
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


class Relay:
    def __init__(self, to: tuple[str, int], max_connections: int):
        self.to = to
        self.max_connections = max_connections
        self.active = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections:
            writer.close()
            return
        self.active += 1
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.to, limit=CHUNK), CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError):
                return
            try:
                await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            self.active -= 1
            writer.close()


async def serve(listener: socket.socket, relay: Relay, ready: int | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(relay.handle, sock=listener, limit=CHUNK)
    if ready is not None:  # the supervisor waits for this word
        os.write(ready, b"1")
        os.close(ready)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="salt-kvm-relay")
    parser.add_argument("--name", required=True, help="the supervisor's name for this relay")
    parser.add_argument("--fd", type=int, required=True, help="the bound, listening socket")
    parser.add_argument("--to", type=target, required=True, help="ADDRESS:PORT of the guest")
    parser.add_argument("--ready", type=int, help="a pipe told '1' once serving as --user")
    parser.add_argument("--user", default="nobody")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    args = parser.parse_args(argv)
    listener = socket.socket(fileno=args.fd)
    if listener.type != socket.SOCK_STREAM:
        raise SystemExit("relay: --fd is not a stream socket")
    drop_root(args.user)
    os.umask(0o077)
    files = 2 * args.max_connections + 32
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    listener.setblocking(False)
    asyncio.run(serve(listener, Relay(args.to, args.max_connections), args.ready))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
