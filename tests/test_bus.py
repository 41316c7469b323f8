"""The bus and its outboxes: fan-out without waiting, coalescing, flood-first waits."""

from __future__ import annotations

from decimal import Decimal

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from herd_trio.bus import Bus, Outbox, OutboxClosed
from herd_trio.protocol import Record
from tests.helpers import Recording


def rec(time: str, client: bytes = b"kiwi", origin: bytes = b"Clark") -> Record:
    at_line = b"AT %s +0.000000000 %s +34-118 %s" % (origin, client, time.encode())
    return Record(client, b"+34-118", Decimal(time), origin, at_line)


# --- Outbox ---------------------------------------------------------------------------


def test_thousand_updates_of_one_client_coalesce_to_the_newest() -> None:
    outbox = Outbox()
    for n in range(1000):
        outbox.put(rec(str(n)))
    assert len(outbox) == 1
    assert outbox.take_nowait() == [rec("999")]
    assert len(outbox) == 0
    assert outbox.take_nowait() == []


def test_an_older_record_never_replaces_a_newer_pending_one() -> None:
    outbox = Outbox()
    newer = rec("5", origin=b"Bona")
    outbox.put(newer)
    outbox.put(rec("4", origin=b"Zed"))
    outbox.put(rec("5", origin=b"Bailey"))  # same time, lower origin
    outbox.put(rec("5", origin=b"Bona"))  # equal rank
    assert outbox.take_nowait() == [newer]
    assert outbox.queued == 1


def test_take_returns_oldest_first_up_to_the_limit() -> None:
    outbox = Outbox()
    for client in (b"a", b"b", b"c", b"d"):
        outbox.put(rec("1", client=client))
    # An update replaces its client's pending record and moves to the back, so the
    # queue stays in sequence order (what makes partial-take accounting exact).
    outbox.put(rec("2", client=b"a"))
    assert outbox.take_nowait(limit=2) == [rec("1", client=b"b"), rec("1", client=b"c")]
    assert outbox.taken == 3  # b and c were puts #2 and #3; a's update is #5
    outbox.put(rec("3", client=b"a"))
    assert outbox.take_nowait(limit=2) == [rec("1", client=b"d"), rec("3", client=b"a")]
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
    outbox.put(rec("1"), wake=False)  # held for the writer's push
    await trio.testing.wait_all_tasks_blocked()
    assert (woke, len(outbox), outbox.queued) == ([], 1, 1)
    outbox.put(rec("2"))
    await trio.testing.wait_all_tasks_blocked()
    assert woke == [True]
    assert outbox.take_nowait() == [rec("2")]  # the newer one replaced the held one


async def test_wait_returns_on_a_put(nursery: trio.Nursery) -> None:
    outbox = Outbox()
    woke: list[list[Record]] = []

    async def writer() -> None:
        await outbox.wait()
        woke.append(outbox.take_nowait())

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()
    assert woke == []
    outbox.put(rec("1"))
    outbox.put(rec("1", client=b"apple"))
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
    assert outbox.take_nowait() == []


async def test_a_partial_take_leaves_the_writer_awake_for_the_rest() -> None:
    outbox = Outbox()
    for client in (b"a", b"b"):
        outbox.put(rec("1", client=client))
    await outbox.wait()
    assert outbox.take_nowait(limit=1) == [rec("1", client=b"a")]
    with trio.testing.assert_checkpoints(), trio.fail_after(1):
        await outbox.wait()  # at once: b is pending
    assert outbox.take_nowait() == [rec("1", client=b"b")]


async def test_wait_checkpoints_even_when_records_are_pending() -> None:
    outbox = Outbox()
    outbox.put(rec("1"))
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
def test_outbox_holds_the_newest_record_per_client(updates: list[tuple[bytes, int]]) -> None:
    outbox = Outbox()
    newest: dict[bytes, int] = {}
    for client, time in updates:
        outbox.put(rec(str(time), client=client))
        newest[client] = max(time, newest.get(client, time))
    assert len(outbox) == len(newest)
    pending = {r.client: r.sent for r in outbox.take_nowait()}
    assert pending == {c: Decimal(t) for c, t in newest.items()}


# --- Bus ------------------------------------------------------------------------------


def test_publish_skips_the_source_link() -> None:
    bus, bona, jaquez = Bus(), Recording(), Recording()
    with bus.subscribe("Bona", bona), bus.subscribe("Jaquez", jaquez):
        assert sorted(bus.links) == ["Bona", "Jaquez"]
        bus.publish(one := rec("1"), source="Bona")
        bus.publish(two := rec("1", client=b"apple"))
        bus.publish(three := rec("1", client=b"pear"), source="Nobody")
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
            bus.publish(rec("1"))
            assert (old.records, new.records) == ([], [rec("1")])
        assert bus.links == []  # the newer subscription ended: nothing is left
        bus.publish(rec("2"))
        assert old.records == []
    assert bus.links == []


def test_publish_with_no_links_is_fine() -> None:
    Bus().publish(rec("1"))


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
    bus.publish(rec("1"))
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
        bus.publish(rec("1"))
        nursery.start_soon(reply)
        await trio.testing.wait_all_tasks_blocked()
        bona.written = 1
        bus.progress()
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # Jaquez has not written it yet
        bus.publish(rec("2"))  # published after the wait began: not waited for
        jaquez.written = 1
        bus.progress()
        await trio.testing.wait_all_tasks_blocked()
        assert done.is_set()


async def test_wait_handed_off_skips_a_link_stuck_in_a_send() -> None:
    bus = Bus()
    with bus.subscribe("Stuck", Writer(busy=True)):
        bus.publish(rec("1"))
        with trio.move_on_after(1) as scope:
            await bus.wait_handed_off()
        assert not scope.cancelled_caught


async def test_a_link_that_goes_away_releases_the_waiters(nursery: trio.Nursery) -> None:
    bus, bona = Bus(), Writer()
    done = trio.Event()

    async def reply() -> None:
        await bus.wait_handed_off()
        done.set()

    with bus.subscribe("Bona", bona):
        bus.publish(rec("1"))
        nursery.start_soon(reply)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
    await trio.testing.wait_all_tasks_blocked()
    assert done.is_set()
