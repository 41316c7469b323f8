"""Server core: answers to client lines, WHATSAT, and client sessions (PROTOCOL.md §1-2)."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from decimal import Decimal
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from herd_trio.bus import HANDOFF_DEADLINE
from herd_trio.client import (
    Admission,
    Ticket,
    answer_line,
    handle_client,
    whatsat,
)
from herd_trio.lines import LineReader
from herd_trio.links import LINK_ERRORS, carry
from herd_trio.linkwriter import LinkWriter, Timers, direct_sender
from herd_trio.net import LINGER
from herd_trio.node import Node
from herd_trio.places import JSON, legacy_body
from herd_trio.protocol import Iamat, Record, Whatsat, make_record, parse_command
from herd_trio.store import Store
from tests.helpers import PAIR, Places, Recording, herd_config, make_node, record

KIWI = b"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503"
KIWI_AT = b"AT Clark +0.263873786 kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503"
RECEIVED = 1_621_464_828_223_372_289  # 1621464828.223372289 s


def place(n: int) -> JSON:
    return {"name": f"Place {n}", "place_id": f"id{n}", "geometry": {"location": {"lat": n}}}


@attrs.define
class Server:
    """Server Clark of a two-server herd as serve() would build it, without sockets."""

    node: Node
    places: Places
    bona: Recording  # what is published to the link to Bona
    subscription: AbstractContextManager[None]  # kept open (and referenced) for the test
    admission: Admission = attrs.field(factory=lambda: Admission(100))  # shared by sessions

    @property
    def store(self) -> Store:
        return self.node.store

    def answer(self, line: bytes, received_ns: int) -> bytes | Whatsat:
        return answer_line(self.node, line, received_ns)[0]

    async def whatsat(self, command: Whatsat) -> bytes:
        return await whatsat(self.node, self.places, command)

    async def handle(self, stream: trio.abc.Stream) -> None:
        await handle_client(self.node, self.places, self.admission, stream)


def make_server(
    places: Places | None = None,
    *,
    now_ns: int = RECEIVED,
    log: Path | None = None,
    **settings: object,
) -> Server:
    node = make_node("Clark", herd_config(PAIR, **settings), log=log, now_ns=now_ns)
    bona = Recording()
    subscription = node.bus.subscribe("Bona", bona)
    subscription.__enter__()
    source = places if places is not None else Places(legacy_body([], "ZERO_RESULTS"))
    return Server(node, source, bona, subscription)


def foreign(origin: bytes, line: bytes, received_ns: int) -> Record:
    return record(origin.decode(), line, received_ns)


# --- answer_line ---------------------------------------------------------------------------


def test_new_iamat_is_stored_and_published_before_the_reply() -> None:
    server = make_server()
    assert answer_line(server.node, KIWI, RECEIVED) == (KIWI_AT + b"\n", True)
    [flooded] = server.bona.records  # handed to the links already when the reply exists
    assert flooded.at_line == KIWI_AT
    assert server.store.get(b"kiwi.cs.ucla.edu") == flooded


def test_stale_or_repeated_iamat_gets_the_stored_line_and_is_not_flooded() -> None:
    server = make_server()
    assert server.answer(KIWI, RECEIVED) == KIWI_AT + b"\n"
    older = b"IAMAT kiwi.cs.ucla.edu +1+1 1621464827.959498502"
    assert answer_line(server.node, older, RECEIVED + 10**9) == (KIWI_AT + b"\n", False)
    repeat = answer_line(server.node, KIWI, RECEIVED + 5 * 10**9)  # a later time difference
    assert repeat == (KIWI_AT + b"\n", False)
    assert len(server.bona.records) == 1


def test_a_stale_iamat_echoes_the_line_of_the_server_that_took_the_newer_one() -> None:
    server = make_server()
    bona = foreign(b"Bona", b"IAMAT kiwi +1-1 1621464830.5", 1_621_464_831_000_000_000)
    server.store.offer(bona)
    reply = server.answer(b"IAMAT kiwi +34-118 1621464827", RECEIVED)
    assert reply == b"AT Bona +0.500000000 kiwi +1-1 1621464830.5\n"
    jaquez = foreign(b"Jaquez", b"IAMAT apple +1-1 7", 7_000_000_000)
    server.store.offer(jaquez)  # same time, same coords, but "Jaquez" > "Clark"
    assert server.answer(b"IAMAT apple +1-1 7", 9_000_000_000) == jaquez.at_line + b"\n"
    assert len(server.bona.records) == 0


def test_equal_time_from_a_lower_origin_is_replaced_by_this_server() -> None:
    server = make_server()
    server.store.offer(foreign(b"Bona", b"IAMAT apple +1-1 7", 7_000_000_000))
    reply = server.answer(b"IAMAT apple +1-1 7", 9_000_000_000)
    assert reply == b"AT Clark +2.000000000 apple +1-1 7\n"
    assert len(server.bona.records) == 1


def test_a_later_iamat_of_a_held_client_replaces_its_record_and_is_flooded() -> None:
    server = make_server()
    server.answer(KIWI, RECEIVED)
    assert server.store.get(b"kiwi.cs.ucla.edu") is not None  # its Record cached
    moved = b"IAMAT kiwi.cs.ucla.edu +1+1 1621464828.1"
    reply = b"AT Clark +0.123372289 kiwi.cs.ucla.edu +1+1 1621464828.1\n"
    assert answer_line(server.node, moved, RECEIVED) == (reply, True)
    assert [r.at_line + b"\n" for r in server.bona.records] == [KIWI_AT + b"\n", reply]
    assert server.store.get(b"kiwi.cs.ucla.edu") == server.bona.records[1]


UPDATE_TIMES = [b"6", b"7", b"7.0", b"7.10", b"7.1", b"7.01", b"07", b"8.999999999"]
UPDATE_TIMES += [b"8.9999999991", b"1" + b"0" * 19, b"1" + b"0" * 19 + b".5"]


@given(
    st.lists(
        st.tuples(st.sampled_from([b"a", b"b"]), st.sampled_from(UPDATE_TIMES), st.booleans()),
        max_size=30,
    )
)
def test_answers_to_updates_are_those_of_offer(updates: list[tuple[bytes, bytes, bool]]) -> None:
    # answer() settles a held client's IAMAT by comparing client times (protocol.later)
    # without a Record; its replies, the records it floods and the store it leaves are
    # those of the general path: make_record and offer(repeat=True). Some clients'
    # records come from a peer (Bona) first, at the same client time.
    server, reference, flooded = make_server(), Store(), []
    for n, (client, time, from_peer) in enumerate(updates):
        received = 10 * 10**9 + n
        if from_peer:
            peer = foreign(b"Bona", b"IAMAT %s +1-1 %s" % (client, time), received)
            server.store.offer(peer)
            reference.offer(peer)
        line = b"IAMAT %s +34-118 %s" % (client, time)
        command = parse_command(line)
        assert isinstance(command, Iamat)
        taken = make_record(b"Clark", received, command)
        standing = reference.offer(taken, repeat=True)
        flooded += [taken] if standing is taken else []
        assert server.answer(line, received) == standing.at_line + b"\n"
    assert server.bona.records == flooded
    assert server.store.snapshot() == reference.snapshot()
    assert server.store.digest() == reference.digest()


def test_whatsat_for_an_unknown_client_gets_a_question_mark() -> None:
    server = make_server()
    assert server.answer(b"WHATSAT nobody 10 5", RECEIVED) == b"? WHATSAT nobody 10 5\n"
    server.answer(KIWI, RECEIVED)
    assert server.answer(b"WHATSAT kiwi 10 5", RECEIVED) == b"? WHATSAT kiwi 10 5\n"


def test_whatsat_for_a_known_client_is_left_to_whatsat() -> None:
    server = make_server()
    server.answer(KIWI, RECEIVED)
    command = server.answer(b"WHATISAT\tkiwi.cs.ucla.edu 10 5 ", RECEIVED)
    assert command == Whatsat(b"kiwi.cs.ucla.edu", Decimal(10), 5)


@pytest.mark.parametrize(
    "line",
    [
        KIWI_AT,
        b"  iamat kiwi +34-118 1 \t",
        b"IAMAT kiwi +34-118",
        b"WHATSAT kiwi 51 5",
        b"HELLO herd_trio/1 Bona Clark",
        b"PING",
        b"\xff\xfe garbage \x1b[31m",
    ],
)
def test_anything_else_gets_the_line_back_after_a_question_mark(line: bytes) -> None:
    server = make_server()
    assert server.answer(line, RECEIVED) == b"? " + line + b"\n"
    assert len(server.store) == 0
    assert len(server.bona.records) == 0


def test_a_huge_but_valid_time_does_not_crash_the_server() -> None:
    # With max_line raised (config allows up to 1 MiB), a time of more than 4300 digits
    # fits in a line; answer_nowait raised ValueError (int() digit limit) instead of
    # replying, which ends the client handler with an unhandled exception. The time is
    # valid (PROTOCOL.md: any number of digits), so it is stored with its exact skew.
    server = make_server(max_line=1 << 20)
    line = b"IAMAT kiwi +34-118 " + b"1" * 5000
    reply = server.answer(line, RECEIVED)
    assert isinstance(reply, bytes)
    at, name, skew, *rest = reply.split()
    assert (at, name, rest) == (b"AT", b"Clark", [b"kiwi", b"+34-118", b"1" * 5000])
    assert skew.startswith(b"-" + b"1" * 4980)
    assert skew.endswith(b".776627711")
    bound = b"WHATSAT kiwi 10 " + b"1" * 5000
    assert server.answer(bound, RECEIVED) == b"? " + bound + b"\n"


# --- whatsat ------------------------------------------------------------------------------


async def test_bound_zero_makes_no_places_call() -> None:
    places = Places(legacy_body([place(1)], "OK"))
    server = make_server(places)
    server.answer(KIWI, RECEIVED)
    command = server.answer(b"WHATSAT kiwi.cs.ucla.edu 10 0", RECEIVED)
    assert isinstance(command, Whatsat)
    reply = await server.whatsat(command)
    assert places.calls == []
    assert reply == (
        KIWI_AT + b'\n{\n   "html_attributions": [],\n   "results": [],\n   "status": "OK"\n}\n\n'
    )


async def test_results_are_capped_at_bound_even_if_the_source_gives_more() -> None:
    body = legacy_body([place(n) for n in range(5)], "OK")
    body["next_page_token"] = "tok"
    places = Places(body)
    server = make_server(places)
    server.answer(KIWI, RECEIVED)
    command = server.answer(b"WHATSAT kiwi.cs.ucla.edu 12.5 3", RECEIVED)
    assert isinstance(command, Whatsat)
    reply = await server.whatsat(command)
    assert places.calls == [(Decimal("34.068930"), Decimal("-118.445127"), 12_500, 3)]
    first, rest = reply.split(b"\n", 1)
    assert first == KIWI_AT
    assert json.loads(rest) == {
        "html_attributions": [],
        "results": [place(0), place(1), place(2)],
        "status": "OK",
        "next_page_token": "tok",
    }


async def test_a_source_that_never_answers_gives_unknown_error_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = make_server(Places(None), places_timeout=2.5)
    server.answer(KIWI, RECEIVED)
    command = server.answer(b"WHATSAT kiwi.cs.ucla.edu 10 5", RECEIVED)
    assert isinstance(command, Whatsat)
    start = trio.current_time()
    reply = await server.whatsat(command)
    assert trio.current_time() - start == 2.5
    assert reply.startswith(KIWI_AT + b"\n{")
    assert reply.endswith(b"}\n\n")
    body = json.loads(reply.split(b"\n", 1)[1])
    assert body["status"] == "UNKNOWN_ERROR"
    assert body["results"] == []
    assert body["html_attributions"] == []
    assert isinstance(body["error_message"], str)


async def test_a_source_just_inside_the_deadline_is_used(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = make_server(Places(legacy_body([place(7)], "OK"), delay=2.4), places_timeout=2.5)
    server.answer(KIWI, RECEIVED)
    command = server.answer(b"WHATSAT kiwi.cs.ucla.edu 10 5", RECEIVED)
    assert isinstance(command, Whatsat)
    start = trio.current_time()
    reply = await server.whatsat(command)
    assert trio.current_time() - start == 2.4
    assert json.loads(reply.split(b"\n", 1)[1])["results"] == [place(7)]


async def test_the_json_is_rendered_with_single_lfs_and_ends_with_two() -> None:
    results: list[JSON] = [
        {"name": "Caf\u00e9 \u2615", "vicinity": "line\n\n\nbreaks", "types": []},
        {"name": "Two", "rating": 4.5, "opening_hours": {"open_now": True}},
    ]
    body = legacy_body(results, "OK")
    server = make_server(Places(body))
    server.store.offer(foreign(b"Bona", b"IAMAT kiwi +34-118 5", 5_000_000_000))
    command = server.answer(b"WHATSAT kiwi 1 2", RECEIVED)
    assert isinstance(command, Whatsat)
    reply = await server.whatsat(command)
    expected_json = json.dumps(body, indent=3, ensure_ascii=False).encode()
    assert reply == b"AT Bona +0.000000000 kiwi +34-118 5\n" + expected_json + b"\n\n"
    assert "Caf\u00e9 \u2615".encode() in reply  # UTF-8, not \u escapes
    assert reply.count(b"\n\n") == 1
    assert reply.endswith(b"}\n\n")


async def test_whatsat_repeats_the_stored_line_without_recomputing() -> None:
    server = make_server(Places(legacy_body([], "ZERO_RESULTS")), now_ns=99 * 10**18)
    held = foreign(b"Bona", b"IAMAT kiwi +34-118 5", 4_000_000_000)
    server.store.offer(held)
    command = server.answer(b"WHATSAT kiwi 1 2", 99 * 10**18)
    assert isinstance(command, Whatsat)
    reply = await server.whatsat(command)
    assert reply.startswith(b"AT Bona -1.000000000 kiwi +34-118 5\n{")
    assert json.loads(reply.split(b"\n", 1)[1])["status"] == "ZERO_RESULTS"


# --- handle_client ------------------------------------------------------------------------


class Recorder(trio.abc.SendStream):
    """Forwards to `stream` and records every send_all, to check one write per reply."""

    def __init__(
        self, stream: trio.abc.SendStream, events: list[tuple[str, bytes]] | None = None
    ) -> None:
        self.stream = stream
        self.writes: list[bytes] = []
        self.events = events if events is not None else []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.events.append((type(self).__name__, bytes(data)))
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


def ends(chunks: list[bytes]) -> list[int]:
    """The offsets where each chunk of a concatenation ends."""
    offsets, total = [], 0
    for chunk in chunks:
        total += len(chunk)
        offsets.append(total)
    return offsets


class Session:
    """handle_client on one end of a memory stream pair; the test is the client."""

    def __init__(
        self,
        nursery: trio.Nursery,
        server: Server,
        events: list[tuple[str, bytes]] | None = None,
    ) -> None:
        client, conn = trio.testing.memory_stream_pair()
        self.client = client
        self.recorder = Recorder(conn.send_stream, events)
        self.conn = trio.StapledStream(self.recorder, conn.receive_stream)
        self.done = trio.Event()
        nursery.start_soon(self._serve, server)

    async def _serve(self, server: Server) -> None:
        async with self.conn:  # as trio.serve_listeners does
            await server.handle(self.conn)
        self.done.set()

    async def read(self, size: int) -> bytes:
        data = b""
        with trio.fail_after(30):  # a missing reply fails the test instead of hanging it
            while len(data) < size and (chunk := await self.client.receive_some()):
                data += chunk
        return data

    async def read_to_eof(self) -> bytes:
        data = b""
        with trio.fail_after(30):
            while chunk := await self.client.receive_some():
                data += chunk
        return data


async def test_updates_that_arrive_together_are_published_together_before_the_replies(
    nursery: trio.Nursery,
) -> None:
    server = make_server()
    session = Session(nursery, server)
    lines = [b"IAMAT c%d +34-118 %d" % (n, 5 + n) for n in range(16)]
    lines[7] = b"IAMAT c0 +34-118 1"  # stale for c0 (earlier in this very batch): not flooded
    await session.client.send_all(b"".join(line + b"\n" for line in lines))
    replies = await session.read(1)
    while replies.count(b"\n") < 16:
        replies += await session.read(1)
    assert server.bona.deliveries == 1  # one publish for the batch, before the first reply
    assert [r.client for r in server.bona.records] == [b"c%d" % n for n in range(16) if n != 7]
    assert replies.split(b"\n")[7] == server.store.line(b"c0")  # the stale one: the stored line


async def test_a_session_answers_many_crlf_lines_in_order(nursery: trio.Nursery) -> None:
    server = make_server()
    session = Session(nursery, server)
    await session.client.send_all(
        KIWI + b"\r\nWHATSAT nobody 10 5\r\n\r\n  \t \r\nIAMAT apple +1+1 1621464828.223372289\r\n"
    )
    expected = (
        KIWI_AT + b"\n"
        + b"? WHATSAT nobody 10 5\n"
        + b"AT Clark +0.000000000 apple +1+1 1621464828.223372289\n"
    )  # fmt: skip
    assert await session.read(len(expected)) == expected
    await trio.testing.wait_all_tasks_blocked()
    assert not session.done.is_set()  # persistent: still open for more
    await session.client.send_all(b"IAMAT kiwi.cs.ucla.edu +34-118 1\r\nfoo bar\r\n")
    expected = KIWI_AT + b"\n? foo bar\n"  # the stale IAMAT gets the stored line
    assert await session.read(len(expected)) == expected
    await session.client.send_eof()
    assert await session.read_to_eof() == b""
    await session.done.wait()  # the handler returned by itself


async def test_every_line_answered_is_timed_once_in_the_request_histogram(
    nursery: trio.Nursery,
) -> None:
    server = make_server(Places(legacy_body([place(1)], "OK")))
    session = Session(nursery, server)
    batch = [KIWI, b"", b"IAMAT a +1+1 1", b"WHATSAT kiwi.cs.ucla.edu 10 1", b"bad", b"IAMAT b 1 2"]
    await session.client.send_all(b"".join(line + b"\n" for line in batch))
    await session.client.send_eof()
    await session.read_to_eof()
    await session.done.wait()
    requests = server.node.stats.requests
    assert requests.count == 5  # the blank line is not answered
    assert sum(requests.counts) == 5
    assert requests.total > 0


async def test_whatsat_reply_is_one_write_and_earlier_replies_do_not_wait(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = make_server(Places(legacy_body([place(1)], "OK"), delay=3))
    session = Session(nursery, server)
    start = trio.current_time()
    await session.client.send_all(
        KIWI + b"\nWHATSAT kiwi.cs.ucla.edu 10 1\nIAMAT apple +1+1 1621464828.223372289\n"
    )
    first = KIWI_AT + b"\n"
    assert await session.read(len(first)) == first
    assert trio.current_time() - start == 0
    await session.client.send_eof()
    rest = await session.read_to_eof()
    assert trio.current_time() - start == 3
    whatsat = KIWI_AT + b"\n" + json.dumps(legacy_body([place(1)], "OK"), indent=3).encode()
    assert rest == whatsat + b"\n\nAT Clark +0.000000000 apple +1+1 1621464828.223372289\n"
    # each reply is inside one write: writes end only where replies end
    replies = [first, whatsat + b"\n\n", b"AT Clark +0.000000000 apple +1+1 1621464828.223372289\n"]
    assert b"".join(session.recorder.writes) == b"".join(replies)
    assert set(ends(session.recorder.writes)) <= set(ends(replies))


async def test_a_slow_places_source_does_not_block_other_clients(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = make_server(Places(None), places_timeout=5)
    server.answer(KIWI, RECEIVED)
    slow, fast = Session(nursery, server), Session(nursery, server)
    start = trio.current_time()
    await slow.client.send_all(b"WHATSAT kiwi.cs.ucla.edu 10 5\n")
    await trio.testing.wait_all_tasks_blocked()
    await fast.client.send_all(b"IAMAT apple +1+1 1\n")
    reply = await fast.read(len(b"AT Clark +1621464827.223372289 apple +1+1 1\n"))
    assert reply == b"AT Clark +1621464827.223372289 apple +1+1 1\n"
    assert trio.current_time() - start == 0
    await slow.client.send_eof()
    assert b'"status": "UNKNOWN_ERROR"' in await slow.read_to_eof()
    assert trio.current_time() - start == 5


async def test_one_shot_closes_after_the_first_reply(nursery: trio.Nursery) -> None:
    server = make_server(one_shot=True)
    session = Session(nursery, server)
    await session.client.send_all(b"\r\n \t\r\n" + KIWI + b"\r\nIAMAT apple +1+1 1\r\n")
    assert await session.read_to_eof() == KIWI_AT + b"\n"  # closed without our EOF
    assert server.store.get(b"apple") is None
    await session.client.send_eof()  # the server lingers until the client is done too
    await session.done.wait()  # the handler returned by itself


async def test_one_shot_stays_open_across_blank_lines(nursery: trio.Nursery) -> None:
    server = make_server(one_shot=True)
    session = Session(nursery, server)
    await session.client.send_all(b"\n\r\n   \n")
    await trio.testing.wait_all_tasks_blocked()
    assert not session.done.is_set()
    await session.client.send_all(b"bogus\n")
    assert await session.read_to_eof() == b"? bogus\n"


async def test_one_shot_question_mark_reply_also_closes(nursery: trio.Nursery) -> None:
    server = make_server(one_shot=True)
    session = Session(nursery, server)
    await session.client.send_all(b"WHATSAT nobody 10 5\nIAMAT apple +1+1 1\n")
    assert await session.read_to_eof() == b"? WHATSAT nobody 10 5\n"


async def test_a_long_line_closes_the_connection_after_earlier_replies(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = make_server(max_line=80, log=tmp_path / "Clark.log")
    session = Session(nursery, server)
    await session.client.send_all(KIWI + b"\r\nnonsense\n" + b"x" * 81)  # no LF ever
    assert await session.read_to_eof() == KIWI_AT + b"\n? nonsense\n"
    await session.client.send_eof()
    await session.done.wait()  # the handler returned by itself
    server.node.log.close()
    assert "longer than 80 bytes" in (tmp_path / "Clark.log").read_text()


async def test_a_long_line_is_refused_as_soon_as_it_is_too_long(nursery: trio.Nursery) -> None:
    server = make_server(max_line=64)
    session = Session(nursery, server)
    await session.client.send_all(b"IAMAT apple +1+1 1\n")
    reply = b"AT Clark +1621464827.223372289 apple +1+1 1\n"
    assert await session.read(len(reply)) == reply
    await session.client.send_all(b"y" * 63 + b"\r")  # 64 bytes: may still end in LF
    await trio.testing.wait_all_tasks_blocked()
    assert not session.done.is_set()
    await session.client.send_all(b"y")
    assert await session.read_to_eof() == b""  # nothing for the long line, then closed
    await session.client.send_eof()
    await session.done.wait()  # the handler returned by itself


async def test_half_close_answers_everything_then_closes(nursery: trio.Nursery) -> None:
    server = make_server()
    session = Session(nursery, server)
    await session.client.send_all(KIWI + b"\nWHATSAT kiwi.cs.ucla.edu 10 0\n\nAT x")
    await session.client.send_eof()
    assert await session.read_to_eof() == (
        KIWI_AT + b"\n"
        + KIWI_AT
        + b'\n{\n   "html_attributions": [],\n   "results": [],\n   "status": "OK"\n}\n\n'
        + b"? AT x\n"
    )  # fmt: skip
    await session.done.wait()  # the handler returned by itself


async def test_lines_arriving_byte_by_byte_are_answered(nursery: trio.Nursery) -> None:
    server = make_server()
    session = Session(nursery, server)
    for byte in KIWI + b"\r\n":
        await session.client.send_all(bytes([byte]))
        await trio.testing.wait_all_tasks_blocked()
    await session.client.send_eof()
    assert await session.read_to_eof() == KIWI_AT + b"\n"
    assert session.recorder.writes == [KIWI_AT + b"\n"]


class PeerRecorder(Recorder):
    """The same, for the stream of a peer link."""


async def test_an_update_is_written_to_the_links_before_the_reply(nursery: trio.Nursery) -> None:
    server = make_server()
    events: list[tuple[str, bytes]] = []
    ours, _theirs = trio.testing.memory_stream_pair()
    link = trio.StapledStream(PeerRecorder(ours.send_stream, events), ours.receive_stream)

    errors: list[BaseException] = []

    async def run_link() -> None:
        try:
            await carry(server.node, "Bona", link, LineReader(link, 8192))
        except* LINK_ERRORS as group:
            errors.append(group)

    nursery.start_soon(run_link)
    await trio.testing.wait_all_tasks_blocked()
    events.clear()  # the link-up sync round
    session = Session(nursery, server, events)
    await session.client.send_all(KIWI + b"\r\n")
    assert await session.read(len(KIWI_AT) + 1) == KIWI_AT + b"\n"
    assert events == [("PeerRecorder", KIWI_AT + b"\n"), ("Recorder", KIWI_AT + b"\n")]
    await session.client.send_all(b"IAMAT kiwi.cs.ucla.edu +1+1 1\n")  # stale: no flood
    assert await session.read(len(KIWI_AT) + 1) == KIWI_AT + b"\n"
    assert events[2:] == [("Recorder", KIWI_AT + b"\n")]
    assert errors == []


class Stalled(Recording):
    """A link whose writer is ready but never writes: nothing it is given is handed off."""

    def handoff_mark(self) -> int | None:
        return 1

    def handed_off(self, mark: int) -> bool:
        return False


async def test_a_reply_waits_for_a_writer_that_never_writes_only_until_the_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = make_server()
    with server.node.bus.subscribe("Bailey", bailey := Stalled()):
        session = Session(nursery, server)
        began = trio.current_time()
        await session.client.send_all(KIWI + b"\n")
        assert await session.read(len(KIWI_AT) + 1) == KIWI_AT + b"\n"
        assert trio.current_time() - began >= HANDOFF_DEADLINE
        assert [r.at_line for r in bailey.records] == [KIWI_AT]


async def test_with_the_handoff_clock_a_stalled_writer_delays_a_reply_by_at_most_the_deadline(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = make_server()
    nursery.start_soon(server.node.bus.run_handoff_clock)
    with server.node.bus.subscribe("Bailey", Stalled()):
        session = Session(nursery, server)
        for n in range(3):  # each reply waits on its own, the clock ticking on
            began = trio.current_time()
            await session.client.send_all(b"IAMAT kiwi%d +1+1 1\n" % n)
            reply = await session.client.receive_some()  # one write: the whole reply
            assert reply.startswith(b"AT Clark ")
            assert reply.endswith(b" kiwi%d +1+1 1\n" % n)
            waited = trio.current_time() - began
            assert HANDOFF_DEADLINE / 2 - 1e-9 <= waited <= HANDOFF_DEADLINE + 1e-9


async def test_under_load_every_reply_follows_its_records_onto_the_link(
    nursery: trio.Nursery,
) -> None:
    # Twenty clients' batches answered in one scheduling batch: the first push writes at
    # once, the coalescer writes the others' records after the batch, and no reply is
    # written before its own records went into the link's socket (PROTOCOL.md §2).
    server = make_server()
    nursery.start_soon(server.node.bus.run_coalescer)
    events: list[tuple[str, bytes]] = []  # every write to the link and to the clients

    def recorded(stream: trio.abc.SendStream) -> Callable[[bytes], int] | None:
        send = direct_sender(stream)  # the link's real non-blocking send
        assert send is not None

        def write(data: bytes) -> int:
            events.append(("link", data))
            return send(data)

        return write

    ours, theirs = trio.socket.socketpair()
    link_end = trio.SocketStream(ours)
    writer = LinkWriter(link_end, 10.0, server.node.bus.progress, sender=recorded)

    async def link() -> None:
        async with link_end:
            with theirs, server.node.bus.subscribe("Jaquez", writer):  # theirs is never read
                await writer.run(Timers(math.inf, math.inf, math.inf), lambda: b"")

    async def serve(conn: socket.socket) -> None:
        conn_end = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        async with conn_end:  # as trio.serve_listeners does
            await server.handle(trio.StapledStream(Recorder(conn_end, events), conn_end))

    nursery.start_soon(link)
    clients = []
    for _ in range(20):
        client, conn = socket.socketpair()
        nursery.start_soon(serve, conn)
        clients.append((client, trio.socket.from_stdlib_socket(client)))
    await trio.testing.wait_all_tasks_blocked()
    # All sent before any session runs (a hundred bytes each: the socket takes them at once).
    for n, (client, _) in enumerate(clients):
        client.sendall(b"".join(b"IAMAT c%d-%d +1+1 %d\n" % (n, k, k + 1) for k in range(4)))
    for _, reader in clients:
        with trio.fail_after(30):
            replies = b""
            while replies.count(b"\n") < 4:
                replies += await reader.recv(1 << 16)
        reader.close()
    flooded = b""
    writes_to_link = 0
    for who, data in events:
        if who == "link":
            flooded += data
            writes_to_link += 1
        else:  # a client's replies: each one's record went to the link before it
            for reply in data.splitlines(keepends=True):
                assert reply in flooded, reply
    assert flooded.count(b"\n") == writer.records_sent == 80
    assert writes_to_link < 20  # coalesced: fewer writes than clients' batches


# --- hostile clients -------------------------------------------------------------------


def admit(admission: Admission, who: str, now: float) -> Ticket:
    ticket, note = admission.admit(who, "127.0.0.1", now)
    assert ticket is not None, note
    return ticket


def test_a_newcomer_at_max_clients_evicts_the_connection_idle_longest() -> None:
    admission = Admission(3, grace=5)
    a, b, c = (admit(admission, who, now) for who, now in (("a", 0), ("b", 1), ("c", 2)))
    a.active_at = 10  # a sent a line at t=10; b and c never did
    d, note = admission.admit("d", "127.0.0.1", 20)
    assert d is not None
    assert note == "admitted by closing b (no complete line for 19.0 s) at 3 clients"
    assert b.evicted
    assert b.scope.cancel_called
    assert admit(admission, "e", 20) is not None
    assert c.evicted
    assert admit(admission, "f", 20) is not None
    assert a.evicted  # idle 10 s > grace, and older than d and e
    assert not d.evicted
    assert not c.gone  # evicted, but its session has not ended yet
    assert admission.open == 3


def test_when_every_connection_was_active_within_the_grace_the_newcomer_is_refused() -> None:
    admission = Admission(2, grace=5)
    a, b = admit(admission, "a", 0), admit(admission, "b", 0)
    a.active_at = b.active_at = 4
    assert admission.admit("c", "127.0.0.1", 9) == (
        None,
        "2 clients already connected, each active within 5 s",
    )
    b.answering = True  # busy answering (a slow WHATSAT): active, whatever its last line
    ticket = admit(admission, "c", 9.5)
    assert a.evicted
    assert not b.evicted
    admission.leave(a)  # the evicted session ends: it is no longer counted twice
    admission.leave(ticket)
    assert admission.open == 1


def test_the_per_address_cap_refuses_before_anyone_is_evicted() -> None:
    admission = Admission(1, per_address=1, grace=0)
    old = admit(admission, "a", 0)
    assert admission.admit("b", "127.0.0.1", 100) == (None, "1 connections from 127.0.0.1 already")
    assert not old.evicted


def test_the_victim_heap_stays_small_under_churn() -> None:
    admission = Admission(10, grace=0)
    for now in range(10_001):
        ticket = admit(admission, f"c{now}", now)
        if now % 2:
            admission.leave(ticket)  # closed by its client; the others are evicted
    assert admission.open == 10
    assert len(admission._heap) <= 2 * admission.open + 64


async def test_an_idle_session_is_closed_to_admit_a_newcomer(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = make_server()
    server.admission = Admission(2, grace=5)
    idle, busy = Session(nursery, server), Session(nursery, server)
    await trio.sleep(10)
    await busy.client.send_all(b"IAMAT apple +1+1 1\n")
    await busy.read(len(b"AT Clark +1621464827.223372289 apple +1+1 1\n"))
    newcomer = Session(nursery, server)
    assert await idle.read_to_eof() == b""  # evicted: a FIN, not silence
    await idle.client.send_eof()
    await idle.done.wait()
    await newcomer.client.send_all(b"x\n")
    assert await newcomer.read(4) == b"? x\n"
    await busy.client.send_all(b"y\n")
    assert await busy.read(4) == b"? y\n"
    assert trio.current_time() == 10


async def test_a_newcomer_is_refused_while_every_session_is_active(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = make_server()
    server.admission = Admission(1, grace=5)
    held = Session(nursery, server)
    await trio.sleep(4)
    refused = Session(nursery, server)
    assert await refused.read_to_eof() == b""
    await refused.done.wait()
    await held.client.send_all(b"x\n")
    assert await held.read(4) == b"? x\n"


async def test_a_slowloris_line_is_closed_after_line_timeout_and_earlier_replies_arrive(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = make_server(line_timeout=3)
    session = Session(nursery, server)
    await session.client.send_all(KIWI + b"\nIAMAT")
    start = trio.current_time()

    async def trickle() -> None:
        for byte in b" kiwi +1+1 1":
            await trio.sleep(1)
            await session.client.send_all(bytes([byte]))

    nursery.start_soon(trickle)
    assert await session.read_to_eof() == KIWI_AT + b"\n"
    assert trio.current_time() - start == 3


async def test_client_idle_timeout_closes_a_silent_session_and_is_off_by_default(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    patient = Session(nursery, make_server())
    strict = Session(nursery, make_server(client_idle_timeout=20))
    await trio.sleep(10)
    await strict.client.send_all(b"x\n")
    assert await strict.read(4) == b"? x\n"
    assert await strict.read_to_eof() == b""
    assert trio.current_time() == 30  # 20 s after its last line
    await trio.sleep(86_400)
    assert not patient.done.is_set()  # a telnet session left open for a day stays


async def test_the_lingering_close_waits_for_the_client_at_most_linger_seconds(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = make_server(one_shot=True)
    session = Session(nursery, server)
    await session.client.send_all(b"x\n")
    assert await session.read_to_eof() == b"? x\n"
    start = trio.current_time()
    await session.client.send_all(b"more input the server discards\n" * 100)
    await session.done.wait()  # never sends its EOF: the server closes after LINGER
    assert trio.current_time() - start == LINGER
