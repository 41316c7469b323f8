"""Fan-out of accepted records to the peer links, one coalescing outbox per link.

Publishing never waits: a link that cannot keep up does not slow the server, the
clients or the other links. Its outbox holds at most one pending record per client
(a storm of updates for one client coalesces to the newest), so its memory is bounded
by the number of clients, never by the update rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice

import attrs
import trio

from herd_trio.protocol import Record


class OutboxClosed(Exception):
    """The outbox was closed: its link is being replaced or shut down."""


@attrs.define(eq=False)
class Outbox:
    """Records waiting for one link's writer; newest per client, in first-queued order."""

    _pending: dict[bytes, Record] = attrs.field(factory=dict, init=False)
    _seq: dict[bytes, int] = attrs.field(factory=dict, init=False)  # `queued` at each put
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    queued: int = attrs.field(default=0, init=False)  # records accepted by put() so far
    taken: int = attrs.field(default=0, init=False)  # value of `queued` at the last take()
    written: int = attrs.field(default=0, init=False)  # all up to here reached the socket
    busy: bool = attrs.field(default=False, init=False)  # the writer is inside a send
    traffic_at: float = attrs.field(default=-math.inf, init=False)  # last record either way
    # A non-blocking send on the link's socket (see links.direct_sender), usable only
    # while the writer is idle: waiting in take() with nothing pending or unsent.
    sender: Callable[[bytes], int] | None = attrs.field(default=None, init=False)
    _idle: bool = attrs.field(default=False, init=False)
    _residue: bytes = attrs.field(default=b"", init=False)  # a direct send's unsent tail

    def send_nowait(self, record: Record) -> bool:
        """Write `record` to the socket now if the writer is idle; False to queue it.

        This saves the writer's wake-up on the hot path: one scheduling round per hop
        and per client reply. What the kernel does not take at once is left for the
        writer, which sends it before anything else, so order is kept.
        """
        if self.sender is None or not self._idle or self._pending or self._residue:
            return False
        line = record.at_line + b"\n"
        try:
            sent = self.sender(line)
        except BlockingIOError:
            return False
        except OSError:
            self.sender = None  # the writer and the reader will meet the error
            return False
        self.queued += 1
        self.taken = self.queued
        self.traffic_at = trio.current_time()
        if sent < len(line):
            self._residue = line[sent:]
        else:
            self.written = self.queued
        # One direct send per writer wake-up: the records published after it in the
        # same burst are queued and go out together in the writer's next send (one
        # syscall and one segment for many), and the writer re-arms this path once
        # it is idle again. A lone update still goes out at once.
        self._idle = False
        self._wakeup.set()
        return True

    def take_residue(self) -> bytes:
        """The unsent tail of the last direct send (b"" if none); the writer sends it first."""
        residue, self._residue = self._residue, b""
        return residue

    def put(self, record: Record) -> None:
        """Queue `record`, replacing an older pending record of the same client.

        The replacement goes to the back of the queue, so the queue stays in `queued`
        order and "everything up to count N was taken" is exact for partial takes.
        """
        held = self._pending.pop(record.client, None)
        if held is not None and not record.supersedes(held):
            self._pending[record.client] = held  # not newer: the pending one stays
            return
        self.queued += 1
        self._pending[record.client] = record
        self._seq[record.client] = self.queued
        self._wakeup.set()

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    def close(self) -> None:
        """Wake the writer with OutboxClosed; later puts are ignored by the bus."""
        self._closed = True
        self._wakeup.set()

    def __len__(self) -> int:
        return len(self._pending)

    async def take(self, limit: int = 4096) -> list[Record]:
        """Wait for pending records and take up to `limit` of them, oldest first.

        Also returns (with an empty batch) when a direct send left a residue. Raises
        OutboxClosed once the outbox is closed. Always checkpoints.
        """
        await trio.lowlevel.checkpoint()
        try:
            while not self._pending and not self._residue:
                if self._closed:
                    raise OutboxClosed
                self._idle = True
                await self._wakeup.wait()
                self._idle = False
                self._wakeup = trio.Event()
        finally:
            self._idle = False
        if not self._pending:
            return []
        if len(self._pending) <= limit:
            batch = list(self._pending.values())
            self._pending.clear()
            self._seq.clear()
            self.taken = self.queued
        else:
            clients = list(islice(self._pending, limit))
            batch = [self._pending.pop(client) for client in clients]
            self.taken = max(self._seq.pop(client) for client in clients)
        return batch


@attrs.define(eq=False)
class Bus:
    """Hands every record the store accepted to every link but the one it came from."""

    _outboxes: dict[str, Outbox] = attrs.field(factory=dict, init=False)
    _progress: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)
    published: int = attrs.field(default=0, init=False)

    @contextmanager
    def subscribe(self, link: str) -> Iterator[Outbox]:
        """An outbox for `link` for the duration of the block.

        A second subscription under the same name (a neighbour that reconnected)
        closes the first one's outbox, so its stale writer ends.
        """
        outbox = Outbox()
        if (old := self._outboxes.get(link)) is not None:
            old.close()
        self._outboxes[link] = outbox
        try:
            yield outbox
        finally:
            if self._outboxes.get(link) is outbox:
                del self._outboxes[link]
            outbox.close()

    def publish(self, record: Record, *, source: str | None = None) -> None:
        """Queue `record` on every link except `source`'s; never blocks."""
        self.published += 1
        for link, outbox in self._outboxes.items():
            if link != source and not outbox.send_nowait(record):
                outbox.put(record)

    @property
    def links(self) -> list[str]:
        """The names of the links subscribed now."""
        return list(self._outboxes)

    def mark_written(self, outbox: Outbox, upto: int) -> None:
        """A link's writer reports that records up to count `upto` reached its socket."""
        outbox.written = max(outbox.written, upto)
        self._progress.unpark_all()

    async def wait_handed_off(self) -> None:
        """Wait until what is queued now has been written to every link that is keeping up.

        "Flood first, then reply" (PROTOCOL.md §2): the client handler calls this after
        publishing and before writing its reply, so a neighbour asked right after the
        reply already has the update. A link whose writer is stuck in a send (a slow or
        paused neighbour) is not waited for: it must not slow anyone down, and it
        catches up by itself. The caller bounds the wait with a deadline as well.
        """
        targets = [(o, o.queued) for o in self._outboxes.values() if not o.busy]
        while any(o.written < upto and not o.closed and not o.busy for o, upto in targets):
            await self._progress.park()
