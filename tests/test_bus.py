"""Bus and Outbox: fan-out to links that never blocks, coalescing per client."""

from __future__ import annotations

import contextlib
from decimal import Decimal

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from herd_trio.bus import Bus, Outbox, OutboxClosed
from herd_trio.protocol import Record


def rec(time: str, client: bytes = b"kiwi", origin: bytes = b"Clark") -> Record:
    at_line = b"AT %s +0.000000000 %s +34-118 %s" % (origin, client, time.encode())
    return Record(client, b"+34-118", Decimal(time), origin, at_line)


def test_publish_skips_the_source_link() -> None:
    bus = Bus()
    with bus.subscribe("Bona") as bona, bus.subscribe("Jaquez") as jaquez:
        assert sorted(bus.links) == ["Bona", "Jaquez"]
        bus.publish(rec("1"), source="Bona")
        assert (len(bona), len(jaquez)) == (0, 1)
        bus.publish(rec("1", client=b"apple"))
        assert (len(bona), len(jaquez)) == (1, 2)
        bus.publish(rec("1", client=b"pear"), source="Nobody")
        assert (len(bona), len(jaquez)) == (2, 3)
    assert bus.links == []


async def test_thousand_updates_of_one_client_coalesce_to_the_newest() -> None:
    bus = Bus()
    with bus.subscribe("Bona") as outbox:
        for n in range(1000):
            bus.publish(rec(str(n)))
        assert len(outbox) == 1
        assert await outbox.take() == [rec("999")]
        assert len(outbox) == 0


async def test_an_older_record_never_replaces_a_newer_pending_one() -> None:
    outbox = Outbox()
    newer = rec("5", origin=b"Bona")
    outbox.put(newer)
    outbox.put(rec("4", origin=b"Zed"))
    outbox.put(rec("5", origin=b"Bailey"))  # same time, lower origin
    outbox.put(rec("5", origin=b"Bona"))  # equal rank
    assert len(outbox) == 1
    assert await outbox.take() == [newer]


async def test_take_returns_oldest_first_up_to_the_limit() -> None:
    outbox = Outbox()
    for client in (b"a", b"b", b"c", b"d"):
        outbox.put(rec("1", client=client))
    # An update replaces its client's pending record and moves to the back, so the
    # queue stays in the order of `queued` (what makes partial-take accounting exact).
    outbox.put(rec("2", client=b"a"))
    assert await outbox.take(limit=2) == [rec("1", client=b"b"), rec("1", client=b"c")]
    assert outbox.taken == 3  # b and c were puts #2 and #3; a's update is #5
    outbox.put(rec("3", client=b"a"))
    assert await outbox.take(limit=2) == [rec("1", client=b"d"), rec("3", client=b"a")]
    assert outbox.taken == outbox.queued == 6
    assert len(outbox) == 0


async def test_take_waits_for_a_put(nursery: trio.Nursery) -> None:
    outbox = Outbox()
    taken: list[list[Record]] = []

    async def taker() -> None:
        taken.append(await outbox.take())

    nursery.start_soon(taker)
    await trio.testing.wait_all_tasks_blocked()
    assert taken == []
    outbox.put(rec("1"))
    outbox.put(rec("1", client=b"apple"))
    await trio.testing.wait_all_tasks_blocked()
    assert taken == [[rec("1"), rec("1", client=b"apple")]]


async def test_take_checkpoints_even_when_records_are_pending() -> None:
    outbox = Outbox()
    outbox.put(rec("1"))
    with trio.testing.assert_checkpoints():
        await outbox.take()


async def test_close_wakes_a_waiting_taker_with_outbox_closed(nursery: trio.Nursery) -> None:
    outbox = Outbox()
    errors: list[BaseException] = []

    async def taker() -> None:
        try:
            await outbox.take()
        except OutboxClosed as exc:
            errors.append(exc)

    nursery.start_soon(taker)
    await trio.testing.wait_all_tasks_blocked()
    outbox.close()
    await trio.testing.wait_all_tasks_blocked()
    assert len(errors) == 1
    with pytest.raises(OutboxClosed):
        await outbox.take()


