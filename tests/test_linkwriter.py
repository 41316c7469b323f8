"""The link writer's direct path: a burst held while the task is idle, pushed in one send."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal

import attrs
import trio
import trio.testing

from herd_trio.bus import Bus
from herd_trio.linkwriter import LinkWriter, Timers
from herd_trio.protocol import Record
from tests.helpers import publish


def rec(client: bytes, time: str = "5") -> Record:
    at_line = b"AT Clark +0.000000000 %s +34-118 %s" % (client, time.encode())
    return Record(client, b"+34-118", Decimal(time), b"Clark", at_line)


def lines(*records: Record) -> bytes:
    return b"".join(record.at_line + b"\n" for record in records)


@attrs.define
class FakeSocket:
    """A non-blocking send that takes at most `room` bytes per call (None: all)."""

    room: int | None = None
    calls: list[bytes] = attrs.field(factory=list)

    def send(self, data: bytes) -> int:
        taken = data if self.room is None else data[: self.room]
        self.calls.append(taken)
        return len(taken)

    def sender(self, _stream: trio.abc.SendStream) -> Callable[[bytes], int] | None:
        return self.send


def written(stream: trio.testing.MemorySendStream) -> bytes:
    """What the writer task wrote to `stream` so far."""
    try:
        return bytes(stream.get_data_nowait())
    except trio.WouldBlock:
        return b""


QUIET = Timers(heartbeat=math.inf, sync=math.inf, next_sync=math.inf)


async def start(
    nursery: trio.Nursery, bus: Bus, fake: FakeSocket
) -> tuple[LinkWriter, trio.testing.MemorySendStream]:
    send = trio.testing.MemorySendStream()  # what the task writes, to read back
    writer = LinkWriter(send, 10.0, bus.progress, sender=fake.sender)

    async def link() -> None:
        with bus.subscribe("Bona", writer):
            await writer.run(attrs.evolve(QUIET), lambda: b"")

    nursery.start_soon(link)
    await trio.testing.wait_all_tasks_blocked()
    return writer, send


async def test_a_burst_to_an_idle_writer_leaves_in_one_send_at_push(nursery: trio.Nursery) -> None:
    bus, fake = Bus(), FakeSocket()
    writer, receive = await start(nursery, bus, fake)
    burst = [rec(b"a"), rec(b"b"), rec(b"c")]
    for record in burst:
        publish(bus, record)
    await trio.testing.wait_all_tasks_blocked()
    assert fake.calls == []  # held: nothing sent, the task not woken
    assert bus.handed_off()  # asking pushes, and the socket took it all
    assert fake.calls == [lines(*burst)]  # one send for the burst
    assert writer.records_sent == 3
    await trio.testing.wait_all_tasks_blocked()
    assert written(receive) == b""  # the task wrote nothing


async def test_what_the_kernel_does_not_take_the_task_sends_in_order(
    nursery: trio.Nursery,
) -> None:
    bus, fake = Bus(), FakeSocket(room=10)
    writer, receive = await start(nursery, bus, fake)
    burst = [rec(b"a"), rec(b"b")]
    for record in burst:
        publish(bus, record)
    bus.push()
    assert not bus.handed_off()  # the tail is the task's
    with trio.fail_after(1):
        await bus.wait_handed_off()
    assert fake.calls[0] + written(receive) == lines(*burst)
    assert writer.depth() == 0


async def test_records_for_a_busy_writer_go_through_its_task(nursery: trio.Nursery) -> None:
    bus, fake = Bus(), FakeSocket(room=0)  # the socket takes nothing: the task sends
    _writer, receive = await start(nursery, bus, fake)
    first, second = rec(b"a"), rec(b"b")
    publish(bus, first)
    bus.push()  # the task is woken for the whole of it
    publish(bus, second)  # while the task is busy or about to be: queued, not held
    with trio.fail_after(1):
        await bus.wait_handed_off()
    await trio.testing.wait_all_tasks_blocked()
    assert written(receive) == lines(first, second)


async def test_a_waiting_client_pushes_held_records(nursery: trio.Nursery) -> None:
    bus, fake = Bus(), FakeSocket()
    await start(nursery, bus, fake)
    publish(bus, one := rec(b"a"))
    with trio.fail_after(1):
        await bus.wait_handed_off()  # flood first, then reply: it sends what is held
    assert fake.calls == [lines(one)]


async def test_a_burst_after_the_task_took_held_records_is_pushed_too(
    nursery: trio.Nursery,
) -> None:
    bus, fake = Bus(), FakeSocket()
    writer, receive = await start(nursery, bus, fake)
    publish(bus, first := rec(b"a"))  # held for a push ...
    writer.pong()  # ... but the task wakes first (a PING to answer) and takes it along
    await trio.testing.wait_all_tasks_blocked()
    assert written(receive) == b"PONG\n" + lines(first)
    bus.push()  # nothing left to push
    assert fake.calls == []
    publish(bus, second := rec(b"b"))  # the next burst to the idle task: held again
    bus.push()
    assert fake.calls == [lines(second)]
    assert bus.handed_off()


# --- The bus's coalescer: one write per link for the bursts of a scheduling batch ---------


def burst(*records: Record) -> list[tuple[bytes, bytes]]:
    return [(record.client, record.at_line) for record in records]


async def test_bursts_after_a_clients_burst_in_the_same_batch_leave_together(
    nursery: trio.Nursery,
) -> None:
    bus, fake = Bus(), FakeSocket()
    nursery.start_soon(bus.run_coalescer)
    _writer, receive = await start(nursery, bus, fake)
    a1, a2, b, c1, c2 = (rec(client) for client in (b"a1", b"a2", b"b", b"c1", b"c2"))
    bus.publish(burst(a1, a2))  # a client's burst of several updates: a sign of load
    bus.push()  # written at once, and the later bursts of this batch wait
    assert fake.calls == [lines(a1, a2)]
    bus.publish(burst(b))  # another client's, in the same batch
    bus.push()
    bus.publish(burst(c1, c2), source="Jaquez")  # a neighbour's batch, in the same batch
    bus.push()
    assert fake.calls == [lines(a1, a2)]  # held for the coalescer
    assert not bus.handed_off()  # so their clients wait before replying
    with trio.fail_after(1):
        await bus.wait_handed_off()  # the coalescer wrote them, and said so
    assert fake.calls == [lines(a1, a2), lines(b, c1, c2)]  # in one write
    await trio.testing.wait_all_tasks_blocked()
    assert written(receive) == b""  # the writer task wrote nothing
    publish(bus, d := rec(b"d"))  # a later batch: its first push writes at once
    bus.push()
    assert fake.calls[-1] == lines(d)


async def test_a_lone_update_or_a_neighbours_batch_does_not_hold_the_next(
    nursery: trio.Nursery,
) -> None:
    # Under light load a client sends one update at a time: the coalescer is not woken,
    # and the bursts after it are written at once.
    bus, fake = Bus(), FakeSocket()
    nursery.start_soon(bus.run_coalescer)
    await start(nursery, bus, fake)
    a, b1, b2, c = rec(b"a"), rec(b"b1"), rec(b"b2"), rec(b"c")
    bus.publish(burst(a))
    bus.push()
    bus.publish(burst(b1, b2), source="Jaquez")
    bus.push()
    bus.publish(burst(c))
    bus.push()
    assert fake.calls == [lines(a), lines(b1, b2), lines(c)]


async def test_without_the_coalescer_every_push_writes(nursery: trio.Nursery) -> None:
    bus, fake = Bus(), FakeSocket()
    await start(nursery, bus, fake)
    burst = [rec(b"a"), rec(b"b")]
    for record in burst:
        publish(bus, record)
        bus.push()
    assert fake.calls == [lines(record) for record in burst]


async def test_a_coalescer_that_stopped_leaves_no_push_held(nursery: trio.Nursery) -> None:
    bus, fake = Bus(), FakeSocket()
    coalescer = trio.CancelScope()

    async def coalesce() -> None:
        with coalescer:
            await bus.run_coalescer()

    nursery.start_soon(coalesce)
    await start(nursery, bus, fake)
    first = [rec(b"a1"), rec(b"a2")]
    bus.publish(burst(*first))
    bus.push()  # writes, and holds the batch's later bursts for the coalescer ...
    coalescer.cancel()  # ... which stops before it runs
    await trio.testing.wait_all_tasks_blocked()
    publish(bus, second := rec(b"b"))
    bus.push()
    assert fake.calls == [lines(*first), lines(second)]


class AfterWriterSteps(trio.abc.Instrument):
    """Runs `check` after every step of one task (instruments run between steps)."""

    def __init__(self, task: trio.lowlevel.Task, check: Callable[[], None]) -> None:
        self.task, self.check = task, check

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.check()


async def test_a_write_the_socket_took_whole_never_passes_for_a_stuck_send(
    nursery: trio.Nursery,
) -> None:
    # "Flood first, then reply": only a writer stuck in a send is not waited for. A
    # record delivered right after the task's write, while the task yields (a send is
    # a checkpoint), must still be waited for: the task has not written it yet.
    ours, theirs = trio.socket.socketpair()
    stream = trio.SocketStream(ours)
    bus = Bus()
    writer = LinkWriter(stream, 10.0, bus.progress)
    tasks: list[trio.lowlevel.Task] = []
    unwaited: list[bytes] = []

    async def link() -> None:
        tasks.append(trio.lowlevel.current_task())
        with bus.subscribe("Bona", writer):
            await writer.run(attrs.evolve(QUIET), lambda: b"")

    def deliver_and_ask() -> None:  # a client publishing between the task's steps
        if writer.outbox.closed:
            return
        client = b"c%d" % len(unwaited)
        writer.deliver([(client, rec(client).at_line)])
        if writer.handoff_mark() is None and writer.depth():
            unwaited.append(client)

    async with stream:
        with theirs:
            nursery.start_soon(link)
            await trio.testing.wait_all_tasks_blocked()
            instrument = AfterWriterSteps(tasks[0], deliver_and_ask)
            trio.lowlevel.add_instrument(instrument)
            try:
                writer.pong()  # wakes the task: it writes the PONG itself
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(instrument)
    assert unwaited == []
