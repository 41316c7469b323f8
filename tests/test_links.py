"""Peer links: backoff, handshake, catch-up, flooding, heartbeats (PROTOCOL.md §4)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import msgspec
import pytest
import trio
import trio.testing

from herd_trio.auth import Hello
from herd_trio.backoff import Backoff
from herd_trio.client import answer_line
from herd_trio.config import HerdConfig
from herd_trio.lines import LineReader, LineTooLong
from herd_trio.links import (
    LINES_PER_CHECKPOINT,
    LINK_ERRORS,
    PEER_LINE_SLACK,
    LinkError,
    carry,
    dials,
    peer_max_line,
    run_link,
)
from herd_trio.node import Node
from herd_trio.peerport import PeerPort
from herd_trio.protocol import Record
from herd_trio.store import Store
from herd_trio.synclines import SYNC_PREFIXES
from tests.helpers import (
    TRIANGLE,
    Recording,
    herd_config,
    kept_by,
    make_node,
    peer_of,
    peer_port,
    record,
    security_of,
)

PEER_MAX = 8192  # what a peer may send with the default max_line: any sync line fits
EMPTY_ROUND = b"SUMS 0 0 " + b"0" * 16  # a sync round started by an empty store
EVERYTHING = b"ITEMS 0 0\n"  # "I hold nothing at all": send me every record


def herd(**settings: object) -> HerdConfig:
    return herd_config(TRIANGLE, **settings)


def make_server(name: str, log: Path | None = None, **settings: object) -> Node:
    return make_node(name, herd(**settings), log=log)


def link(node: Node, peer: str, **kwargs: Any) -> Callable[[], Awaitable[NoReturn]]:  # noqa: ANN401
    """run_link from `node` to `peer` of the test herd, with `node`'s herd settings."""
    herd_ = herd_config(TRIANGLE, **msgspec.structs.asdict(node.settings))
    return partial(run_link, node, peer_of(herd_, peer), security_of(herd_, node.name), **kwargs)


def door(node: Node) -> PeerPort:
    """The peer port of `node` in the test herd."""
    return peer_port(node, herd_config(TRIANGLE, **msgspec.structs.asdict(node.settings)))


async def settle() -> None:
    """Wait until every task is blocked; a flood that never stops fails instead of hanging."""
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked()


def hi(lo: float, hi: float) -> float:
    return hi


def lo(lo: float, hi: float) -> float:
    return lo


# --- Backoff and small helpers ------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(initial=1, cap=8, rand=hi)
    assert [backoff.delay(n) for n in range(7)] == [1, 2, 4, 8, 8, 8, 8]
    assert [Backoff(initial=1, cap=8, rand=lo).delay(n) for n in range(5)] == [0.5, 1, 2, 4, 4]


