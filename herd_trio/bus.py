"""Fan-out of accepted records to the peer links, one coalescing outbox per link.

Publishing never waits: a link that cannot keep up does not slow the server, the
clients or the other links. Its outbox holds at most one pending record per client
(a storm of updates for one client coalesces to the newest), so its memory is bounded
by the number of clients, never by the update rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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

        Raises OutboxClosed once the outbox is closed. Always checkpoints.
        """
        await trio.lowlevel.checkpoint()
        while not self._pending:
            if self._closed:
                raise OutboxClosed
            await self._wakeup.wait()
            self._wakeup = trio.Event()
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
            if link != source:
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
