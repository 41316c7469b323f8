"""The bus and its outboxes: fan-out without waiting, coalescing, flood-first waits."""

from __future__ import annotations

from decimal import Decimal

import pytest
import trio
import trio.testing
from hypothesis import example, given
from hypothesis import strategies as st

from herd_trio.bus import Bus, Outbox, OutboxClosed
from herd_trio.protocol import Record
from herd_trio.store import record_of
from tests.helpers import Recording, publish


def rec(time: str, client: bytes = b"kiwi", origin: bytes = b"Clark") -> Record:
    at_line = b"AT %s +0.000000000 %s +34-118 %s" % (origin, client, time.encode())
    return Record(client, b"+34-118", Decimal(time), origin, at_line)


def put(outbox: Outbox, record: Record, wake: bool = True) -> None:
    outbox.put([(record.client, record.at_line)], wake)


def take(outbox: Outbox, limit: int = 4096) -> list[Record]:
    return [record_of(line) for line in outbox.take_nowait(limit)]


# --- Outbox ---------------------------------------------------------------------------


def test_thousand_updates_of_one_client_coalesce_to_the_newest() -> None:
    outbox = Outbox()
    for n in range(1000):
        put(outbox, rec(str(n)))
    assert len(outbox) == 1
    assert take(outbox) == [rec("999")]
    assert len(outbox) == 0
    assert take(outbox) == []


def test_a_batch_keeps_its_order_and_each_clients_last_line() -> None:
    outbox = Outbox()
    outbox.put([(b"a", b"AT a 1"), (b"b", b"AT b 1"), (b"a", b"AT a 2")])
    assert outbox.take_nowait() == [b"AT b 1", b"AT a 2"]
    assert outbox.queued == outbox.taken == 3


def test_take_returns_oldest_first_up_to_the_limit() -> None:
    outbox = Outbox()
    for client in (b"a", b"b", b"c", b"d"):
        put(outbox, rec("1", client=client))
    # An update replaces its client's pending record and moves to the back, so the
    # queue stays in sequence order (what makes partial-take accounting exact).
    put(outbox, rec("2", client=b"a"))
    assert take(outbox, limit=2) == [rec("1", client=b"b"), rec("1", client=b"c")]
    assert outbox.taken == 3  # b and c were puts #2 and #3; a's update is #5
    put(outbox, rec("3", client=b"a"))
    assert take(outbox, limit=2) == [rec("1", client=b"d"), rec("3", client=b"a")]
    assert outbox.taken == outbox.queued == 6
    assert len(outbox) == 0


async def test_a_quiet_put_does_not_wake_the_writer(nursery: trio.Nursery) -> None:
    outbox = Outbox()
    woke: list[bool] = []

    async def writer() -> None:
        await outbox.wait()
        woke.append(True)

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()
    put(outbox, rec("1"), wake=False)  # held for the writer's push
    await trio.testing.wait_all_tasks_blocked()
    assert (woke, len(outbox), outbox.queued) == ([], 1, 1)
    put(outbox, rec("2"))
    await trio.testing.wait_all_tasks_blocked()
    assert woke == [True]
    assert take(outbox) == [rec("2")]  # the newer one replaced the held one


async def test_wait_returns_on_a_put(nursery: trio.Nursery) -> None:
    outbox = Outbox()
    woke: list[list[Record]] = []

    async def writer() -> None:
        await outbox.wait()
        woke.append(take(outbox))

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()
    assert woke == []
    put(outbox, rec("1"))
    put(outbox, rec("1", client=b"apple"))
    await trio.testing.wait_all_tasks_blocked()
    assert woke == [[rec("1"), rec("1", client=b"apple")]]


async def test_wait_returns_on_wake_without_a_record(nursery: trio.Nursery) -> None:
    outbox = Outbox()
    done = trio.Event()

    async def writer() -> None:
        await outbox.wait()
        done.set()

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()
    outbox.wake()
    await trio.testing.wait_all_tasks_blocked()
    assert done.is_set()
    assert take(outbox) == []


async def test_a_partial_take_leaves_the_writer_awake_for_the_rest() -> None:
    outbox = Outbox()
    for client in (b"a", b"b"):
        put(outbox, rec("1", client=client))
    await outbox.wait()
    assert take(outbox, limit=1) == [rec("1", client=b"a")]
    with trio.testing.assert_checkpoints(), trio.fail_after(1):
        await outbox.wait()  # at once: b is pending
    assert take(outbox) == [rec("1", client=b"b")]


async def test_wait_checkpoints_even_when_records_are_pending() -> None:
    outbox = Outbox()
    put(outbox, rec("1"))
    with trio.testing.assert_checkpoints():
        await outbox.wait()