def test_default_backoff_reaches_one_second() -> None:
    backoff = Backoff(rand=hi)
    assert [backoff.delay(n) for n in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.delay(10**9) == 1.0  # no OverflowError after a long outage


def test_jitter_stays_in_the_upper_half() -> None:
    backoff = Backoff(initial=1, cap=8)
    for n in range(200):
        high = min(8, 2 ** (n % 6))
        assert high / 2 <= backoff.delay(n % 6) <= high


def test_the_name_that_sorts_first_dials() -> None:
    assert dials("Alpha", "Beta") is True
    assert dials("Beta", "Alpha") is False
    assert dials("Bona", "Bailey") is False


def hello(sender: bytes, receiver: bytes) -> bytes:
    """The unauthenticated handshake line (no secret configured)."""
    return Hello(sender, receiver).line()


def test_hello_line_is_exact() -> None:
    assert hello(b"Alpha", b"Beta") == b"HELLO herd_trio/1 Alpha Beta\n"


# --- carry: catch-up, flooding, failure ----------------------------------------------------


async def carry_collecting(
    server: Node,
    peer: str,
    stream: trio.abc.Stream,
    errors: list[BaseException],
    max_line: int = PEER_MAX,
) -> None:
    """carry() one end of a link; its link errors are collected, not raised."""
    try:
        await carry(server, peer, stream, LineReader(stream, max_line))
    except* LINK_ERRORS as group:
        errors.append(group)


def start_link(
    nursery: trio.Nursery, one: Node, two: Node, errors: list[BaseException]
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Run carry() on both ends of a memory stream; link errors are collected, not raised."""
    end_one, end_two = trio.testing.memory_stream_pair()
    nursery.start_soon(carry_collecting, one, two.name, end_one, errors)
    nursery.start_soon(carry_collecting, two, one.name, end_two, errors)
    return end_one, end_two


KIWI = b"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503"


async def test_records_held_before_link_up_reach_the_peer(nursery: trio.Nursery) -> None:
    alpha, beta = make_server("Alpha"), make_server("Beta")
    kiwi = record("Alpha", KIWI)
    apple = record("Beta", b"IAMAT apple +1+1 5")
    alpha.store.offer(kiwi)
    beta.store.offer(apple)
    errors: list[BaseException] = []
    start_link(nursery, alpha, beta, errors)
    await settle()
    assert beta.store.get(b"kiwi.cs.ucla.edu") == kiwi
    assert alpha.store.get(b"apple") == apple
    assert errors == []


async def test_records_accepted_after_link_up_reach_the_peer(nursery: trio.Nursery) -> None:
    alpha, beta = make_server("Alpha"), make_server("Beta")
    errors: list[BaseException] = []
    start_link(nursery, alpha, beta, errors)
    kept = {"Alpha": kept_by(alpha), "Beta": kept_by(beta)}
    await settle()
    reply, _ = answer_line(alpha, KIWI, 1_621_464_828_223_372_289)
    assert reply == (
        b"AT Alpha +0.263873786 kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503\n"
    )
    await settle()
    held = beta.store.get(b"kiwi.cs.ucla.edu")
    assert held is not None
    assert held.at_line + b"\n" == reply  # byte for byte, origin and skew kept
    assert (len(kept["Alpha"]), len(kept["Beta"])) == (1, 1)  # no echo back to Alpha
    assert errors == []


async def test_a_record_the_peer_holds_newer_is_not_taken(nursery: trio.Nursery) -> None:
    alpha, beta = make_server("Alpha"), make_server("Beta")
    older = record("Alpha", b"IAMAT kiwi +34-118 100")
    newer = record("Beta", b"IAMAT kiwi +1-1 200")
    alpha.store.offer(older)
    beta.store.offer(newer)
    kept = {"Alpha": kept_by(alpha), "Beta": kept_by(beta)}
    errors: list[BaseException] = []
    start_link(nursery, alpha, beta, errors)
    await settle()
    assert beta.store.get(b"kiwi") == newer
    assert alpha.store.get(b"kiwi") == newer  # and the newer one went the other way
    assert (kept["Alpha"], kept["Beta"]) == ([newer], [])
    assert errors == []


async def test_floods_go_on_through_a_cycle_and_stop(nursery: trio.Nursery) -> None:
    alpha, beta, gamma = make_server("Alpha"), make_server("Beta"), make_server("Gamma")
    errors: list[BaseException] = []
    start_link(nursery, alpha, beta, errors)
    start_link(nursery, beta, gamma, errors)
    start_link(nursery, gamma, alpha, errors)
    kept = {node.name: kept_by(node) for node in (alpha, beta, gamma)}
    await settle()
    line, _ = answer_line(alpha, b"IAMAT kiwi +34-118 5", 6_000_000_000)
    assert line == b"AT Alpha +1.000000000 kiwi +34-118 5\n"
    await settle()
    for server in (alpha, beta, gamma):
        held = server.store.get(b"kiwi")
        assert held is not None
        assert held.at_line + b"\n" == line
        assert len(kept[server.name]) == 1  # each kept and flooded it once
    assert errors == []


@pytest.mark.parametrize(
    ("max_line", "time"),
    [
        (4096, b"9" * 4083),  # the whole line is the default max_line, 4096 bytes
        (10_000, b"9" * 4200 + b"." + b"0" * 5786),  # under the 4300-digit int limit
    ],
    ids=["default-max-line", "max-line-10000"],
)
async def test_a_record_from_any_valid_client_line_crosses_a_link(
    nursery: trio.Nursery, max_line: int, time: bytes
) -> None:
    # The AT line repeats the client time's integer digits in the time difference, so
    # it can be almost twice as long as the IAMAT. If it does not fit the peer's line
    # limit, the peer drops the link, redials, gets it again in the next sync round and
    # drops the link again, forever.
    alpha = make_server("Alpha", max_line=max_line)
    beta = make_server("Beta", max_line=max_line)
    line = b"IAMAT k +0+0 " + time
    assert len(line) == max_line
    reply, kept = answer_line(alpha, line, 2_000_000_000)
    assert kept
    assert isinstance(reply, bytes)
    errors: list[BaseException] = []
    ends = trio.testing.memory_stream_pair()

    nursery.start_soon(
        carry_collecting, alpha, "Beta", ends[0], errors, peer_max_line(alpha.settings.max_line)
    )
    nursery.start_soon(
        carry_collecting, beta, "Alpha", ends[1], errors, peer_max_line(beta.settings.max_line)
    )
    await settle()
    assert errors == []
    assert beta.store.get(b"k") == alpha.store.get(b"k")


async def test_a_peer_sending_garbage_loses_its_link(tmp_path: Path) -> None:
    alpha = make_server("Alpha", log=tmp_path / "Alpha.log")
    kept = kept_by(alpha)
    ours, theirs = trio.testing.memory_stream_pair()
    good = record("Beta", b"IAMAT kiwi +34-118 5")
    await theirs.send_all(b"PING\n" + good.at_line + b"\r\ngarbage here\n" + good.at_line + b"\n")
    with pytest.RaisesGroup(pytest.RaisesExc(LinkError, match="bad line b'garbage here'")):
        await carry(alpha, "Beta", ours, LineReader(ours, PEER_MAX))
    assert alpha.store.get(b"kiwi") == good  # what came before the garbage was taken
    assert kept == [good]  # once: the line after the garbage was not read
    alpha.log.close()  # the lines taken before the garbage are logged, batch or not
    assert f"peer Beta < {good.at_line!r} kept" in (tmp_path / "Alpha.log").read_text()


async def test_a_peer_sending_an_over_long_line_loses_its_link() -> None:
    alpha = make_server("Alpha")
    ours, theirs = trio.testing.memory_stream_pair()
    limit = peer_max_line(alpha.settings.max_line)
    assert limit >= 4096 + PEER_LINE_SLACK
    await theirs.send_all(b"A" * (limit + 1))
    with pytest.RaisesGroup(LineTooLong):
        await carry(alpha, "Beta", ours, LineReader(ours, limit))


async def test_a_peer_closing_ends_the_link() -> None:
    alpha = make_server("Alpha")
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_eof()
    with pytest.RaisesGroup(pytest.RaisesExc(LinkError, match="Beta closed the link")):
        await carry(alpha, "Beta", ours, LineReader(ours, PEER_MAX))


async def test_three_silent_heartbeats_end_the_link(autojump_clock: trio.testing.MockClock) -> None:
    alpha = make_server("Alpha", heartbeat_interval=2.5)
    ours, _theirs = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with pytest.RaisesGroup(pytest.RaisesExc(LinkError, match="no word from Beta for 7.5 s")):
        await carry(alpha, "Beta", ours, LineReader(ours, PEER_MAX))
    assert trio.current_time() - start == 7.5


async def test_pings_keep_a_link_alive(autojump_clock: trio.testing.MockClock) -> None:
    alpha = make_server("Alpha", heartbeat_interval=2.0)
    ours, theirs = trio.testing.memory_stream_pair()
    start = trio.current_time()

    async def ping_for_a_while() -> None:
        for _ in range(10):  # every 5 s, less than 3 heartbeats (6 s): for 50 s
            await trio.sleep(5)
            await theirs.send_all(b"PING\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ping_for_a_while)
        with pytest.RaisesGroup(pytest.RaisesExc(LinkError, match="no word")):
            await carry(alpha, "Beta", ours, LineReader(ours, PEER_MAX))
    assert trio.current_time() - start == 56.0


async def test_an_idle_link_starts_a_sync_round_then_pings_every_heartbeat(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    alpha = make_server("Alpha", heartbeat_interval=2.0, sync_interval=5.0)
    ours, theirs = trio.testing.memory_stream_pair()
    start = trio.current_time()
    errors: list[BaseException] = []

    nursery.start_soon(carry_collecting, alpha, "Beta", ours, errors)
    reader = LineReader(theirs, PEER_MAX)
    heard: list[tuple[float, bytes | None]] = []
    with trio.fail_after(60):  # a writer that never pings fails instead of hanging
        for _ in range(6):
            line = await reader.receive_line()
            heard.append((trio.current_time() - start, line))
            if line == b"PING":
                await trio.sleep(0.25)  # the round trip Alpha measures
                await theirs.send_all(b"PONG\n")
    assert heard == [
        (0.0, EMPTY_ROUND),  # a sync round first on a new link
        (2.0, b"PING"),
        (4.0, b"PING"),
        (5.0, EMPTY_ROUND),  # and every sync_interval
        (7.0, b"PING"),
        (9.0, b"PING"),
    ]
    assert alpha.stats.peer("Beta").rtt == 0.25
    assert errors == []


async def test_a_ping_is_answered_with_one_pong(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    alpha = make_server("Alpha", heartbeat_interval=2.0, sync_interval=100.0)
    ours, theirs = trio.testing.memory_stream_pair()
    errors: list[BaseException] = []
    nursery.start_soon(carry_collecting, alpha, "Beta", ours, errors)
    reader = LineReader(theirs, PEER_MAX)
    assert await reader.receive_line() == EMPTY_ROUND
    await theirs.send_all(b"PING\n")
    assert await reader.receive_line() == b"PONG"
    # PINGs back to back while the writer is busy: at most one PONG waits, so a peer
    # never gets more heartbeat bytes back than it sends.
    await theirs.send_all(b"PING\n" * 50)
    with trio.fail_after(1.5):  # before Alpha's own PING is due
        assert await reader.receive_line() == b"PONG"
    heard: list[bytes | None] = []
    with trio.move_on_after(1.0):
        while True:
            heard.append(await reader.receive_line())
    assert heard.count(b"PONG") <= 1, heard
    assert alpha.stats.peer("Beta").rtt is None  # a PONG was never asked of Beta
    await theirs.send_all(b"PONG\n")  # unasked: ignored, not a round trip
    await trio.testing.wait_all_tasks_blocked()
    assert alpha.stats.peer("Beta").rtt is None
    assert errors == []


async def test_a_sync_round_from_the_peer_is_answered_with_what_differs(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    alpha = make_server("Alpha", heartbeat_interval=2.0, sync_interval=100.0)
    held = [record("Alpha", b"IAMAT c%d +34-118 5" % n) for n in range(3)]
    for one in held:
        alpha.store.offer(one)
    ours, theirs = trio.testing.memory_stream_pair()
    start = trio.current_time()
    errors: list[BaseException] = []

    nursery.start_soon(carry_collecting, alpha, "Beta", ours, errors)
    reader = LineReader(theirs, PEER_MAX)
    start_line = await reader.receive_line()
    assert start_line is not None
    assert start_line.startswith(b"SUMS 0 0 ")
    assert start_line != EMPTY_ROUND
    await theirs.send_all(EVERYTHING)  # 3 records: Alpha's root is listed; we hold none
    heard = [await reader.receive_line() for _ in range(3)]
    assert sorted(heard) == sorted(r.at_line for r in held)  # type: ignore[type-var]
    assert trio.current_time() - start == 0
    await theirs.send_all(start_line + b"\n")  # a round from a store holding the same: done
    with trio.fail_after(60):
        assert await reader.receive_line() == b"PING"
    assert trio.current_time() - start == 2.0
    assert errors == []


@pytest.mark.parametrize(
    "line",
    [
        b"SUMS 17 0 0000000000000000",  # below the 64-bit keys
        b"SUMS 1 0 " + b" ".join([b"0" * 16] * 17),  # more than one parent's children
        b"ITEMS 0 0 " + b" ".join([b"0" * 32] * 33),  # more than 32 records listed
        b"NEED 00",
        b"SUMS 0 0 0000000000000000 extra",
    ],
)
async def test_a_malformed_sync_line_drops_the_link(
    autojump_clock: trio.testing.MockClock, line: bytes
) -> None:
    alpha = make_server("Alpha", heartbeat_interval=2.0, sync_interval=100.0)
    alpha.store.offer(record("Alpha", b"IAMAT kiwi +34-118 5"))
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(line + b"\n")
    with pytest.RaisesGroup(pytest.RaisesExc(LinkError, match="Beta sent a bad line")):
        await carry(alpha, "Beta", ours, LineReader(ours, PEER_MAX))
    assert trio.current_time() == 0  # at once, not after a silence


# --- run_link: dial, handshake, backoff ----------------------------------------------------

Peer = Callable[[trio.abc.Stream], Awaitable[None]]


class Dialer:
    """A fake `dial`: refuses, or connects to a scripted peer running in `nursery`."""

    def __init__(self, nursery: trio.Nursery, peers: Iterator[Peer | None]) -> None:
        self.nursery = nursery
        self.peers = peers
        self.times: list[float] = []
        self.addresses: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        self.times.append(trio.current_time())
        self.addresses.append((host, port))
        peer = next(self.peers, None)
        if peer is None:
            raise ConnectionRefusedError(host, port)
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(peer, theirs)
        return ours


def refuse_forever() -> Iterator[Peer | None]:
    while True:
        yield None


async def test_redial_backs_off_then_caps(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    alpha = make_server("Alpha")
    dial = Dialer(nursery, refuse_forever())
    start = trio.current_time()
    with trio.move_on_after(40):
        await link(alpha, "Beta", dial=dial, backoff=Backoff(initial=1, cap=8, rand=hi))()
    assert [t - start for t in dial.times] == [0, 1, 3, 7, 15, 23, 31, 39]
    assert set(dial.addresses) == {("127.0.0.1", 12101)}  # the PEER port, not the client port


async def silent(stream: trio.abc.Stream) -> None:
    async with stream:
        await trio.sleep_forever()


async def test_a_peer_that_never_answers_the_handshake_times_out(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    alpha = make_server("Alpha")
    dial = Dialer(nursery, iter([silent] * 10))
    start = trio.current_time()
    with trio.move_on_after(14):
        await link(alpha, "Beta", dial=dial, backoff=Backoff(initial=1, cap=8, rand=hi))()
    # each handshake waits 2 s, then the backoff: 0 +2+1 = 3, +2+2 = 7, +2+4 = 13
    assert [t - start for t in dial.times] == [0, 3, 7, 13]


def answering(reply: bytes, heard: list[bytes | None], then: float = 0) -> Peer:
    async def peer(stream: trio.abc.Stream) -> None:
        async with stream:
            reader = LineReader(stream, PEER_MAX)
            heard.append(await reader.receive_line())
            await stream.send_all(reply)
            await trio.sleep(then)

    return peer


async def test_a_peer_with_the_wrong_name_is_dropped_and_redialled(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    alpha = make_server("Alpha")
    heard: list[bytes | None] = []
    wrong = answering(b"HELLO herd_trio/1 Gamma Alpha\n", heard)
    dial = Dialer(nursery, iter([wrong, wrong, wrong]))
    start = trio.current_time()
    with trio.move_on_after(10):
        await link(alpha, "Beta", dial=dial, backoff=Backoff(initial=1, cap=8, rand=hi))()
    assert heard == [b"HELLO herd_trio/1 Alpha Beta"] * 3
    assert [t - start for t in dial.times] == [0, 1, 3, 7]
    assert alpha.bus.links == []


@pytest.mark.parametrize(("up_for", "redials"), [(10, [18, 20, 24]), (2, [17, 25])])
async def test_failures_are_forgotten_only_after_stable_uptime(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    up_for: float,
    redials: list[float],
) -> None:
    alpha = make_server("Alpha", heartbeat_interval=100)
    heard: list[bytes | None] = []
    good = answering(b"HELLO herd_trio/1 Beta Alpha\n", heard, then=up_for)
    dial = Dialer(nursery, iter([None, None, None, good]))
    start = trio.current_time()
    with trio.move_on_after(26):
        await link(alpha, "Beta", dial=dial, backoff=Backoff(initial=1, cap=8, rand=hi))()
    # 0, 1, 3 fail; 7 links up for `up_for` s, then the peer hangs up. After 10 s up the
    # failures are forgotten: 17 + 1 = 18, + 2, + 4. After 2 s they are not: 9 + 8 = 17, + 8.
    assert [t - start for t in dial.times] == [0, 1, 3, 7, *redials]


async def test_run_link_hands_records_both_ways(nursery: trio.Nursery) -> None:
    alpha, beta = make_server("Alpha"), make_server("Beta")
    alpha.store.offer(first := record("Alpha", b"IAMAT kiwi +34-118 5"))
    beta.store.offer(theirs := record("Beta", b"IAMAT apple +1-1 5"))
    heard: list[bytes | None] = []
    errors: list[BaseException] = []

    async def beta_side(stream: trio.abc.Stream) -> None:
        async with stream:
            reader = LineReader(stream, PEER_MAX)
            heard.append(await reader.receive_line())
            await stream.send_all(hello(b"Beta", b"Alpha"))
            try:
                await carry(beta, "Alpha", stream, reader)
            except* LINK_ERRORS as group:
                errors.append(group)

    dial = Dialer(nursery, iter([beta_side]))
    nursery.start_soon(link(alpha, "Beta", dial=dial))
    await settle()
    assert heard == [b"HELLO herd_trio/1 Alpha Beta"]
    assert beta.store.get(b"kiwi") == first
    assert alpha.store.get(b"apple") == theirs
    answer_line(alpha, b"IAMAT kiwi +34-118 6", 6_000_000_000)
    await settle()
    held = beta.store.get(b"kiwi")
    assert held is not None
    assert held.at_line == b"AT Alpha +0.000000000 kiwi +34-118 6"
    assert errors == []


class BrokenStore(Store):
    def offer(self, record: Record, *, repeat: bool = False) -> Record:
        raise TypeError("bug in the store")

    def add_new(self, client: bytes, packed: bytes, line: bytes) -> None:
        raise TypeError("bug in the store")


async def test_a_bug_inside_a_link_ends_it_instead_of_being_retried(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    alpha = make_node("Alpha", herd(), store=BrokenStore())
    good = record("Beta", b"IAMAT kiwi +34-118 5")

    async def beta_side(stream: trio.abc.Stream) -> None:
        async with stream:
            reader = LineReader(stream, PEER_MAX)
            await reader.receive_line()
            await stream.send_all(hello(b"Beta", b"Alpha") + good.at_line + b"\n")
            await trio.sleep_forever()

    dial = Dialer(nursery, iter([beta_side, beta_side]))
    with pytest.RaisesGroup(pytest.RaisesExc(TypeError, match="bug in the store")):
        await link(alpha, "Beta", dial=dial, backoff=Backoff(initial=1, cap=8, rand=hi))()
    assert len(dial.times) == 1


# --- handle_peer: the accepting side -----------------------------------------------------


async def test_handle_peer_refuses_a_connection_that_is_not_loopback(tmp_path: Path) -> None:
    beta = make_server("Beta", log=tmp_path / "Beta.log")
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(hello(b"Alpha", b"Beta"))
    with trio.fail_after(1):
        await door(beta).handle(ours)
    await ours.aclose()
    assert await theirs.receive_some() == b""  # nothing was sent, not even a HELLO
    beta.log.close()
    assert "refused peer connection from StapledStream" in (tmp_path / "Beta.log").read_text()
    assert beta.bus.links == []


async def serve_peer_port(nursery: trio.Nursery, port: PeerPort) -> trio.SocketListener:
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, port.handle, 0, host="127.0.0.1")
    )
    return listeners[0]


async def lines_until_eof(reader: LineReader) -> list[bytes]:
    lines: list[bytes] = []
    while (line := await reader.receive_line()) is not None:
        if line != b"PING" and not line.startswith(SYNC_PREFIXES):
            lines.append(line)
    return lines


async def test_handle_peer_accepts_a_neighbour_on_loopback(nursery: trio.Nursery) -> None:
    beta = make_server("Beta")
    beta.store.offer(held := record("Beta", b"IAMAT apple +1-1 5"))
    arrived = trio.Event()
    beta.store.on_change(lambda client, line: arrived.set())
    listener = await serve_peer_port(nursery, door(beta))
    with trio.fail_after(5):
        async with await trio.testing.open_stream_to_socket_listener(listener) as stream:
            await stream.send_all(hello(b"Alpha", b"Beta"))
            reader = LineReader(stream, PEER_MAX)
            assert await reader.receive_line() == b"HELLO herd_trio/1 Beta Alpha"
            start_line = await reader.receive_line()
            assert start_line is not None
            assert start_line.startswith(b"SUMS 0 0 ")
            await stream.send_all(EVERYTHING)
            assert await reader.receive_line() == held.at_line
            kiwi = record("Alpha", b"IAMAT kiwi +34-118 5")
            await stream.send_all(kiwi.at_line + b"\n")
            await arrived.wait()
            assert beta.store.get(b"kiwi") == kiwi
            assert beta.bus.links == ["Alpha"]


@pytest.mark.parametrize(
    "greeting",
    [
        b"HELLO herd_trio/1 Delta Beta\n",  # not a neighbour
        b"HELLO herd_trio/1 Gamma Beta\n",  # a neighbour, but Beta dials Gamma, not back
        b"HELLO herd_trio/1 Alpha Gamma\n",  # addressed to another server
        b"HELLO herd_trio/0 Alpha Beta\n",
        b"AT Alpha +0.000000000 kiwi +34-118 5\n",
    ],
)
async def test_handle_peer_refuses_bad_handshakes(nursery: trio.Nursery, greeting: bytes) -> None:
    beta = make_server("Beta")
    beta.store.offer(record("Beta", b"IAMAT apple +1-1 5"))
    listener = await serve_peer_port(nursery, door(beta))
    with trio.fail_after(5):
        async with await trio.testing.open_stream_to_socket_listener(listener) as stream:
            await stream.send_all(greeting)
            assert await lines_until_eof(LineReader(stream, PEER_MAX)) == []
    assert beta.bus.links == []


async def test_a_reconnecting_neighbour_replaces_its_old_link(nursery: trio.Nursery) -> None:
    beta = make_server("Beta")
    port = door(beta)
    listener = await serve_peer_port(nursery, port)
    with trio.fail_after(5):
        async with await trio.testing.open_stream_to_socket_listener(listener) as old:
            await old.send_all(hello(b"Alpha", b"Beta"))
            old_reader = LineReader(old, PEER_MAX)
            assert await old_reader.receive_line() == b"HELLO herd_trio/1 Beta Alpha"
            async with await trio.testing.open_stream_to_socket_listener(listener) as new:
                await new.send_all(hello(b"Alpha", b"Beta"))
                new_reader = LineReader(new, PEER_MAX)
                assert await new_reader.receive_line() == b"HELLO herd_trio/1 Beta Alpha"
                assert await lines_until_eof(old_reader) == []  # the old one is closed
                answer_line(beta, b"IAMAT kiwi +34-118 5", 5_000_000_000)
                line = await new_reader.receive_line()
                while line == b"PING" or line.startswith(SYNC_PREFIXES):  # type: ignore[union-attr]
                    line = await new_reader.receive_line()
                assert line == b"AT Beta +0.000000000 kiwi +34-118 5"
                assert port.linked == {"Alpha"}


# --- links with a shared secret (any address may dial) ------------------------------------


def to_handle_peer(port: PeerPort) -> Peer:
    async def peer(stream: trio.abc.Stream) -> None:
        async with stream:  # as trio.serve_listeners does
            await port.handle(stream)

    return peer


async def test_a_link_with_a_shared_secret_carries_records(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERD_TEST_SECRET", "correct horse battery staple")
    alpha = make_server("Alpha", secret_env="HERD_TEST_SECRET")
    beta = make_server("Beta", secret_env="HERD_TEST_SECRET")
    beta.store.offer(theirs := record("Beta", b"IAMAT apple +1-1 5"))
    port = door(beta)
    dial = Dialer(nursery, iter([to_handle_peer(port)]))  # a memory stream: not loopback
    nursery.start_soon(link(alpha, "Beta", dial=dial))
    await settle()
    assert port.linked == {"Alpha"}
    assert alpha.store.get(b"apple") == theirs
    answer_line(alpha, b"IAMAT kiwi +34-118 6", 6_000_000_000)
    await settle()
    held = beta.store.get(b"kiwi")
    assert held is not None
    assert held.at_line == b"AT Alpha +0.000000000 kiwi +34-118 6"


async def test_a_peer_with_another_secret_never_links(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("HERD_TEST_SECRET_A", "correct horse battery staple")
    monkeypatch.setenv("HERD_TEST_SECRET_B", "incorrect horse battery staple")
    alpha = make_server("Alpha", secret_env="HERD_TEST_SECRET_A")
    beta = make_server("Beta", tmp_path / "Beta.log", secret_env="HERD_TEST_SECRET_B")
    beta.store.offer(record("Beta", b"IAMAT apple +1-1 5"))
    port = door(beta)
    dial = Dialer(nursery, iter([to_handle_peer(port)] * 10))
    start = trio.current_time()
    with trio.move_on_after(10):
        await link(alpha, "Beta", dial=dial, backoff=Backoff(initial=1, cap=8, rand=hi))()
    assert [t - start for t in dial.times] == [0, 1, 3, 7]
    assert alpha.store.get(b"apple") is None
    assert port.linked == frozenset()
    beta.log.close()
    assert "refused peer connection from StapledStream" in (tmp_path / "Beta.log").read_text()


async def test_a_record_from_a_peer_is_flooded_on_but_not_sent_back(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    alpha = make_server("Alpha", heartbeat_interval=1.0, sync_interval=100.0)
    ours, theirs = trio.testing.memory_stream_pair()
    errors: list[BaseException] = []

    gamma = Recording()
    with alpha.bus.subscribe("Gamma", gamma):
        nursery.start_soon(carry_collecting, alpha, "Beta", ours, errors)
        reader = LineReader(theirs, PEER_MAX)
        assert await reader.receive_line() == EMPTY_ROUND
        kiwi = record("Beta", b"IAMAT kiwi +34-118 5")
        await theirs.send_all(kiwi.at_line + b"\n")
        with trio.fail_after(60):
            heard = [await reader.receive_line() for _ in range(2)]
        await theirs.send_all(b"PING\n")
        assert heard == [b"PING", b"PING"]  # not our own AT line back
        assert alpha.store.get(b"kiwi") == kiwi
        assert gamma.records == [kiwi]  # flooded on to the other neighbours
    assert errors == []


async def relay_at_alpha(
    nursery: trio.Nursery, tmp_path: Path, batches: list[list[Record]]
) -> tuple[Node, list[Record], list[str]]:
    """Run Alpha's end of a link from Beta, with a neighbour Gamma subscribed, and send
    each batch of records in one write; after each batch, ask Alpha's store for its
    clients (which caches their Records). Alpha, what went on to Gamma, and the
    verdicts Alpha logged for Beta's lines."""
    alpha = make_server("Alpha", tmp_path / "Alpha.log", heartbeat_interval=1.0)
    ours, theirs = trio.testing.memory_stream_pair()
    errors: list[BaseException] = []
    gamma = Recording()
    with alpha.bus.subscribe("Gamma", gamma):
        nursery.start_soon(carry_collecting, alpha, "Beta", ours, errors)
        reader = LineReader(theirs, PEER_MAX)
        assert await reader.receive_line() == EMPTY_ROUND
        for batch in batches:
            await theirs.send_all(b"".join(r.at_line + b"\n" for r in batch))
            await settle()
            for r in batch:
                alpha.store.get(r.client)
    assert errors == []
    alpha.log.close()
    log = (tmp_path / "Alpha.log").read_text().splitlines()
    said = [line.rsplit(" ", 1)[1] for line in log if " peer Beta < b'AT " in line]
    return alpha, gamma.records, said


async def test_an_echo_of_a_stored_line_is_a_duplicate_and_goes_no_further(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    kiwi = record("Beta", b"IAMAT kiwi +34-118 5")
    older = record("Gamma", b"IAMAT kiwi +34-118 4")
    alpha, flooded, said = await relay_at_alpha(nursery, tmp_path, [[kiwi, kiwi, older, kiwi]])
    assert alpha.store.get(b"kiwi") == kiwi
    assert flooded == [kiwi]  # flooded on once
    counts = alpha.stats.peer("Beta")
    assert (counts.kept, counts.duplicate, counts.stale) == (1, 2, 1)
    assert said == ["kept", "duplicate", "stale", "duplicate"]


async def test_a_later_record_of_a_held_client_replaces_it_whatever_else_differs(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The relay settles an update by comparing client times (protocol.later), without
    # a Record: a later time replaces the held record (here one whose Record get()
    # had cached), an earlier one is stale, and an equal time goes to offer(), which
    # breaks the tie on origin (Zeta > Beta).
    kiwi = record("Beta", b"IAMAT kiwi +34-118 5")
    moved = record("Beta", b"IAMAT kiwi +35-118 5.000000001")
    earlier = record("Bona", b"IAMAT kiwi +1-1 5.0000000009")
    tie = record("Zeta", b"IAMAT kiwi +36-118 5.000000001000")
    alpha, flooded, said = await relay_at_alpha(nursery, tmp_path, [[kiwi], [moved, earlier, tie]])
    assert alpha.store.get(b"kiwi") == tie
    assert flooded == [kiwi, moved, tie]
    assert alpha.store.digest() == Store([tie]).digest()
    counts = alpha.stats.peer("Beta")
    assert (counts.kept, counts.duplicate, counts.stale) == (3, 0, 1)
    assert said == ["kept", "kept", "stale", "kept"]


class BatchWatch(trio.abc.Instrument):
    """After every task step, how many records of each batch `node`'s store holds
    (each batch's list of counts, as they changed)."""

    def __init__(self, node: Node, batches: list[list[bytes]]) -> None:
        self.node, self.batches = node, batches
        self.seen: list[list[int]] = [[0] for _ in batches]

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        for clients, seen in zip(self.batches, self.seen, strict=True):
            held = sum(self.node.store.get(client) is not None for client in clients)
            if held != seen[-1]:
                seen.append(held)


async def send_batches(batches: list[list[bytes]]) -> list[list[int]]:
    """Run a link of a new server Alpha and send it each batch of new clients' records,
    in one write, once the last one was taken: BatchWatch.seen."""
    alpha = make_server("Alpha", heartbeat_interval=100.0, sync_interval=100.0)
    ours, theirs = trio.testing.memory_stream_pair()
    errors: list[BaseException] = []
    watch = BatchWatch(alpha, batches)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(carry_collecting, alpha, "Beta", ours, errors)
        reader = LineReader(theirs, PEER_MAX)
        assert await reader.receive_line() == EMPTY_ROUND
        trio.lowlevel.add_instrument(watch)
        try:
            for number, clients in enumerate(batches):
                lines = [record("Beta", b"IAMAT %s +1+1 %d" % (c, number)) for c in clients]
                await theirs.send_all(b"".join(line.at_line + b"\n" for line in lines))
                await settle()  # the batch arrives alone, not merged with the next one
        finally:
            trio.lowlevel.remove_instrument(watch)
        nursery.cancel_scope.cancel()
    assert errors == []
    return watch.seen


async def test_a_short_batch_of_peer_lines_is_taken_in_one_step() -> None:
    # A WHATSAT answered between two lines of one batch would miss the second line's
    # record though it was read before the question (PROTOCOL.md §2). Batches of
    # three lines, more than twice LINES_PER_CHECKPOINT lines in all: a count of lines
    # across batches would fall inside a batch at least once.
    count = 2 * LINES_PER_CHECKPOINT // 3 + 8
    seen = await send_batches(
        [[b"c%d-%d" % (batch, k) for k in range(3)] for batch in range(count)]
    )
    assert seen == [[0, 3]] * count


async def test_a_long_batch_of_peer_lines_lets_others_run_between_parts() -> None:
    part = LINES_PER_CHECKPOINT
    seen = await send_batches([[b"c%d" % k for k in range(2 * part + 10)]])
    assert seen == [[0, part, 2 * part, 2 * part + 10]]  # LINES_PER_CHECKPOINT lines a step
