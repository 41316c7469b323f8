"""Range-based reconciliation (herd_trio/sync.py): convergence, traffic bounded by the
difference, and bounds on what a peer can make a server do."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from herd_trio.lines import LineReader
from herd_trio.linkwriter import LinkWriter, Timers
from herd_trio.protocol import ProtocolError, Record, parse_at
from herd_trio.stats import PeerStats
from herd_trio.store import Store, key_of, node_of
from herd_trio.sync import (
    CHUNK,
    REPLY_BUDGET,
    PeerMisbehaved,
    Reconciler,
    RoundGate,
)
from herd_trio.synclines import (
    SYNC_PREFIXES,
    Items,
    Need,
    Sums,
    format_items,
    format_need,
    format_sums,
    parse_sync,
)


def rec(client: str, time: int, origin: str = "Clark") -> Record:
    line = b"AT %s +0.000000001 %s +34.068930-118.445127 %d" % (
        origin.encode(),
        client.encode(),
        time,
    )
    return parse_at(line)


@attrs.define
class Side:
    """One end of a simulated link: its store, its reconciler, what it sent."""

    store: Store
    out: deque[bytes] = attrs.field(factory=deque)
    sync: Reconciler = attrs.field(init=False)
    records: int = 0  # AT lines sent
    lines: int = 0  # sync lines sent
    log: list[str] = attrs.field(factory=list)
    now: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.sync = Reconciler(
            self.store,
            self.send,
            self.stream,
            self.log.append,
            "peer",
            PeerStats("out"),
            2.5,
            clock=lambda: self.now,
        )

    def send(self, line: bytes) -> None:
        self.out.append(line)

    def stream(self, chunks: Iterator[bytes]) -> None:
        for chunk in chunks:
            self.out.extend(chunk.splitlines())

    def take(self, line: bytes) -> None:
        """Handle one line from the other side."""
        if line.startswith(SYNC_PREFIXES):
            self.sync.handle(parse_sync(line), self.now)
        else:
            self.store.offer(parse_at(line))


def run(a: Side, b: Side, *, both: bool = False, transcript: list[str] | None = None) -> None:
    """Deliver lines both ways until the link is quiet; a starts a round (b too if `both`)."""
    a.out.append(a.sync.start())
    if both:
        b.out.append(b.sync.start())
    while a.out or b.out:
        for sender, receiver, name in ((a, b, "A"), (b, a, "B")):
            while sender.out:
                line = sender.out.popleft()
                if line.startswith(SYNC_PREFIXES):
                    sender.lines += 1
                else:
                    sender.records += 1
                if transcript is not None:
                    transcript.append(f"{name}: {line.decode()}")
                receiver.take(line)


def same(one: Store, two: Store) -> bool:
    return one.summary(0, 0) == two.summary(0, 0) and sorted(
        r.at_line for r in one.snapshot()
    ) == sorted(r.at_line for r in two.snapshot())


# --- the wire format ----------------------------------------------------------------------


def test_sync_lines_round_trip() -> None:
    assert parse_sync(format_sums(0, 0, [5])) == Sums(0, 0, (5,))
    assert parse_sync(format_sums(2, 32, [1, 2**64 - 1])) == Sums(2, 32, (1, 2**64 - 1))
    key = key_of(b"kiwi")
    items = format_items(3, node_of(key, 3), [(key, 7)])
    assert items == b"ITEMS 3 %d %016x%016x" % (node_of(key, 3), key, 7)
    assert parse_sync(items) == Items(3, node_of(key, 3), ((key, 7),))
    assert parse_sync(b"ITEMS 0 0") == Items(0, 0, ())
    assert parse_sync(format_need([1, key])) == Need((1, key))
    assert format_sums(0, 0, [0xABC]) == b"SUMS 0 0 0000000000000abc"


@pytest.mark.parametrize(
    "line",
    [
        b"SUMS 0 0",
        b"SUMS 0 1 0000000000000000",  # no node 1 at the root
        b"SUMS 1 8 " + b" ".join([b"0" * 16] * 9),  # runs past the parent
        b"SUMS 1 3 0000000000000000",  # not the first child
        b"SUMS 17 0 0000000000000000",  # below the keys
        b"SUMS 01 0 0000000000000000",  # not canonical
        b"SUMS 1 0 000000000000000G",
        b"SUMS 1 0 00000000000000000",
        b"SUMS  1 0 0000000000000000",
        b"SUMS 2 0 " + b" ".join([b"0" * 16] * 17),
        b"ITEMS 1 0 " + b"f" * 32,  # key outside node 1/0
        b"ITEMS 0 0 " + b" ".join([b"0" * 32] * 33),  # more than ITEMS_MAX
        b"ITEMS 0",
        b"NEED",
        b"NEED " + b" ".join([b"0" * 16] * 65),
        b"NEED 123",
        b"NEEDS 0000000000000000",
        b"SUMS -1 0 0000000000000000",
    ],
)
def test_malformed_sync_lines_are_refused(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_sync(line)


@given(st.binary(max_size=80))
def test_parse_sync_gives_a_line_or_protocol_error(line: bytes) -> None:
    try:
        parsed = parse_sync(b"SUMS " + line)
    except ProtocolError:
        return
    assert isinstance(parsed, Sums)


# --- convergence and traffic ----------------------------------------------------------------


def test_worked_example_three_differences() -> None:
    """docs/design.md's example: 100 shared records; A alone holds `only-a`, B alone
    holds `only-b`, and both hold `both` with B's newer."""
    shared = [rec(f"c{n}", 100) for n in range(100)]
    a = Side(Store([*shared, rec("only-a", 5), rec("both", 6)]))
    b = Side(Store([*shared, rec("only-b", 5), rec("both", 7, "Bona")]))
    transcript: list[str] = []
    run(a, b, transcript=transcript)
    assert same(a.store, b.store)
    assert b.store.get(b"only-a") == rec("only-a", 5)
    assert a.store.get(b"only-b") == rec("only-b", 5)
    assert a.store.get(b"both") == rec("both", 7, "Bona")
    # A sends only-a and its older `both` (which B refuses); B sends only-b and `both`.
    assert (a.records, b.records) == (2, 2)
    assert transcript[0].startswith("A: SUMS 0 0 ")
    assert transcript[1].startswith("B: SUMS 1 0 ")  # 102 records: split, not listed
    assert a.lines + b.lines <= 2 + 3 + 3  # root, children, <= 3 ITEMS, <= 3 NEED
    again: list[str] = []
    run(a, b, transcript=again)
    assert len(again) == 1  # equal roots: the round ends at once


