"""The one writer of a peer link's socket: records, digests and heartbeats.

Every byte that goes into a link's socket is written here, by the `LinkWriter` that
owns the send side of that link (trio-websocket's rule: one writer per stream). That
includes the direct-send fast path: while the writer is idle, a record delivered by
the bus goes straight to the socket without waking the writer task, which saves one
scheduling round per hop (2-hop propagation p50 1.32 -> 0.47 ms on loopback); what
the kernel does not take at once is left for the writer task, which sends it first.

What to send next is decided by `Timers`, a plain object with no I/O: a DIGEST first
and then after every sync_interval in which the link carried no record (in-flight
records make the stores differ for no lasting reason), and a PING whenever the link
was otherwise idle for a heartbeat.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import NoReturn

import attrs
import trio

from herd_trio.bus import Outbox
from herd_trio.net import send_within
from herd_trio.protocol import Record

PING = b"PING"
_PING_LINE = PING + b"\n"


@attrs.define
class Timers:
    """When a link's writer sends its next DIGEST or PING, given the time; no I/O."""

    heartbeat: float  # seconds of silence before a PING
    sync: float  # seconds of quiet between DIGESTs
    next_sync: float  # when the next DIGEST is due (the first is due at once)
    first: bool = True

    def digest_due(self, now: float, traffic_at: float) -> bool:
        """True if a DIGEST goes out now (and the next one is scheduled).

        The first DIGEST goes out as soon as the link is up. Later ones wait for a
        whole sync interval without records in either direction: with records in
        flight the stores differ in many buckets for no lasting reason, and answering
        such a digest would resend most of the store while the flood is doing the work.
        """
        if now < self.next_sync:
            return False
        if not self.first and now - traffic_at < self.sync:
            self.next_sync = traffic_at + self.sync
            return False
        self.next_sync, self.first = now + self.sync, False
        return True

    def wake_at(self, now: float) -> float:
        """The latest time the writer may sleep until: the next PING or DIGEST."""
        return min(now + self.heartbeat, self.next_sync)

    def ping_due(self, now: float) -> bool:
        """After a quiet wait that ended at `now`: True for a PING, False if a DIGEST is due."""
        return now < self.next_sync


@contextmanager
def direct_sender(stream: trio.abc.SendStream) -> Iterator[Callable[[bytes], int] | None]:
    """A non-blocking `send` on `stream`'s socket, or None where there is none (TLS).

    It works on a duplicate of the socket's descriptor, closed with the block; the
    trio stream stays the socket's owner, and the writer uses the duplicate only while
    its task is idle, so the two never write at the same time.
    """
    if not isinstance(stream, trio.SocketStream):
        yield None
        return
    raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
    try:
        raw.setblocking(False)
        yield raw.send
    finally:
        raw.close()


@attrs.define(eq=False)
class LinkWriter:
    """Writes one link's outbox, digests and heartbeats to its stream; the bus's subscriber."""

    stream: trio.abc.SendStream
    write_deadline: float  # seconds a send may stall before the link is dropped
    on_progress: Callable[[], None]  # told after every write (the bus's waiters)
    outbox: Outbox = attrs.field(factory=Outbox)
    # Gives the direct-send path its non-blocking send (tests give a fake socket's).
    sender: Callable[
        [trio.abc.SendStream], AbstractContextManager[Callable[[bytes], int] | None]
    ] = direct_sender
    _send: Callable[[bytes], int] | None = attrs.field(default=None, init=False)
    _idle: bool = attrs.field(default=False, init=False)  # the task waits with nothing to do
    _busy: bool = attrs.field(default=False, init=False)  # the task is inside a send
    _residue: bytes = attrs.field(default=b"", init=False)  # a direct send's unsent tail
    _written: int = attrs.field(default=0, init=False)  # outbox numbers up to here are sent
    _traffic_at: float = attrs.field(default=-math.inf, init=False)  # last record either way
    records_sent: int = attrs.field(default=0, init=False)  # records taken for the socket

    def deliver(self, record: Record) -> None:
        """Send `record` now if the writer is idle, else queue it; never blocks.

        One direct send per wake-up of the writer task: records published right after
        it in the same burst are queued and leave together in the task's next send
        (one syscall and one segment for many), and the task re-arms this path once
        it is idle again. A lone update still goes out at once.
        """
        if self._send is not None and self._idle and not self.outbox and not self._residue:
            line = record.at_line + b"\n"
            try:
                sent = self._send(line)
            except BlockingIOError:
                sent = -1
            except OSError:
                self._send = None  # the task and the reader will meet the error
                sent = -1
            if sent >= 0:
                self.records_sent += 1
                mark = self.outbox.pass_by()
                self._traffic_at = trio.current_time()
                if sent < len(line):
                    self._residue = line[sent:]
                else:
                    self._written = mark
                self._idle = False
                self.outbox.wake()
                return
        self.outbox.put(record)

    def queue(self, record: Record) -> None:
        """Queue `record` behind what is pending (a digest's answer: no direct send)."""
        self.outbox.put(record)

    def depth(self) -> int:
        """Records waiting in the outbox (for the admin port)."""
        return len(self.outbox)

    def note_traffic(self) -> None:
        """Records arrived from the peer: the link is not quiet."""
        self._traffic_at = trio.current_time()

    def handoff_mark(self) -> int | None:
        """See bus.Subscriber: None while stuck in a send or with nothing unsent."""
        if self._busy or self.outbox.queued <= self._written:
            return None
        return self.outbox.queued

    def handed_off(self, mark: int) -> bool:
        """See bus.Subscriber."""
        return self._written >= mark or self._busy or self.outbox.closed

    def close(self) -> None:
        """Stop the writer task (it raises OutboxClosed)."""
        self.outbox.close()

    async def run(self, timers: Timers, digest: Callable[[], bytes]) -> NoReturn:
        """Write until the link fails: raises TooSlowError, OutboxClosed or the stream's error."""
        with self.sender(self.stream) as send:
            self._send = send
            try:
                while True:
                    now = trio.current_time()
                    if timers.digest_due(now, self._traffic_at):
                        await self._write(digest() + b"\n")
                        continue
                    with trio.move_on_at(timers.wake_at(now)) as quiet:
                        await self._wait_for_work()
                    if data := self._take():
                        await self._write(data)
                    elif quiet.cancelled_caught and timers.ping_due(trio.current_time()):
                        await self._write(_PING_LINE)
            finally:
                self._send = None  # the duplicate descriptor closes with the block

    async def _wait_for_work(self) -> None:
        if self.outbox or self._residue:
            await trio.lowlevel.checkpoint()
            return
        self._idle = True
        try:
            await self.outbox.wait()
        finally:
            self._idle = False

    def _take(self) -> bytes:
        """The residue of a direct send, then the pending records, as one write."""
        batch = self.outbox.take_nowait()
        residue, self._residue = self._residue, b""
        if not batch:
            return residue
        self.records_sent += len(batch)
        self._traffic_at = trio.current_time()
        return b"%s%s\n" % (residue, b"\n".join([record.at_line for record in batch]))

    async def _write(self, data: bytes) -> None:
        mark = self.outbox.taken  # everything taken so far is in `data` or was sent before
        self._busy = True
        try:
            await send_within(self.stream, data, self.write_deadline)
        finally:
            self._busy = False
        self._written = max(self._written, mark)
        self.on_progress()
