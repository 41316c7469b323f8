"""ServerLog: one escaped, timestamped physical line per event (PROTOCOL.md §5)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from herd_trio.client import Admission, handle_client
from herd_trio.log import (
    DUPLICATE,
    FLUSH_INTERVAL,
    KEPT,
    RECEIVED,
    SENT,
    STALE,
    VERDICT_TAILS,
    RateLimiter,
    ServerLog,
    plural,
    utc_offset,
)
from tests.helpers import NoPlaces, herd_config, make_node

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"  # ISO 8601 with UTC offset


def test_each_entry_is_one_physical_line_with_the_bytes_escaped(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "Clark.log"
    log = ServerLog(path, "Clark")  # creates the folder
    hostile = b"IAMAT x\n2026-01-01T00:00:00.000 Clark forged entry\r\x1b[31mred\x00\xff"
    log.events([log.received_text("127.0.0.1:5000", hostile)])
    log.sent("127.0.0.1:5000", b"? " + hostile + b"\n")
    log.write("link to Bona up")
    log.close()
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[-1] == ""
    assert len(lines) == 4  # three entries, three LFs: no forged line
    assert "\x1b" not in text
    assert "\r" not in text
    assert "\x00" not in text
    assert re.fullmatch(STAMP + " Clark 127.0.0.1:5000 < " + re.escape(repr(hostile)), lines[0])
    assert re.fullmatch(
        STAMP + " Clark 127.0.0.1:5000 > " + re.escape(repr(b"? " + hostile + b"\n")), lines[1]
    )
    assert re.fullmatch(STAMP + " Clark link to Bona up", lines[2])


def test_timestamp_is_local_time_with_milliseconds_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "Bona.log"
    log = ServerLog(path, "Bona")
    before = time.time()
    log.write("hello")
    after = time.time()
    log.close()
    line = path.read_text()
    match = re.fullmatch(f"({STAMP}) Bona hello\n", line)
    assert match is not None
    stamp = datetime.fromisoformat(match.group(1)).timestamp()  # the offset makes it exact
    assert int(before * 1000) / 1000 - 0.001 <= stamp <= after


@pytest.fixture
def time_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Switch the process's local time zone (POSIX TZ rules need no tz database)."""

    def switch(tz: str) -> None:
        monkeypatch.setenv("TZ", tz)
        time.tzset()

    yield switch
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("tz", "offset"),
    [("UTC0", "+00:00"), ("EST+5", "-05:00"), ("IST-5:30", "+05:30"), ("NPT-5:45", "+05:45")],
)
def test_timestamps_carry_the_zones_offset(
    tmp_path: Path, time_zone: Callable[[str], None], tz: str, offset: str
) -> None:
    time_zone(tz)
    path = tmp_path / "Bona.log"
    log = ServerLog(path, "Bona")
    before = time.time()
    log.write("hello")
    log.close()
    stamp = path.read_text().split(" ", 1)[0]
    assert stamp.endswith(offset)
    assert abs(datetime.fromisoformat(stamp).timestamp() - before) < 1


def test_utc_offset_formats_iso_8601() -> None:
    assert [utc_offset(s) for s in (0, 3600, -18000, 19800, -12600)] == [
        "+00:00",
        "+01:00",
        "-05:00",
        "+05:30",
        "-03:30",
    ]


def test_plural() -> None:
    assert plural(1, "record") == "1 record"
    assert [plural(n, "record") for n in (0, 2)] == ["0 records", "2 records"]
    assert plural(3, "address", "addresses") == "3 addresses"


def test_close_flushes_everything_and_later_writes_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "Clark.log"
    log = ServerLog(path, "Clark")
    for n in range(1000):
        log.write(f"entry {n}")
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1000
    assert lines[-1].endswith(" Clark entry 999")
    log.write("after close")
    log.close()
    assert len(path.read_text().splitlines()) == 1000


def test_a_log_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "Clark.log"
    path.write_text("old line\n")
    log = ServerLog(path, "Clark")
    log.write("new")
    log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "old line"
    assert lines[1].endswith(" Clark new")


def test_a_log_without_a_file_accepts_everything() -> None:
    log = ServerLog(None, "Clark")
    log.write("x")
    log.events([log.received_text("who", b"\xff")])
    log.sent("who", b"y")
    log.flush()
    log.close()