async def test_resubscribing_under_the_same_name_closes_the_old_outbox() -> None:
    bus = Bus()
    with bus.subscribe("Bona") as old:
        with bus.subscribe("Bona") as new:
            assert bus.links == ["Bona"]
            with pytest.raises(OutboxClosed), trio.fail_after(1):
                await old.take()
            bus.publish(rec("1"))
            assert (len(old), len(new)) == (0, 1)
        assert bus.links == []  # the newer subscription ended: nothing is left
        bus.publish(rec("2"))
        assert len(old) == 0
    assert bus.links == []


async def test_leaving_the_subscription_closes_the_outbox_and_stops_puts() -> None:
    bus = Bus()
    with bus.subscribe("Bona") as outbox:
        pass
    bus.publish(rec("1"))
    assert len(outbox) == 0
    with pytest.raises(OutboxClosed):
        await outbox.take()


def test_publish_never_blocks_and_memory_is_bounded_by_clients() -> None:
    bus = Bus()
    with bus.subscribe("Slow") as slow, bus.subscribe("Slower") as slower:
        for n in range(20_000):
            bus.publish(rec(str(n), client=b"c%d" % (n % 100)))  # sync: cannot wait
        assert (len(slow), len(slower)) == (100, 100)
    assert bus.published == 20_000


def test_publish_with_no_links_is_fine() -> None:
    bus = Bus()
    bus.publish(rec("1"))
    assert bus.published == 1


@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.integers(0, 20)), max_size=40))
def test_outbox_holds_the_newest_record_per_client(updates: list[tuple[bytes, int]]) -> None:
    outbox = Outbox()
    newest: dict[bytes, int] = {}
    for client, time in updates:
        outbox.put(rec(str(time), client=client))
        newest[client] = max(time, newest.get(client, time))
    assert len(outbox) == len(newest)
    pending = {r.client: r.sent for r in outbox._pending.values()}
    assert pending == {c: Decimal(t) for c, t in newest.items()}


# --- flood first, then reply: waiting for the links' writers ----------------------------


async def test_wait_handed_off_returns_at_once_without_links() -> None:
    bus = Bus()
    bus.publish(rec("1"))
    with trio.move_on_after(1) as scope:
        await bus.wait_handed_off()
    assert not scope.cancelled_caught


async def test_wait_handed_off_waits_until_the_writer_reports_the_write(
    nursery: trio.Nursery,
) -> None:
    bus = Bus()
    done = trio.Event()

    async def reply() -> None:
        await bus.wait_handed_off()
        done.set()

    with bus.subscribe("Bona") as outbox:
        bus.publish(rec("1"))
        nursery.start_soon(reply)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert await outbox.take() == [rec("1")]
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # taken is not written
        bus.mark_written(outbox, outbox.taken)
        await trio.testing.wait_all_tasks_blocked()
        assert done.is_set()


async def test_wait_handed_off_skips_a_link_stuck_in_a_send() -> None:
    bus = Bus()
    with bus.subscribe("Stuck") as outbox:
        outbox.busy = True
        bus.publish(rec("1"))
        with trio.move_on_after(1) as scope:
            await bus.wait_handed_off()
        assert not scope.cancelled_caught


async def test_wait_handed_off_waits_for_records_a_partial_take_left(
    nursery: trio.Nursery,
) -> None:
    bus = Bus()
    released: list[bool] = []

    async def reply() -> None:
        await bus.wait_handed_off()
        released.append(True)

    with bus.subscribe("Bona") as outbox:
        bus.publish(rec("1", client=b"a"))
        bus.publish(rec("1", client=b"c"))
        nursery.start_soon(reply)
        await trio.testing.wait_all_tasks_blocked()
        assert await outbox.take(limit=1) == [rec("1", client=b"a")]
        bus.mark_written(outbox, outbox.taken)
        await trio.testing.wait_all_tasks_blocked()
        assert released == []  # c is still pending
        assert await outbox.take(limit=1) == [rec("1", client=b"c")]
        bus.mark_written(outbox, outbox.taken)
        await trio.testing.wait_all_tasks_blocked()
        assert released == [True]