def differences(draw: st.DrawFn) -> tuple[Store, Store, int]:
    n = draw(st.integers(0, 3000))
    only_a = draw(st.integers(0, 40))
    only_b = draw(st.integers(0, 40))
    changed = draw(st.integers(0, min(n, 40)))
    shared = [rec(f"c{i}", 1) for i in range(n)]
    a = Store(shared)
    b = Store(shared)
    for i in range(only_a):
        a.offer(rec(f"a{i}", 2))
    for i in range(only_b):
        b.offer(rec(f"b{i}", 2))
    for i in draw(st.lists(st.integers(0, max(0, n - 1)), max_size=changed, unique=True)):
        newer = rec(f"c{i}", 3, draw(st.sampled_from(["Bona", "Clark"])))
        (a if draw(st.booleans()) else b).offer(newer)
    return a, b, only_a + only_b + changed


@st.composite
def store_pairs(draw: st.DrawFn) -> tuple[Store, Store, int]:
    return differences(draw)


@settings(max_examples=40, deadline=None)
@given(store_pairs(), st.booleans())
def test_two_stores_converge_after_one_round_with_traffic_bounded_by_d_log_n(
    pair: tuple[Store, Store, int], both: bool
) -> None:
    one, two, d = pair
    n = max(len(one), len(two))
    a, b = Side(one), Side(two)
    run(a, b, both=both)
    assert same(one, two)
    rounds = 2 if both else 1
    # Each difference costs at most one record each way per round.
    assert a.records + b.records <= 2 * d * rounds
    # Sync lines: per difference, one path of SUMS from the root, an ITEMS and a NEED.
    depth = math.ceil(math.log(n + 2, 16)) + 1
    assert a.lines + b.lines <= rounds * (2 + (d + 1) * (depth + 3))