async def test_the_flusher_gets_lines_to_the_file_within_a_second(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "Clark.log"
    log = ServerLog(path, "Clark")
    try:
        nursery.start_soon(log.run_flusher)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.5)
        log.write("soon on disk")
        assert path.read_text() == ""  # buffered: the event loop does not wait on the disk
        await trio.sleep(1)
        assert path.read_text().endswith(" Clark soon on disk\n")
        assert FLUSH_INTERVAL <= 1
    finally:
        log.close()


async def test_a_client_session_is_logged_escaped(nursery: trio.Nursery, tmp_path: Path) -> None:
    herd = herd_config({"Clark": {"port": 12003, "peer_port": 12103}})
    path = tmp_path / "Clark.log"
    node = make_node("Clark", herd, log=path)
    client, conn = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        async with conn:
            await handle_client(node, NoPlaces(), Admission(10), conn)
        done.set()

    nursery.start_soon(serve)
    await client.send_all(b"hi\x1b[2J there\r\n\r\n")
    await client.send_eof()
    assert await client.receive_some() == b"? hi\x1b[2J there\n"
    await done.wait()
    node.log.close()
    entries = path.read_text().splitlines()
    assert [entry.split(" ", 3)[3] for entry in entries] == [
        "connected",
        "< b'hi\\x1b[2J there'",
        "> b'? hi\\x1b[2J there\\n'",
        "< b''",
        "closed by the client",
    ]
    assert all(re.match(STAMP + " Clark StapledStream ", entry) for entry in entries)


# --- rate-limited logging (moved here from auth.py: it is a logging tool) ------------------


@attrs.define
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_logs_once_per_interval_and_counts_the_rest() -> None:
    clock = FakeClock()
    limiter = RateLimiter(interval=10, clock=clock)
    assert limiter.allow("10.0.0.1") == 0
    clock.now = 3
    assert [limiter.allow("10.0.0.1") for _ in range(3)] == [None, None, None]
    assert limiter.allow("10.0.0.2") == 0  # addresses are counted apart
    clock.now = 9.999
    assert limiter.allow("10.0.0.1") is None
    clock.now = 10
    assert limiter.allow("10.0.0.1") == 4  # four suppressed since the last line
    clock.now = 19
    assert limiter.allow("10.0.0.1") is None
    clock.now = 30
    assert limiter.allow("10.0.0.1") == 1


def test_rate_limiter_memory_and_output_stay_bounded_under_many_addresses() -> None:
    clock = FakeClock()
    limiter = RateLimiter(interval=10, clock=clock, max_addresses=4)
    logged = [limiter.allow(f"10.0.0.{n}") for n in range(100)]
    assert logged.count(0) == 5  # four addresses, then one line for all the others
    assert len(limiter._last) <= 5
    clock.now = 10  # the old entries expire and make room again
    assert limiter.allow("10.0.1.1") == 0
    assert len(limiter._last) <= 5


async def test_rate_limiter_defaults_to_trios_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter()
    assert limiter.allow("x") == 0
    await trio.sleep(9.5)
    assert limiter.allow("x") is None
    await trio.sleep(0.5)
    assert limiter.allow("x") == 1


# --- bounded logging (issues 11 and 12) ---------------------------------------------------


def logged(path: Path) -> list[str]:
    """The entries of a closed log, without their stamps and server name."""
    return [line.split(" ", 2)[2] for line in path.read_text().splitlines()]


def test_a_long_line_is_logged_as_a_preview_and_its_length(tmp_path: Path) -> None:
    path = tmp_path / "Clark.log"
    log = ServerLog(path, "Clark", line_limit=1024)
    log.events([log.received_text("who", b"A" * 200_000)])
    log.events([log.received_text("who", b"B" * 1024)])  # at the limit: whole
    log.close()
    assert logged(path) == [f"who < {b'A' * 128!r}... (200000 bytes)", f"who < {b'B' * 1024!r}"]