async def test_wait_handed_off_is_not_released_early_by_a_partial_take(
    nursery: trio.Nursery,
) -> None:
    # A reply waits for its own update. When the writer takes a partial batch (limit),
    # the outbox must not report records as written that are still pending.
    bus = Bus()
    released: list[bool] = []

    async def reply() -> None:
        await bus.wait_handed_off()
        released.append(True)

    with bus.subscribe("Bona") as outbox:
        bus.publish(rec("1", client=b"b"))  # queued #1
        bus.publish(rec("1", client=b"a"))  # queued #2: the update this reply is about
        nursery.start_soon(reply)
        await trio.testing.wait_all_tasks_blocked()
        bus.publish(rec("2", client=b"b"))  # #3 replaces #1
        [first] = await outbox.take(limit=1)
        bus.mark_written(outbox, outbox.taken)
        await trio.testing.wait_all_tasks_blocked()
        assert released == ([True] if first.client == b"a" else [])
        [second] = await outbox.take(limit=1)
        assert {first.client, second.client} == {b"a", b"b"}
        assert rec("2", client=b"b") in (first, second)
        bus.mark_written(outbox, outbox.taken)
        await trio.testing.wait_all_tasks_blocked()
        assert released == [True]


# --- direct sends: an idle link's record goes straight to its socket -----------------


class Socket:
    """A non-blocking send that takes at most `room` bytes a call, or fails as told."""

    def __init__(self, room: int = 1 << 20, error: OSError | None = None) -> None:
        self.room, self.error = room, error
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        self.sent.append(data[: self.room])
        return min(len(data), self.room)


async def idle_writer(
    nursery: trio.Nursery,
    bus: Bus,
    outbox: Outbox,
    taken: list[list[Record]],
    tails: list[bytes] | None = None,
) -> None:
    """A writer task like the link's: parks in take() when idle, sends a direct
    send's tail first, and reports what it "sent"."""

    async def writer() -> None:
        with contextlib.suppress(OutboxClosed):  # the test's subscription ended
            while True:
                batch = await outbox.take()
                tail = outbox.take_residue()
                taken.append(batch)
                if tails is not None and tail:
                    tails.append(tail)
                bus.mark_written(outbox, outbox.taken)

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()


async def test_an_idle_link_gets_the_record_at_once_and_the_burst_after_it_batched(
    nursery: trio.Nursery,
) -> None:
    bus, socket = Bus(), Socket()
    taken: list[list[Record]] = []
    with bus.subscribe("Bona") as outbox:
        outbox.sender = socket.send
        await idle_writer(nursery, bus, outbox, taken)
        bus.publish(rec("1"))
        # Written before publish() returned: nothing to wait for before the reply.
        assert socket.sent == [rec("1").at_line + b"\n"]
        assert outbox.written == outbox.queued == 1
        bus.publish(rec("1", client=b"apple"))  # same burst: queued for the writer
        bus.publish(rec("1", client=b"pear"))
        assert len(socket.sent) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [[rec("1", client=b"apple"), rec("1", client=b"pear")]]
        # Idle again: the next lone record goes direct once more.
        bus.publish(rec("2"))
        assert socket.sent[-1] == rec("2").at_line + b"\n"
        await bus.wait_handed_off()  # returns at once: nothing outstanding
        assert outbox.written == outbox.queued == 4


async def test_a_partial_direct_send_leaves_the_tail_for_the_writer(nursery: trio.Nursery) -> None:
    bus, socket = Bus(), Socket(room=5)
    taken: list[list[Record]] = []
    tails: list[bytes] = []
    with bus.subscribe("Bona") as outbox:
        outbox.sender = socket.send
        await idle_writer(nursery, bus, outbox, taken, tails)
        line = rec("1").at_line + b"\n"
        bus.publish(rec("1"))
        assert socket.sent == [line[:5]]
        assert outbox.written < outbox.queued  # a reply would wait for the writer
        await trio.testing.wait_all_tasks_blocked()
        assert (taken, tails) == ([[]], [line[5:]])  # woken for the tail alone
        assert outbox.written == outbox.queued


@pytest.mark.parametrize(
    ("error", "disabled"),
    [(BlockingIOError(), False), (BrokenPipeError(), True)],
    ids=["would-block", "broken"],
)
async def test_a_failed_direct_send_falls_back_to_the_queue(
    nursery: trio.Nursery, error: OSError, disabled: bool
) -> None:
    bus, socket = Bus(), Socket(error=error)
    taken: list[list[Record]] = []
    with bus.subscribe("Bona") as outbox:
        outbox.sender = socket.send
        await idle_writer(nursery, bus, outbox, taken)
        bus.publish(rec("1"))
        assert (outbox.sender is None) == disabled
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [[rec("1")]]  # the writer sends it, and meets the error itself
