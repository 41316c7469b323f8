"""Fan-out of accepted records to the peer links, one coalescing outbox per link.

The bus does no I/O. It hands each record (its client and AT line: the line is all a
link sends) to every link's subscriber (the link's writer, herd_trio/linkwriter.py,
which owns the socket) and lets a client wait until what it published has reached the
links ("flood first, then reply"). Publishing never waits: a link that cannot keep up
does not slow the server, the clients or the other links. A link's outbox holds at
most one pending record per client (a storm of updates for one client coalesces to the
newest), so its memory is bounded by the number of clients, never by the update rate.

Under load, the bursts of one scheduling batch (a hundred clients' batches of lines
answered one after another) are coalesced. A client's burst of several updates (a
client that pipelines: a sign of load) is written at once, and the bursts published
after it in the same batch are held for `run_coalescer`, which runs after the batch
and writes them all with one write per link. A neighbour then reads hundreds of
records per wake-up instead of a client's dozen, and floods them on the same way. A
lone update, or a neighbour's batch (large already under load), does not arm the
coalescer: a herd under light load pays no task step for it.

A client waiting for its records to reach the links waits no longer than the handoff
deadline; `run_handoff_clock` keeps that deadline for every waiter at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import NoReturn, Protocol

import attrs
import trio

# Seconds a reply may wait for its update to reach the links. A link stuck in a send is
# not waited for at all, so this bounds only the wait for a writer or the coalescer
# that is ready to run: under 100 x 16 that wait is the rest of a scheduling batch,
# 10-90 ms. A safety net, not a latency target.
HANDOFF_DEADLINE = 0.5


class OutboxClosed(Exception):
    """The outbox was closed: its link is being replaced or shut down."""


@attrs.define(eq=False)
class Outbox:
    """Records waiting for one link's writer: newest per client, in first-queued order.

    Every record that enters gets a sequence number; `queued` is the last one given and
    `taken` the last one taken (all before it were taken too), which is what a waiter
    compares against what the writer has written.

    A burst held for a direct send (quiet puts into an empty outbox, the common case of
    a link that keeps up) is only listed as it comes, and taken whole: the per-client
    bookkeeping of two dicts per record is done only if something else comes first (a
    waking put, a partial take). It cost 6% of a relay's CPU.
    """

    _pending: dict[bytes, bytes] = attrs.field(factory=dict, init=False)  # client -> AT line
    _seq: dict[bytes, int] = attrs.field(factory=dict, init=False)  # the number of each pending one
    # Quiet puts into an empty outbox, not yet in `_pending`: (client, AT line) as put.
    _burst: list[tuple[bytes, bytes]] = attrs.field(factory=list, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _queued: int = attrs.field(default=0, init=False)
    _taken: int = attrs.field(default=0, init=False)

    @property
    def queued(self) -> int:
        """The sequence number of the last record that entered."""
        return self._queued

    @property
    def taken(self) -> int:
        """Every record up to this sequence number has been taken."""
        return self._taken

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    def __len__(self) -> int:
        if self._burst:  # then nothing is pending: a burst is listed only into an empty outbox
            return len(dict(self._burst))
        return len(self._pending)

    def __bool__(self) -> bool:
        return bool(self._pending or self._burst)

    def put(self, kept: Sequence[tuple[bytes, bytes]], wake: bool = True) -> None:
        """Queue records (client, AT line), each replacing a pending line of its
        client, and wake the writer (unless `wake` is False: the writer's push() sends
        them).

        What is published is what the store kept, and the store keeps a client's
        record only if it supersedes the one it held: a later line for a client is
        always the newer one, so it replaces without a comparison. The replacement
        goes to the back of the queue, so the queue stays in sequence order and
        "everything up to N was taken" is exact for partial takes.
        """
        if not wake and not self._pending:  # a burst held for a direct send: listed only
            self._burst += kept
            self._queued += len(kept)
            return
        if self._burst:
            self._settle()
        self._queued = self._enqueue(kept, self._queued)
        if wake:
            self._wakeup.set()

    def _settle(self) -> None:
        """Put the listed burst into the queue, numbered as it was put."""
        burst, self._burst = self._burst, []
        self._enqueue(burst, self._queued - len(burst))

    def _enqueue(self, kept: Sequence[tuple[bytes, bytes]], number: int) -> int:
        """Queue records, numbered from `number` + 1 on; the last number given."""
        pending, seq = self._pending, self._seq
        for client, line in kept:
            pending.pop(client, None)
            number += 1
            pending[client] = line
            seq[client] = number
        return number

    def wake(self) -> None:
        """Wake the writer without a record (it has a direct send's tail to finish)."""
        self._wakeup.set()

    def close(self) -> None:
        """Wake the writer with OutboxClosed; records put later are never taken."""
        self._closed = True
        self._wakeup.set()

    async def wait(self) -> None:
        """Wait for a put(), a wake() or close(); OutboxClosed once closed. Always checkpoints."""
        if self._wakeup.is_set() or self._closed:
            await trio.lowlevel.checkpoint()
        else:
            await self._wakeup.wait()
        self._wakeup = trio.Event()
        if self._closed:
            raise OutboxClosed

    def take_nowait(self, limit: int = 4096) -> list[bytes]:
        """Up to `limit` pending AT lines, oldest first (an empty list if none).

        A held burst taken whole gives each client's newest line in the order of its
        client's first line in the burst (the queue would have moved it to the back).
        """
        if self._burst:
            if not self._pending and len(self._burst) <= limit:
                newest = dict(self._burst)  # in C: a later line of a client replaces its earlier
                self._burst = []
                self._taken = self._queued
                return list(newest.values())
            self._settle()
        if len(self._pending) <= limit:
            batch = list(self._pending.values())
            self._pending.clear()
            self._seq.clear()
            self._taken = self._queued
            return batch
        clients = list(islice(self._pending, limit))
        batch = [self._pending.pop(client) for client in clients]
        self._taken = max(self._seq.pop(client) for client in clients)
        self._wakeup.set()  # the rest is still pending
        return batch


class Subscriber(Protocol):
    """A link's writer as the bus sees it."""

    def deliver(self, kept: Sequence[tuple[bytes, bytes]]) -> bool:
        """Take records (client, AT line) for the peer; never blocks. True if they wait
        for push()."""

    def push(self) -> None:
        """Send what deliver() held, without blocking."""

    def handoff_mark(self) -> int | None:
        """A mark to wait for: everything delivered so far; None if there is nothing to wait for."""

    def handed_off(self, mark: int) -> bool:
        """True once everything up to `mark` reached the socket, or the link is stuck or gone."""

    def close(self) -> None:
        """End the subscription: the writer stops."""


@attrs.define(eq=False)
class Bus:
    """Hands every record the store accepted to every link but the one it came from."""

    _subscribers: dict[str, Subscriber] = attrs.field(factory=dict, init=False)
    _held: list[Subscriber] = attrs.field(factory=list, init=False)  # to push()
    _progress: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)
    _coalescing: bool = attrs.field(default=False, init=False)  # run_coalescer is running
    _pushed: bool = attrs.field(default=False, init=False)  # later bursts of this batch wait
    _arm: bool = attrs.field(default=False, init=False)  # the next push holds later bursts
    _due: trio.Event = attrs.field(factory=trio.Event, init=False)  # wakes run_coalescer
    handoff_deadline: float = HANDOFF_DEADLINE
    _clocked: bool = attrs.field(default=False, init=False)  # run_handoff_clock is running
    _ticks: int = attrs.field(default=0, init=False)  # of run_handoff_clock, so far
    _waiting: trio.Event = attrs.field(factory=trio.Event, init=False)  # a client waits

    @contextmanager
    def subscribe(self, link: str, subscriber: Subscriber) -> Iterator[None]:
        """Deliver to `subscriber` for the duration of the block, then close it.

        A second subscription under the same name (a neighbour that reconnected)
        closes the first one, so its stale writer ends.
        """
        if (old := self._subscribers.get(link)) is not None:
            old.close()
        self._subscribers[link] = subscriber
        try:
            yield
        finally:
            if self._subscribers.get(link) is subscriber:
                del self._subscribers[link]
            subscriber.close()
            self.progress()  # a client waiting for this link waits no longer

    def publish(self, kept: Sequence[tuple[bytes, bytes]], source: str | None = None) -> None:
        """Deliver records the store kept, as (client, AT line) in the order it kept
        them, to every link except `source`'s; never blocks.

        A publisher calls push() at the end of the burst it publishes in (a batch of
        client lines, a batch of peer lines): links whose writers were idle send the
        whole burst then, with one write each (LinkWriter.deliver), or, if a client's
        burst of several updates was written already in this scheduling batch, the
        coalescer does after the batch. Until then, or until its writer wakes for a
        heartbeat, a held record waits; handed_off and wait_handed_off push first.
        """
        if source is None and len(kept) > 1:
            self._arm = True
        for link, subscriber in self._subscribers.items():
            if link != source and subscriber.deliver(kept):
                self._held.append(subscriber)

    def push(self) -> None:
        """Send what the links hold from this burst (see publish); never blocks.

        While run_coalescer runs, a push that writes a client's burst of several
        updates holds the bursts published after it in the same scheduling batch, for
        the coalescer to write after the batch.
        """
        arm, self._arm = self._arm, False
        if not self._pushed:
            self._write_held(arm)

    def _write_held(self, hold_later: bool) -> None:
        """Have the links send what they hold; with `hold_later` (and the coalescer
        running), hold the bursts published after this in the same scheduling batch."""
        if self._held:
            held, self._held = self._held, []
            for subscriber in held:
                subscriber.push()
            if hold_later and self._coalescing:
                self._pushed = True
                self._due.set()  # the coalescer runs after this batch

    async def run_coalescer(self) -> NoReturn:
        """Write the bursts held after a client's burst of several updates (see the
        module doc), once per scheduling batch, and tell the clients waiting for them.

        Without it running (a bare Bus in a test, for one) every push writes at once.
        """
        self._coalescing = True
        try:
            while True:
                await self._due.wait()
                self._due = trio.Event()
                self._pushed = False
                if self._held:
                    self._write_held(True)  # under load: the next batch's bursts wait too
                    self.progress()
        finally:
            self._coalescing = self._pushed = False

    @property
    def links(self) -> list[str]:
        """The names of the links subscribed now."""
        return list(self._subscribers)

    def progress(self) -> None:
        """A writer reports that it wrote something: re-check the waiting clients."""
        self._progress.unpark_all()

    def handed_off(self) -> bool:
        """True if what was delivered so far reached every link that is keeping up
        (wait_handed_off would not wait)."""
        self.push()
        if not self._subscribers:  # a server without links: nothing to wait for
            return True
        return _reached(self._marks())

    def _marks(self) -> list[tuple[Subscriber, int]]:
        """Each subscriber with something unsent, and how far it must get."""
        return [(s, m) for s in self._subscribers.values() if (m := s.handoff_mark()) is not None]

    async def wait_handed_off(self) -> bool:
        """Wait until what was delivered so far reached every link that is keeping up;
        False if the handoff deadline came first.

        "Flood first, then reply" (PROTOCOL.md §2): the client handler calls this after
        publishing and before writing its reply, so a neighbour asked right after the
        reply already has the update. A link whose writer is stuck in a send (a slow or
        paused neighbour) is not waited for: it must not slow anyone down, and it
        catches up by itself. A writer that is ready but never writes is waited for
        until the deadline: between half of `handoff_deadline` and all of it while
        run_handoff_clock runs, else exactly `handoff_deadline`.
        """
        self.push()
        marks = self._marks()
        if self._clocked:
            began = self._ticks
            while not _reached(marks):
                if self._ticks - began >= 2:
                    return False
                self._waiting.set()
                await self._progress.park()
            return True
        with trio.move_on_after(self.handoff_deadline):
            while not _reached(marks):
                await self._progress.park()
            return True
        return False

    async def run_handoff_clock(self) -> NoReturn:
        """Keep the handoff deadline of every client in wait_handed_off: while any
        waits, tick every half deadline and wake them all; a waiter gives up at its
        second tick.

        One timer for all of them instead of a cancel scope with a deadline per wait:
        entering and leaving one costs about 9.5 us on a 2-core machine, and every
        reply that waits would pay it (7% of Clark's CPU under 100 x 16).
        """
        self._clocked = True
        try:
            while True:
                await self._waiting.wait()
                self._waiting = trio.Event()
                while self._progress.statistics().tasks_waiting:
                    await trio.sleep(self.handoff_deadline / 2)
                    self._ticks += 1
                    self._progress.unpark_all()
        finally:
            self._clocked = False


def _reached(marks: list[tuple[Subscriber, int]]) -> bool:
    """True once every subscriber got as far as its mark (Bus._marks)."""
    return all(subscriber.handed_off(mark) for subscriber, mark in marks)