def test_bytes_that_escape_badly_are_previewed_within_twice_their_size(tmp_path: Path) -> None:
    path = tmp_path / "Clark.log"
    log = ServerLog(path, "Clark")
    hostile = bytes(range(128, 256)) * 2  # 256 bytes, each escaped as \xNN
    log.events([log.received_text("who", hostile)])
    log.sent("who", b"? " + hostile + b"\n")
    unicode = "IAMAT ünïcödé +1+1 5".encode()
    log.events([log.received_text("who", unicode)])  # a little escaping: whole
    log.close()
    entries = logged(path)
    assert entries[0] == f"who < {hostile[:32]!r}... (256 bytes)"
    assert entries[1] == f"who > {(b'? ' + hostile)[:32]!r}... (259 bytes)"
    assert entries[2] == f"who < {'IAMAT ünïcödé +1+1 5'.encode()!r}"
    assert path.stat().st_size < 2 * 2 * len(hostile)


def test_a_whatsat_reply_is_logged_as_its_at_line_and_a_summary(tmp_path: Path) -> None:
    path = tmp_path / "Clark.log"
    log = ServerLog(path, "Clark")
    at = b"AT Clark +0.5 kiwi +34-118 5\n"
    body = (
        b'{\n   "html_attributions": [],\n   "results": [{"name": "x"}, {}],\n   "status": "OK"\n}'
    )
    log.sent("who", at + body + b"\n\n")
    log.sent("who", at + b"{not json}\n\n")
    log.close()
    assert logged(path) == [
        f"who > {at!r} + places: 'OK', 2 results, {len(body) + 2} bytes",
        f"who > {at!r} + places: unreadable JSON, 12 bytes",
    ]


def test_a_full_log_is_rotated_keeping_the_newest_backups(tmp_path: Path) -> None:
    path = tmp_path / "Clark.log"
    log = ServerLog(path, "Clark", max_bytes=1000, backups=2)
    for n in range(100):  # about 50 bytes each: 5 files' worth
        log.write(f"entry {n:03d}")
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["Clark.log", "Clark.log.1", "Clark.log.2"]
    texts = [(tmp_path / name).read_text() for name in ("Clark.log.2", "Clark.log.1", "Clark.log")]
    assert all(len(text) <= 1000 + 60 for text in texts)
    entries = [line.rsplit(" ", 1)[1] for text in texts for line in text.splitlines()]
    assert entries == [f"{n:03d}" for n in range(100 - len(entries), 100)]  # newest, in order
    assert "099" in texts[2]


def test_rotation_counts_what_the_file_held_already(tmp_path: Path) -> None:
    path = tmp_path / "Clark.log"
    path.write_text("x" * 990 + "\n")
    log = ServerLog(path, "Clark", max_bytes=1000, backups=1)
    log.write("tips it over")
    log.close()
    assert (tmp_path / "Clark.log.1").read_text().startswith("x" * 990)
    assert path.read_text() == ""


def test_reopen_writes_to_a_fresh_file_after_logrotate_moved_it(tmp_path: Path) -> None:
    path = tmp_path / "Clark.log"
    log = ServerLog(path, "Clark")
    log.write("before")
    path.rename(tmp_path / "Clark.log.1")
    log.write("still buffered for the old file")
    assert log.reopen()
    log.write("after")
    log.close()
    assert logged(tmp_path / "Clark.log.1") == ["before", "still buffered for the old file"]
    assert logged(path) == ["after"]


def test_a_peer_line_is_logged_with_its_verdict(tmp_path: Path) -> None:
    path = tmp_path / "Bona.log"
    log = ServerLog(path, "Bona")
    line = b"AT Clark +0.263873386 kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.9"
    log.peer_lines("Clark", [line], [KEPT])
    log.peer_lines("Clark", [b"AT \x1b'x"], [STALE])
    log.close()
    first, second = path.read_text(encoding="utf-8").splitlines()
    assert re.fullmatch(STAMP + " Bona peer Clark < " + re.escape(repr(line)) + " kept", first)
    assert second.endswith(" Bona peer Clark < " + repr(b"AT \x1b'x") + " stale")


