"""A fault-injecting TCP proxy for tests: pass, blackhole, delay, throttle or reset a link.

One `FaultProxy` stands for one link: it listens on 127.0.0.1 and forwards every
connection it accepts to one target. Point a server at the proxy's port instead of
its neighbour's peer port, then change `proxy.mode` from the test at any moment; the
mode applies at once to every current and future connection of that proxy.

- `PASS`: forward both ways; half-closes (EOF) are forwarded with `send_eof`, a reset
  on one side resets the other.
- `BLACKHOLE`: a partition where packets vanish. Bytes are read and DROPPED in both
  directions, FINs and resets vanish too, and no connection is closed. A connection
  accepted during a blackhole is never dialled through (the SYN vanished).
  Dropped bytes are gone for good: TCP never delivers a stream with a hole in it, so
  a connection that lost bytes stays blackholed after the mode changes back, until
  its ends give up on it (heartbeat silence); a connection that lost nothing resumes.
  Switching back to `PASS` therefore heals the partition for new connections. A
  blackholed connection is closed (FIN) once both of its ends have closed it.
- `Delay(seconds)`: each chunk is forwarded `seconds` after it arrived, in order; the
  reader keeps reading meanwhile (latency, not a bandwidth cap).
- `Throttle(bytes_per_second)`: each direction of each connection forwards at most
  that many bytes per second, paced in slices of THROTTLE_SLICE seconds' worth.
- `RESET`: every current connection is closed abruptly on both sides (SO_LINGER 0, so
  the peers see a reset, not a FIN), and every new one is accepted and reset at once.

Stopping the proxy (cancelling `serve()`) closes its connections with a FIN.
Buffering is bounded: each direction holds at most QUEUE_CHUNKS chunks of CHUNK bytes;
beyond that the proxy stops reading and TCP pushes back on the sender. Every socket
the proxy opens is closed when its connection ends or the proxy stops.

The proxy runs in the test's own process: an `lsof -ti:PORT | xargs kill` aimed at the
proxy's port, or at the target's port while the proxy is connected to it, would kill
the test runner too.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Literal, NoReturn

import attrs
import trio

CHUNK = 65536  # bytes read at once
QUEUE_CHUNKS = 16  # chunks a direction may hold between reading and forwarding
THROTTLE_SLICE = 0.02  # seconds: a throttled direction sends bursts of at most this much
CONNECT_DEADLINE = 5.0  # seconds to reach the target before the client is reset

Direction = Literal["to_target", "to_client"]


@attrs.frozen
class Pass:
    """Forward everything, both ways."""


@attrs.frozen
class Blackhole:
    """Read and drop everything, both ways; close nothing."""


@attrs.frozen
class Delay:
    """Forward each chunk `seconds` after it arrived, in order."""

    seconds: float = attrs.field(validator=attrs.validators.ge(0))


@attrs.frozen
class Throttle:
    """Forward at most `bytes_per_second` per direction of each connection."""

    bytes_per_second: float = attrs.field(validator=attrs.validators.gt(0))


@attrs.frozen
class Reset:
    """Reset every current connection and every new one."""


Mode = Pass | Blackhole | Delay | Throttle | Reset
PASS = Pass()
BLACKHOLE = Blackhole()
RESET = Reset()


@attrs.frozen
class FaultProxyStatistics:
    """Counters of one proxy since it was made."""

    accepted: int  # connections accepted, including those refused by RESET
    active: int  # connections open now
    refused: int  # connections reset on arrival (RESET mode)
    resets: int  # connections closed with a reset (RESET, a peer's reset, a failed dial)
    bytes_to_target: int  # bytes forwarded from clients to the target
    bytes_to_client: int  # bytes forwarded from the target to clients
    bytes_dropped: int  # bytes read and dropped (BLACKHOLE), either way


def _linger_zero(stream: trio.SocketStream) -> None:
    """Make the next close send a reset (RST) instead of a FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@attrs.define(eq=False)