async def test_close_wakes_a_waiting_writer_with_outbox_closed(nursery: trio.Nursery) -> None:
    outbox = Outbox()
    errors: list[BaseException] = []

    async def writer() -> None:
        try:
            await outbox.wait()
        except OutboxClosed as exc:
            errors.append(exc)

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()
    outbox.close()
    await trio.testing.wait_all_tasks_blocked()
    assert len(errors) == 1
    assert outbox.closed
    with pytest.raises(OutboxClosed):
        await outbox.wait()


@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.integers(0, 20)), max_size=40))
def test_outbox_holds_the_last_line_put_per_client_in_order(
    updates: list[tuple[bytes, int]],
) -> None:
    # The bus puts only what the store kept, so the last line of a client is its newest.
    outbox = Outbox()
    last: dict[bytes, int] = {}
    for client, time in updates:
        put(outbox, rec(str(time), client=client))
        last.pop(client, None)
        last[client] = time
    assert len(outbox) == len(last)
    assert outbox.queued == len(updates)
    assert [(r.client, r.sent) for r in take(outbox)] == [(c, Decimal(t)) for c, t in last.items()]
    assert outbox.taken == outbox.queued


def test_a_held_burst_taken_whole_gives_each_clients_newest_line() -> None:
    outbox = Outbox()
    outbox.put([(b"a", b"AT a 1"), (b"b", b"AT b 1")], wake=False)
    outbox.put([(b"a", b"AT a 2"), (b"c", b"AT c 1")], wake=False)
    assert len(outbox) == 3
    assert outbox.queued == 4
    # In the order of each client's first line in the burst (a stays first).
    assert outbox.take_nowait() == [b"AT a 2", b"AT b 1", b"AT c 1"]
    assert outbox.taken == outbox.queued == 4
    assert not outbox
    assert len(outbox) == 0


def test_a_held_burst_joins_the_queue_in_order_when_more_comes_or_less_is_taken() -> None:
    outbox = Outbox()
    outbox.put([(b"a", b"AT a 1"), (b"b", b"AT b 1"), (b"a", b"AT a 2")], wake=False)
    outbox.put([(b"c", b"AT c 1")])  # a waking put: the burst is queued first
    assert outbox.take_nowait(limit=2) == [b"AT b 1", b"AT a 2"]
    assert outbox.taken == 3
    outbox.put([(b"d", b"AT d 1"), (b"e", b"AT e 1")], wake=False)  # c is pending: queued
    assert outbox.take_nowait(limit=1) == [b"AT c 1"]
    assert outbox.taken == 4
    assert outbox.take_nowait() == [b"AT d 1", b"AT e 1"]
    assert outbox.taken == outbox.queued == 6


class QueueModel:
    """The outbox's rule without its fast path: newest per client, a replacement at
    the back, every put numbered."""

    def __init__(self) -> None:
        self.pending: dict[bytes, tuple[bytes, int]] = {}
        self.queued = self.taken = 0

    def put(self, kept: list[tuple[bytes, bytes]]) -> None:
        for client, line in kept:
            self.queued += 1
            self.pending.pop(client, None)
            self.pending[client] = (line, self.queued)

    def take(self, limit: int) -> list[bytes]:
        clients = list(self.pending)[:limit]
        batch = [self.pending.pop(client) for client in clients]
        self.taken = self.queued if not self.pending else max(n for _, n in batch)
        return [line for line, _ in batch]


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["quiet", "waking"]),
            st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c", b"d"]), st.integers(0, 9))),
        ),
        st.tuples(st.just("take"), st.integers(1, 5)),
    ),
    max_size=30,
)


@given(OPS)
@example([("quiet", [(b"a", 0), (b"b", 0), (b"a", 1)]), ("take", 5)])
@example([("quiet", [(b"a", 0), (b"b", 0)]), ("take", 1), ("quiet", [(b"a", 1)]), ("take", 5)])
def test_quiet_and_waking_puts_and_takes_agree_with_the_queue_rule(
    ops: list[tuple[str, object]],
) -> None:
    # The same lines in every take as the plain rule, the same numbers; only the order
    # inside a held burst taken whole may differ.
    outbox, model = Outbox(), QueueModel()
    for op, arg in ops:
        if op == "take":
            assert isinstance(arg, int)
            whole = arg >= len(model.pending)
            got, want = outbox.take_nowait(arg), model.take(arg)
            assert (sorted(got) if whole else got) == (sorted(want) if whole else want)
        else:
            assert isinstance(arg, list)
            kept = [(c, b"AT %s %d" % (c, t)) for c, t in arg]
            outbox.put(kept, wake=op == "waking")
            model.put(kept)
        assert (outbox.queued, outbox.taken) == (model.queued, model.taken)
        assert len(outbox) == len(model.pending)
        assert bool(outbox) == bool(model.pending)


# --- Bus ------------------------------------------------------------------------------


def test_publish_skips_the_source_link() -> None:
    bus, bona, jaquez = Bus(), Recording(), Recording()
    with bus.subscribe("Bona", bona), bus.subscribe("Jaquez", jaquez):
        assert sorted(bus.links) == ["Bona", "Jaquez"]
        publish(bus, one := rec("1"), "Bona")
        publish(bus, two := rec("1", client=b"apple"))
        publish(bus, three := rec("1", client=b"pear"), "Nobody")
        assert bona.records == [two, three]
        assert jaquez.records == [one, two, three]
    assert bus.links == []
    assert bona.closed
    assert jaquez.closed