def test_lines_handled_together_are_logged_as_one_write_with_one_stamp(tmp_path: Path) -> None:
    path = tmp_path / "Bona.log"
    log = ServerLog(path, "Bona")
    line = b"AT Clark +0.263873386 kiwi +34-118 5"
    batch, tails = [line, line, b"AT \x1b'x"], [KEPT, DUPLICATE, STALE]
    log.peer_lines("Clark", batch, tails)
    assert batch == tails == []  # emptied for the next batch
    events = [log.received_text("who", b"IAMAT kiwi +34-118 5\x1b"), log.sent_text("who", b"? x\n")]
    log.events(events)
    assert events == []
    log.peer_lines("Clark", [], [])  # nothing to log: nothing written
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [ln.split(" ", 1)[1] for ln in lines] == [
        f"Bona peer Clark < {line!r} kept",
        f"Bona peer Clark < {line!r} duplicate",
        "Bona peer Clark < " + repr(b"AT \x1b'x") + " stale",
        "Bona who < " + repr(b"IAMAT kiwi +34-118 5\x1b"),
        "Bona who > " + repr(b"? x\n"),
    ]
    assert all(re.fullmatch(STAMP, ln.split(" ", 1)[0]) for ln in lines)
    assert len({ln.split(" ", 1)[0] for ln in lines[:3]}) == 1  # one stamp per batch


def logged_events(path: Path) -> list[str]:
    """The entries of a closed log file without their time stamps."""
    return [line.split(" ", 1)[1] for line in path.read_text(encoding="utf-8").splitlines()]


ANY_LINE = st.binary(max_size=80) | st.sampled_from(
    [b"IAMAT kiwi +34-118 5", b"AT Clark +0.1 kiwi +34-118 5\n", b"AT x\n{}\n\n", b"x\\'y\n"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([RECEIVED, SENT]), ANY_LINE), max_size=12))
@example([(RECEIVED, b"IAMAT kiwi +34-118 5"), (SENT, b"AT Clark +0.1 kiwi +34-118 5\n")])
@example([(RECEIVED, b""), (SENT, b"? no LF"), (RECEIVED, b"x" * 64), (SENT, b"y" * 64 + b"\n")])
@example([(RECEIVED, b"x" * 65)])
@example([(RECEIVED, b"IAMAT k}wi +34-118 5"), (SENT, b"AT Clark +0.1 k}wi +34-118 5\n")])
# One line and its reply (exchanges' own fast path for them), and pairs it must refuse.
@example([(RECEIVED, b""), (SENT, b"\n")])
@example([(RECEIVED, b"x" * 63), (SENT, b"y" * 62 + b"\n")])
@example([(RECEIVED, b"x" * 64), (SENT, b"y\n")])
@example([(RECEIVED, b"it's"), (SENT, b"? it's\n")])
@example([(RECEIVED, b"WHATSAT kiwi 1 1"), (SENT, b"AT x\n{}\n\n")])
@example([(SENT, b"AT x\n"), (RECEIVED, b"IAMAT")])
def test_exchanges_log_exactly_what_received_and_sent_log(
    tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[bytes, bytes]]
) -> None:
    # The joined fast path must write byte for byte what the entry-by-entry path
    # writes, whatever the lines hold: quotes, backslashes, control bytes, non-ASCII,
    # replies with and without their LF, WHATSAT replies, lines over the limit (64).
    folder = tmp_path_factory.mktemp("exchanges")
    fast, slow = (
        ServerLog(folder / "fast.log", "Clark", line_limit=64),
        ServerLog(folder / "slow.log", "Clark", line_limit=64),
    )
    flat = [part for entry in entries for part in entry]
    fast.exchanges("who", flat)
    assert flat == []
    slow.events(
        [
            slow.received_text("who", data) if mark == RECEIVED else slow.sent_text("who", data)
            for mark, data in entries
        ]
    )
    fast.close()
    slow.close()
    assert logged_events(folder / "fast.log") == logged_events(folder / "slow.log")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            ANY_LINE.filter(lambda b: b"\n" not in b),
            st.sampled_from(["kept", "stale", "duplicate"]),
        ),
        max_size=12,
    )
)
@example(
    [(b"AT Clark +0.1 kiwi +34-118 5", "kept"), (b"AT Clark +0.1 kiwi +34-118 5", "duplicate")]
)
def test_peer_lines_are_logged_as_repr_writes_them(
    tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[bytes, str]]
) -> None:
    path = tmp_path_factory.mktemp("peer") / "Bona.log"
    log = ServerLog(path, "Bona")
    expected = [f"Bona peer Clark < {line!r} {verdict}" for line, verdict in entries]
    log.peer_lines("Clark", [ln for ln, _ in entries], [VERDICT_TAILS[v] for _, v in entries])
    log.close()
    assert logged_events(path) == expected