@pytest.mark.parametrize("n", [100_000, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_a_large_store_with_two_thousand_differences(n: int) -> None:
    """The catch-up of issue 11, in memory: traffic grows with d, not n."""
    d = 2000
    shared = [rec(f"client-{i}", 1) for i in range(n)]
    a = Store(shared)
    b = Store(shared)
    for i in range(d):
        a.offer(rec(f"client-{i * (n // d)}", 2))
    one, two = Side(a), Side(b)
    run(one, two, both=True)
    assert same(a, b)
    assert one.records <= 2 * d  # both rounds may send a record once each
    assert two.records <= 2 * d  # b's older versions, refused by a
    assert one.lines + two.lines < 20 * d


def test_an_empty_store_joining_gets_everything_once_even_with_two_rounds() -> None:
    full = Store(rec(f"c{i}", 1) for i in range(5000))
    a, b = Side(full), Side(Store())
    run(a, b, both=True)
    assert same(full, b.store)
    assert a.records == 5000  # not twice: the second request finds the leaves sent
    assert b.records == 0


def test_a_newer_record_on_either_side_wins() -> None:
    a = Side(Store([rec("x", 5), rec("y", 1)]))
    b = Side(Store([rec("x", 1), rec("y", 5)]))
    run(a, b)
    assert a.store.get(b"x") == b.store.get(b"x") == rec("x", 5)
    assert a.store.get(b"y") == b.store.get(b"y") == rec("y", 5)


def test_nodes_are_split_below_the_leaves_down_to_single_keys() -> None:
    # With at most one record listed per node, the recursion goes below the 65,536
    # leaves (nodes computed from a leaf's members) to single keys.
    records = [rec(f"c{i}", 1) for i in range(300)]
    a, b = Store(records), Store(records)
    a.offer(rec("c7", 2))
    b.offer(rec("new", 2))
    one, two = Side(a), Side(b)
    one.sync.list_max = two.sync.list_max = 0
    transcript: list[str] = []
    run(one, two, transcript=transcript)
    assert same(a, b)
    assert one.records + two.records == 3  # c7 both ways (one refused), and new
    assert any(line.startswith(("A: SUMS 6 ", "B: SUMS 6 ")) for line in transcript)


# --- what a peer can make a server do -------------------------------------------------------


def test_round_gate_answers_once_per_interval_then_drops_a_flood() -> None:
    gate = RoundGate(interval=2.5, allowance=3)
    verdicts = [gate.verdict(t) for t in (0.0, 0.1, 0.2, 0.3)]
    assert verdicts == ["answer", "ignore", "ignore", "ignore"]
    assert gate.verdict(0.4) == "drop"
    assert gate.verdict(2.6) == "answer"


def test_rounds_started_again_and_again_drop_the_link() -> None:
    side = Side(Store([rec("x", 1)]))
    start = parse_sync(format_sums(0, 0, [1]))
    side.sync.handle(start, 0.0)
    for _ in range(3):
        side.sync.handle(start, 1.0)  # ignored
    assert len(side.out) == 1
    with pytest.raises(PeerMisbehaved, match=r"started 4 sync rounds within 2\.5 s"):
        side.sync.handle(start, 1.0)


def test_asking_for_everything_again_and_again_costs_one_store() -> None:
    store = Store(rec(f"c{i}", 1) for i in range(3 * CHUNK))
    side = Side(store)
    everything = parse_sync(b"ITEMS 0 0")
    for _ in range(50):
        side.sync.handle(everything, 0.0)
    assert len(side.out) == 3 * CHUNK
    side.now = 1.0
    side.sync.handle(everything, 1.0)  # still within the interval
    assert len(side.out) == 3 * CHUNK
    side.now = 3.0
    side.sync.handle(everything, 3.0)  # a new interval: one more store
    assert len(side.out) == 6 * CHUNK


def test_replies_beyond_the_budget_are_ignored_until_the_next_interval() -> None:
    store = Store(rec(f"c{i}", 1) for i in range(100))
    side = Side(store)
    side.sync.budget.limit = 2000
    split = parse_sync(format_sums(1, 0, [1] * 16))  # every child differs: 16 replies
    side.sync.handle(split, 0.0)
    answered = len(side.out)
    assert answered >= 1
    side.sync.handle(split, 0.1)
    side.sync.handle(split, 0.2)
    assert len(side.out) == answered
    assert side.sync.counts.sync_ignored == 2
    assert len(side.log) == 1
    assert "reply budget (2000 bytes per 2.5 s) spent" in side.log[0]
    side.sync.handle(split, 2.6)
    assert len(side.out) == 2 * answered
    assert REPLY_BUDGET >= 16 << 20


def test_need_is_answered_with_held_records_only() -> None:
    side = Side(Store([rec("x", 1)]))
    side.sync.handle(Need((key_of(b"x"), key_of(b"absent"))), 0.0)
    assert list(side.out) == [rec("x", 1).at_line]
    assert side.sync.counts.sync_records_sent == 1


# --- streaming through the link writer -----------------------------------------------------


async def test_the_writer_pulls_each_chunk_only_after_writing_the_previous_one(
    nursery: trio.Nursery,
) -> None:
    ours, theirs = trio.testing.lockstep_stream_pair()  # a send waits for the reader
    writer = LinkWriter(ours, 10.0, lambda: None)
    pulled: list[int] = []

    def chunks() -> Iterator[bytes]:
        for number in range(5):
            pulled.append(number)
            yield b"AT chunk %d\n" % number

    timers = Timers(heartbeat=100.0, sync=1000.0, next_sync=math.inf)
    nursery.start_soon(writer.run, timers, lambda: b"SUMS 0 0 0000000000000000")
    writer.send_line(b"NEED 0000000000000001")
    writer.send_stream(chunks())
    reader = LineReader(theirs, 1000)
    heard: list[bytes | None] = []
    with trio.fail_after(5):
        for number in range(5):
            await trio.testing.wait_all_tasks_blocked()
            # Chunk `number` is being written (blocked on us); the next is not pulled.
            assert pulled == list(range(number + 1))
            heard.append(await reader.receive_line())
            if number == 0:
                heard.append(await reader.receive_line())
    assert heard == [b"NEED 0000000000000001", *(b"AT chunk %d" % n for n in range(5))]