class _Connection:
    client: trio.SocketStream
    target: trio.SocketStream | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    tainted: bool = False  # lost bytes or a FIN in a blackhole: never forwards again
    reset: bool = False  # close with RST
    next_send: dict[Direction, float] = attrs.field(factory=dict)  # Throttle pacing

    def abort(self) -> None:
        """Close both sides with a reset, now (sync: cancels the connection's tasks)."""
        self.reset = True
        self.scope.cancel()

    def close(self) -> None:
        for stream in (self.client, self.target):
            if stream is not None:
                if self.reset:
                    _linger_zero(stream)
                stream.socket.close()


@attrs.define(eq=False)
class FaultProxy:
    """Forwards connections on `host:port` to `target_host:target_port`, with faults.

    `port` 0 picks a free port; once `serve()` has started, `port` is the real one.
    Set `mode` at any time (also before serving).
    """

    target_port: int
    target_host: str = "127.0.0.1"
    port: int = 0
    host: str = "127.0.0.1"
    _mode: Mode = attrs.field(default=PASS, alias="mode")
    _mode_changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _connections: set[_Connection] = attrs.field(factory=set, init=False)
    _accepted: int = attrs.field(default=0, init=False)
    _refused: int = attrs.field(default=0, init=False)
    _resets: int = attrs.field(default=0, init=False)
    _bytes: dict[Direction, int] = attrs.field(
        factory=lambda: {"to_target": 0, "to_client": 0}, init=False
    )
    _dropped: int = attrs.field(default=0, init=False)
    _counted: trio.Event = attrs.field(factory=trio.Event, init=False)

    @property
    def mode(self) -> Mode:
        """What the proxy does to traffic now."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        self._mode = mode
        self._mode_changed.set()  # delayed and throttled chunks re-check the mode
        self._mode_changed = trio.Event()
        if isinstance(mode, Reset):
            for conn in list(self._connections):
                conn.abort()

    def statistics(self) -> FaultProxyStatistics:
        """The counters, now."""
        return FaultProxyStatistics(
            accepted=self._accepted,
            active=len(self._connections),
            refused=self._refused,
            resets=self._resets,
            bytes_to_target=self._bytes["to_target"],
            bytes_to_client=self._bytes["to_client"],
            bytes_dropped=self._dropped,
        )

    async def wait_for(
        self, condition: Callable[[FaultProxyStatistics], bool]
    ) -> FaultProxyStatistics:
        """Wait until the counters satisfy `condition` (checked whenever one changes)."""
        await trio.lowlevel.checkpoint()
        while not condition(stats := self.statistics()):
            await self._counted.wait()
        return stats

    def _count(self) -> None:
        self._counted.set()
        self._counted = trio.Event()

    async def serve(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Accept and forward until cancelled; report the port once it accepts."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, self._handle, listeners))
            task_status.started(self.port)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _handle(self, client: trio.SocketStream) -> None:
        # trio.serve_listeners closes `client` again after this returns; closing twice is fine.
        await trio.lowlevel.checkpoint()  # every path checkpoints (flake8-async ASYNC910)
        self._accepted += 1
        self._count()
        conn = _Connection(client)
        if isinstance(self._mode, Reset):
            self._refused += 1
            conn.reset = True
            conn.close()
            return
        self._connections.add(conn)
        try:
            with conn.scope:
                if isinstance(self._mode, Blackhole):
                    conn.tainted = True  # the SYN vanished: never reach the target
                    await self._drain(conn, client)
                    return
                try:
                    with trio.fail_after(CONNECT_DEADLINE):
                        conn.target = await trio.open_tcp_stream(self.target_host, self.target_port)
                except (OSError, trio.TooSlowError):
                    conn.reset = True  # the client sees its connection reset
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._direction, conn, client, conn.target, "to_target")
                    nursery.start_soon(self._direction, conn, conn.target, client, "to_client")
        finally:
            self._connections.discard(conn)
            self._resets += conn.reset
            conn.close()
            self._count()

    async def _drain(self, conn: _Connection, src: trio.SocketStream) -> None:
        """Read and drop until `src` closes (a connection that will never forward)."""
        await trio.lowlevel.checkpoint()
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            while chunk := await src.receive_some(CHUNK):
                self._dropped += len(chunk)
                self._count()

    async def _direction(
        self, conn: _Connection, src: trio.SocketStream, dst: trio.SocketStream, way: Direction
    ) -> None:
        """Carry one direction of `conn` until `src` reaches EOF and all is delivered."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUE_CHUNKS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, conn, src, send)
            await self._write(conn, dst, receive, way)

    async def _read(
        self,
        conn: _Connection,
        src: trio.SocketStream,
        send: trio.MemorySendChannel[tuple[float, bytes]],
    ) -> None:
        await trio.lowlevel.checkpoint()
        with send:  # closing it tells the writer: EOF once the queue is delivered
            while True:
                try:
                    chunk = await src.receive_some(CHUNK)
                except (trio.BrokenResourceError, OSError):
                    if self._blackholed(conn):
                        conn.tainted = True  # the reset vanished
                    else:
                        conn.abort()  # a reset on one side resets the other
                    return
                if not chunk:
                    return
                if self._blackholed(conn):
                    conn.tainted = True
                    self._dropped += len(chunk)
                    self._count()
                    continue
                await send.send((trio.current_time(), chunk))

    async def _write(
        self,
        conn: _Connection,
        dst: trio.SocketStream,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
        way: Direction,
    ) -> None:
        await trio.lowlevel.checkpoint()
        try:
            with receive:
                async for arrival, chunk in receive:
                    await self._deliver(conn, dst, arrival, chunk, way)
            if self._blackholed(conn):
                conn.tainted = True  # the FIN vanished
            else:
                await dst.send_eof()  # half-close: the other direction carries on
        except (trio.BrokenResourceError, OSError):
            conn.abort()

    async def _deliver(
        self,
        conn: _Connection,
        dst: trio.SocketStream,
        arrival: float,
        chunk: bytes,
        way: Direction,
    ) -> None:
        """Forward `chunk` as the mode says, re-checking the mode whenever it changes."""
        await trio.lowlevel.checkpoint()
        while chunk:
            mode, changed, now = self._mode, self._mode_changed, trio.current_time()
            if self._blackholed(conn) or isinstance(mode, Reset):
                conn.tainted = True
                self._dropped += len(chunk)
                self._count()
                return
            if isinstance(mode, Delay) and now < arrival + mode.seconds:
                with trio.move_on_at(arrival + mode.seconds):
                    await changed.wait()
                continue
            piece = chunk
            if isinstance(mode, Throttle):
                due = conn.next_send.get(way, now)
                if now < due:
                    with trio.move_on_at(due):
                        await changed.wait()
                    continue
                piece = chunk[: max(1, int(mode.bytes_per_second * THROTTLE_SLICE))]
                conn.next_send[way] = now + len(piece) / mode.bytes_per_second
            await dst.send_all(piece)
            self._bytes[way] += len(piece)
            self._count()
            chunk = chunk[len(piece) :]

    def _blackholed(self, conn: _Connection) -> bool:
        return conn.tainted or isinstance(self._mode, Blackhole)


@asynccontextmanager
async def open_fault_proxy(
    target_port: int, *, target_host: str = "127.0.0.1", port: int = 0, mode: Mode = PASS
) -> AsyncIterator[FaultProxy]:
    """A serving FaultProxy to `target_port`; stopped (every socket closed) on exit.

    Exceptions from the body come out wrapped in an ExceptionGroup (the nursery's).
    """
    proxy = FaultProxy(target_port, target_host=target_host, port=port, mode=mode)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel(reason="fault proxy closing")