def test_resubscribing_under_the_same_name_closes_the_old_subscriber() -> None:
    bus, old, new = Bus(), Recording(), Recording()
    with bus.subscribe("Bona", old):
        with bus.subscribe("Bona", new):
            assert old.closed
            assert not new.closed
            assert bus.links == ["Bona"]
            publish(bus, rec("1"))
            assert (old.records, new.records) == ([], [rec("1")])
        assert bus.links == []  # the newer subscription ended: nothing is left
        publish(bus, rec("2"))
        assert old.records == []
    assert bus.links == []


def test_publish_with_no_links_is_fine() -> None:
    publish(Bus(), rec("1"))


class Writer(Recording):
    """A subscriber whose writer has taken records up to `queued` and wrote up to `written`."""

    def __init__(self, busy: bool = False) -> None:
        super().__init__()
        self.written = 0
        self.busy = busy

    def handoff_mark(self) -> int | None:
        queued = len(self.records)
        return None if self.busy or queued <= self.written else queued

    def handed_off(self, mark: int) -> bool:
        return self.written >= mark or self.busy or self.closed


async def test_wait_handed_off_returns_at_once_without_links() -> None:
    bus = Bus()
    publish(bus, rec("1"))
    with trio.move_on_after(1) as scope:
        await bus.wait_handed_off()
    assert not scope.cancelled_caught


async def test_wait_handed_off_waits_until_the_writer_reports_progress(
    nursery: trio.Nursery,
) -> None:
    bus, bona, jaquez = Bus(), Writer(), Writer()
    done = trio.Event()

    async def reply() -> None:
        await bus.wait_handed_off()
        done.set()

    with bus.subscribe("Bona", bona), bus.subscribe("Jaquez", jaquez):
        publish(bus, rec("1"))
        nursery.start_soon(reply)
        await trio.testing.wait_all_tasks_blocked()
        bona.written = 1
        bus.progress()
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # Jaquez has not written it yet
        publish(bus, rec("2"))  # published after the wait began: not waited for
        jaquez.written = 1
        bus.progress()
        await trio.testing.wait_all_tasks_blocked()
        assert done.is_set()


async def test_wait_handed_off_skips_a_link_stuck_in_a_send() -> None:
    bus = Bus()
    with bus.subscribe("Stuck", Writer(busy=True)):
        publish(bus, rec("1"))
        with trio.move_on_after(1) as scope:
            await bus.wait_handed_off()
        assert not scope.cancelled_caught


async def test_the_handoff_clock_bounds_every_waiter_with_one_timer(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    bus = Bus(handoff_deadline=1.0)
    nursery.start_soon(bus.run_handoff_clock)
    waited: list[tuple[bool, float]] = []

    async def reply() -> None:
        began = trio.current_time()
        waited.append((await bus.wait_handed_off(), trio.current_time() - began))

    with bus.subscribe("Bona", Writer()):  # ready, but it never writes
        publish(bus, rec("1"))
        nursery.start_soon(reply)
        await trio.sleep(0.3)
        nursery.start_soon(reply)  # begins between two ticks of the clock
        await trio.sleep(0.9)
        publish(bus, rec("2"))
        nursery.start_soon(reply)  # begins after the clock went idle again
        await trio.sleep(1.5)
    assert len(waited) == 3
    for handed_off, seconds in waited:
        assert not handed_off
        assert 0.5 - 1e-9 <= seconds <= 1.0 + 1e-9  # the clock is a float


async def test_wait_handed_off_returns_when_the_writer_reports_before_the_clock(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    bus, bona = Bus(handoff_deadline=1.0), Writer()
    nursery.start_soon(bus.run_handoff_clock)
    result: list[tuple[bool, float]] = []

    async def reply() -> None:
        began = trio.current_time()
        result.append((await bus.wait_handed_off(), trio.current_time() - began))

    with bus.subscribe("Bona", bona):
        publish(bus, rec("1"))
        nursery.start_soon(reply)
        await trio.sleep(0.2)
        bona.written = 1
        bus.progress()
        await trio.testing.wait_all_tasks_blocked()
    assert len(result) == 1
    assert result[0][0] is True
    assert result[0][1] == pytest.approx(0.2)


async def test_a_link_that_goes_away_releases_the_waiters(nursery: trio.Nursery) -> None:
    bus, bona = Bus(), Writer()
    done = trio.Event()

    async def reply() -> None:
        await bus.wait_handed_off()
        done.set()

    with bus.subscribe("Bona", bona):
        publish(bus, rec("1"))
        nursery.start_soon(reply)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
    await trio.testing.wait_all_tasks_blocked()
    assert done.is_set()
