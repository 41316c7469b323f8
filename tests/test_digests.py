"""Answering a peer's DIGEST: one answer per interval, in chunks, within a budget (issue 12)."""

from __future__ import annotations

import itertools
from decimal import Decimal
from pathlib import Path

import pytest
import trio
import trio.testing

from herd_trio.digests import CHUNK, DigestGate, PeerMisbehaved, answer_digest
from herd_trio.lines import LineReader
from herd_trio.links import carry
from herd_trio.protocol import Record, too_far_ahead
from herd_trio.store import BUCKETS, Store
from tests.helpers import herd_config, make_node, record

EMPTY = [0] * BUCKETS
ZERO_DIGEST = b"DIGEST " + b"0" * 16 * BUCKETS + b"\n"
PEER_MAX = 8192


def filled(count: int) -> Store:
    return Store(record("Alpha", b"IAMAT c%05d +1+1 5" % n) for n in range(count))


def test_the_gate_answers_once_per_interval_then_drops_a_peer_that_keeps_asking() -> None:
    gate = DigestGate(interval=2.5, allowance=3)
    assert gate.verdict(0.0) == "answer"
    assert [gate.verdict(t) for t in (0.1, 0.2, 2.4)] == ["ignore"] * 3
    assert gate.verdict(2.5) == "answer"  # a new interval forgives the early ones
    assert [gate.verdict(t) for t in (2.6, 2.7, 2.8)] == ["ignore"] * 3
    assert gate.verdict(2.9) == "drop"


def test_an_honest_peer_is_answered_every_time() -> None:
    gate = DigestGate(interval=2.5)  # sync_interval 5: digests at least 5 s apart
    assert {gate.verdict(5.0 * n) for n in range(100)} == {"answer"}


async def test_an_answer_takes_a_checkpoint_every_chunk(nursery: trio.Nursery) -> None:
    store = filled(5 * CHUNK)
    queued: list[Record] = []
    ticks: list[int] = []

    async def ticker() -> None:  # runs only when the answer yields
        while True:
            ticks.append(len(queued))
            await trio.lowlevel.checkpoint()

    nursery.start_soon(ticker)
    answer = await answer_digest(store, EMPTY, queued.append)
    assert (answer.records, answer.complete) == (5 * CHUNK, True)
    assert sorted(queued, key=lambda r: r.client) == store.snapshot()
    # Other tasks ran while it was being prepared. trio runs each runnable task once per
    # batch, in random order, so the answer may take two turns between two of the ticker's.
    steps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(steps) <= 2 * CHUNK
    assert len({tick for tick in ticks if 0 < tick < 5 * CHUNK}) >= 2


async def test_a_budget_cuts_an_answer_and_the_next_one_resumes() -> None:
    store = filled(100)
    line = len(store.snapshot()[0].at_line) + 1
    first: list[Record] = []
    answer = await answer_digest(store, EMPTY, first.append, budget=30 * line)
    assert (answer.records, answer.size, answer.complete) == (30, 30 * line, False)
    rest: list[Record] = []
    while len(first) + len(rest) < 100:
        answer = await answer_digest(
            store, EMPTY, rest.append, start=answer.resume, budget=30 * line
        )
    queued = first + rest
    assert len(queued) == 120  # four answers of 30, the last one wrapping round
    assert {r.client for r in queued[:100]} == {r.client for r in store.snapshot()}
    assert queued[100:] == queued[:20]


async def test_matching_digests_queue_nothing() -> None:
    store = filled(10)
    queued: list[Record] = []
    answer = await answer_digest(store, store.digest(), queued.append)
    assert (answer.records, queued) == (0, [])


async def test_a_digest_flood_gets_one_answer_and_loses_the_link(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    alpha = make_node("Alpha", herd_config(sync_interval=5.0), log=tmp_path / "Alpha.log")
    for n in range(50):
        alpha.store.offer(record("Alpha", b"IAMAT c%02d +1+1 5" % n))
    ours, theirs = trio.testing.memory_stream_pair()
    received = bytearray()

    async def peer() -> None:
        await theirs.send_all(ZERO_DIGEST * 10)
        while chunk := await theirs.receive_some():
            received.extend(chunk)

    start = trio.current_time()
    nursery.start_soon(peer)
    try:
        with pytest.RaisesGroup(pytest.RaisesExc(PeerMisbehaved, match="4 DIGESTs within 2.5 s")):
            await carry(alpha, "Beta", ours, LineReader(ours, PEER_MAX))
    finally:
        alpha.log.close()
    assert trio.current_time() == start  # no waiting: the fifth one ended it
    assert (tmp_path / "Alpha.log").read_text().count("sync with Beta: sending 50 records") == 1


async def test_digests_an_interval_apart_are_each_answered(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    alpha = make_node("Alpha", herd_config(sync_interval=5.0, heartbeat_interval=1.0))
    alpha.store.offer(held := record("Alpha", b"IAMAT kiwi +1+1 5"))
    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(carry, alpha, "Beta", ours, LineReader(ours, PEER_MAX))
    reader = LineReader(theirs, PEER_MAX)
    answers = 0
    for _ in range(4):
        await theirs.send_all(ZERO_DIGEST)
        with trio.fail_after(10):
            while await reader.receive_line() != held.at_line:
                await theirs.send_all(b"PING\n")
        answers += 1
        await trio.sleep(2.5)
    assert answers == 4


@pytest.mark.parametrize(
    ("sent", "skew", "ahead"),
    [
        (Decimal("1060.000000001"), 60.0, True),
        (Decimal("1060"), 60.0, False),  # exactly the limit is allowed
        (Decimal("32503680000"), 60.0, True),  # the year 3000
        (Decimal("9" * 4000), 60.0, True),
        (Decimal("32503680000"), None, False),  # the guard is off by default
        (Decimal("0.5"), 0.1, False),  # the past is never too far ahead
    ],
)
def test_too_far_ahead(sent: Decimal, skew: float | None, ahead: bool) -> None:
    assert too_far_ahead(sent, 1000 * 10**9, skew) is ahead
