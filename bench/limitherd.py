"""The limit herd: the least a trio herd can do to store and flood IAMATs, as a baseline.

    python -m bench.limitherd NAME CONFIG

CONFIG is a herd config as bench.procs writes it ([servers.NAME] port, peer_port,
neighbours; an edge may be listed on one side only). One trio process per server. The
client side is bench.limit's (frame lines, parse the IAMAT time to integer ns, one
`send_all` per batch of replies) plus a dict store keyed by client id that keeps a record
only if its client time is newer. One persistent TCP connection per edge on the peer
port (the name that sorts first dials and says its name), a pending list per link and
one `send_all` of everything pending per writer wake-up; a new record goes to every
neighbour but the one it came from. WHATSAT answers the stored AT line and a blank line.
No log, persistence, auth, heartbeats or digests: herd_trio's per-update cost is
reported as a ratio to this one's.
"""

from __future__ import annotations

import sys
import time
import tomllib
from functools import partial
from pathlib import Path
from typing import Any

import trio

Store = dict[bytes, tuple[int, bytes]]  # client id -> (client time in ns, AT line + LF)


def time_ns(text: bytes) -> int:
    """`S.FFF` (the IAMAT time) as integer nanoseconds; ValueError if it is not one."""
    whole, _, frac = text.partition(b".")
    ns = int(frac[:9].ljust(9, b"0")) if frac else 0
    return int(whole) * 1_000_000_000 + (-ns if whole.startswith(b"-") else ns)


class Link:
    """One peer connection: what waits to be sent, and the writer's wake-up."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.pending: list[bytes] = []
        self.wake = trio.Event()

    async def writer(self) -> None:
        """One `send_all` of everything pending per wake-up."""
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            data, self.pending = b"".join(self.pending), []
            await self.stream.send_all(data)


class Server:
    """One server of the limit herd."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        servers: dict[str, dict[str, Any]] = config["servers"]
        self.name = name.encode()
        me = servers[name]
        self.port, self.peer_port = int(str(me["port"])), int(str(me["peer_port"]))
        edges = {(a, str(b)) for a, s in servers.items() for b in s.get("neighbours", [])}
        mine = {b for a, b in edges if a == name} | {a for a, b in edges if b == name}
        self.dial = {n: int(str(servers[n]["peer_port"])) for n in mine if name < n}
        self.store: Store = {}
        self.links: dict[bytes, Link] = {}

    def offer(self, client: bytes, when: int, line: bytes, source: bytes | None) -> None:
        """Keep the record if it is newer than the stored one, and flood it."""
        old = self.store.get(client)
        if old is not None and old[0] >= when:
            return
        self.store[client] = (when, line)
        for peer, link in self.links.items():
            if peer != source:
                link.pending.append(line)
                link.wake.set()

    def answer(self, line: bytes, now_ns: int) -> bytes:
        """The reply to one client line."""
        fields = line.split()
        try:
            if len(fields) == 4 and fields[0] == b"IAMAT":
                when = time_ns(fields[3])
                skew = now_ns - when
                seconds, ns = divmod(abs(skew), 1_000_000_000)
                at = b"AT %s %s%d.%09d %s %s %s\n" % (
                    *(self.name, b"-" if skew < 0 else b"+", seconds, ns),
                    *(fields[1], fields[2], fields[3]),
                )
                self.offer(fields[1], when, at, None)
                return at
            if len(fields) == 4 and fields[0] == b"WHATSAT" and fields[1] in self.store:
                return self.store[fields[1]][1] + b"\n"
        except ValueError:
            pass
        return b"? " + line + b"\n"

    async def client(self, stream: trio.SocketStream) -> None:
        """Answer every complete line; all lines of one receive get one write."""
        pending = b""
        try:
            async for data in stream:
                pending += data
                *lines, pending = pending.split(b"\n")
                if lines:
                    now_ns = time.time_ns()
                    await stream.send_all(
                        b"".join([self.answer(ln.rstrip(b"\r"), now_ns) for ln in lines])
                    )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def peer(self, peer: bytes, stream: trio.SocketStream, first: bytes) -> None:
        """Read AT lines from `peer` until the link breaks; write to it meanwhile."""
        link = Link(stream)
        self.links[peer] = link
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.writer)
                pending = first
                async for data in stream:
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        fields = line.split(b" ")
                        if len(fields) == 6 and fields[0] == b"AT":
                            self.offer(fields[3], time_ns(fields[5]), line + b"\n", peer)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            pass
        finally:
            if self.links.get(peer) is link:
                del self.links[peer]

    async def accept_peer(self, stream: trio.SocketStream) -> None:
        """A neighbour that sorts first dialled us: its name, then AT lines."""
        buffer = b""
        async for data in stream:
            buffer += data
            if b"\n" in buffer:
                name, _, rest = buffer.partition(b"\n")
                await self.peer(name, stream, rest)
                return

    async def dialer(self, name: str, port: int) -> None:
        """Keep one connection to `name` (we sort first), redialling if it drops."""
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)  # the neighbour is not listening yet
                continue
            async with stream:
                await stream.send_all(self.name + b"\n")
                await self.peer(name.encode(), stream, b"")

    async def run(self) -> None:
        """Serve clients and peers until killed."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.serve_tcp, self.client, self.port, host="127.0.0.1"))
            serve_peers = partial(trio.serve_tcp, self.accept_peer, self.peer_port)
            nursery.start_soon(partial(serve_peers, host="127.0.0.1"))
            for name, port in self.dial.items():
                nursery.start_soon(self.dialer, name, port)


def main() -> None:
    """`python -m bench.limitherd NAME CONFIG`."""
    name, path = sys.argv[1], Path(sys.argv[2])
    trio.run(Server(name, tomllib.loads(path.read_text())).run)


if __name__ == "__main__":
    main()
