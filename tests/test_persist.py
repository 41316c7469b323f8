"""Persistence: records survive a restart, batches coalesce, failures are logged, not raised."""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from herd_trio.backoff import Backoff
from herd_trio.persist import Persister, PersisterStatistics, open_persister
from herd_trio.protocol import Record, parse_at
from herd_trio.statefile import (
    UPSERT_ROWS,
    PersistError,
    append_records,
    load_records,
    open_file,
    rows_query,
    state_path,
    upsert,
    write_records,
)
from herd_trio.store import Store
from tests.e2e.herd import poll


def note(persister: Persister, record: Record) -> None:
    """What the store tells the persister when it keeps `record`."""
    persister.note(record.client, record.at_line)


def rec(client: bytes, time: int, origin: bytes = b"Clark") -> Record:
    return parse_at(b"AT %s +0.000000001 %s +34.068930-118.445127 %d" % (origin, client, time))


def rows(path: Path) -> dict[bytes, bytes]:
    """What the file holds per client: its last row, records table and journal both."""
    conn = sqlite3.connect(path)
    try:
        query = rows_query(conn)
        assert query is not None
        return dict(conn.execute(query).fetchall())
    finally:
        conn.close()


@attrs.define
class Log:
    """A log callback that a test can wait on."""

    lines: list[str] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, part: str) -> None:
        await trio.lowlevel.checkpoint()
        while not any(part in line for line in self.lines):
            await self._changed.wait()


def wal_is_empty(path: Path) -> bool:
    wal = Path(f"{path}-wal")
    return not wal.exists() or wal.stat().st_size == 0


async def wait_for_row(path: Path, client: bytes) -> None:
    """Poll the file (a quick read) until `client`'s row is there; fail after 5 s."""

    async def has_row() -> bool | None:
        await trio.lowlevel.checkpoint()
        return True if client in rows(path) else None

    await poll(f"a row for {client!r} in {path}", has_row, deadline=5)


async def wait_for_batches(persister: Persister, batches: int) -> PersisterStatistics:
    """Poll until `persister` has committed `batches` batches; fail after 5 s."""

    async def written() -> PersisterStatistics | None:
        await trio.lowlevel.checkpoint()
        stats = persister.statistics()
        return stats if stats.batches_written >= batches else None

    return await poll(f"{batches} batches written to {persister.path}", written, deadline=5)


@contextmanager
def wall_clock_limit(scope: trio.CancelScope, seconds: float) -> Iterator[None]:
    """Cancel `scope` after `seconds` of real time: a bound the autojump clock can't leap to."""
    token = trio.lowlevel.current_trio_token()
    timer = threading.Timer(seconds, token.run_sync_soon, (scope.cancel,))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@attrs.define
class Gate:
    """A `before_write` hook: writes wait until the test opens it; the first `fail` fail."""

    fail: int = 0
    entered: threading.Event = attrs.field(factory=threading.Event)
    opened: threading.Event = attrs.field(factory=threading.Event)

    def __call__(self) -> None:  # in the persister's worker thread
        self.entered.set()
        if not self.opened.wait(timeout=10):
            raise AssertionError("the test never opened the gate")
        if self.fail > 0:
            self.fail -= 1
            raise OSError("disk full (simulated)")

    async def wait_entered(self) -> None:
        async def entered() -> bool | None:
            await trio.lowlevel.checkpoint()
            return True if self.entered.is_set() else None

        await poll("a write waiting at the gate", entered, deadline=5)


def test_state_path_is_one_file_per_server(tmp_path: Path) -> None:
    assert state_path(tmp_path, "Clark") == tmp_path / "Clark.sqlite3"
    assert state_path(str(tmp_path), "Bona").name == "Bona.sqlite3"


def test_missing_file_loads_nothing(tmp_path: Path) -> None:
    assert load_records(tmp_path / "nobody.sqlite3") == []
    assert not (tmp_path / "nobody.sqlite3").exists()  # loading creates nothing


async def test_round_trip_of_a_thousand_records(tmp_path: Path) -> None:
    path = tmp_path / "state" / "Clark.sqlite3"  # the directory is created on demand
    records = [rec(b"client-%d" % i, 1_600_000_000 + i) for i in range(1000)]
    persister = Persister(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        for record in records:
            note(persister, record)
        stats = await wait_for_batches(persister, 1)  # one batch: no checkpoint in between
        assert stats == PersisterStatistics(
            pending=0, rows_written=1000, batches_written=1, failures=0
        )
        nursery.cancel_scope.cancel()
    loaded = await trio.to_thread.run_sync(load_records, path)
    assert sorted(loaded, key=lambda r: r.client) == sorted(records, key=lambda r: r.client)


async def test_updates_of_one_client_coalesce_into_one_row_with_the_newest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Clark.sqlite3"
    persister = Persister(path)
    store = Store()
    store.on_change(persister.note)
    for sent in range(100):
        record = rec(b"kiwi", sent)
        assert store.offer(record) is record
    older = rec(b"kiwi", 5)
    assert store.offer(older) is not older  # refused by the store, so nothing is noted
    assert persister.statistics().pending == 1
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        assert await wait_for_batches(persister, 1) == PersisterStatistics(
            pending=0, rows_written=1, batches_written=1, failures=0
        )
        assert rows(path) == {b"kiwi": rec(b"kiwi", 99).at_line}
        nursery.cancel_scope.cancel()
    assert persister.statistics().batches_written == 1  # nothing left for the final write


async def test_later_batches_replace_earlier_rows(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    persister = Persister(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        for sent in range(5):
            note(persister, rec(b"kiwi", sent))
            note(persister, rec(b"pear", sent, origin=b"Bona"))
            await wait_for_batches(persister, sent + 1)
            assert rows(path)[b"kiwi"] == rec(b"kiwi", sent).at_line
        nursery.cancel_scope.cancel()
    assert persister.statistics().batches_written == 5
    assert rows(path) == {
        b"kiwi": rec(b"kiwi", 4).at_line,
        b"pear": rec(b"pear", 4, origin=b"Bona").at_line,
    }


def table(path: Path, name: str) -> list[tuple[bytes, bytes]]:
    """The rows of one table of the file, in rowid order."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT client, at_line FROM {name} ORDER BY rowid").fetchall()
    finally:
        conn.close()


async def test_batches_go_to_the_journal_and_fold_into_records(tmp_path: Path) -> None:
    """Appended while fewer than fold_rows wait; then folded, newest row per client."""
    path = tmp_path / "Clark.sqlite3"
    persister = Persister(path, fold_rows=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        note(persister, rec(b"kiwi", 1))
        note(persister, rec(b"pear", 1))
        await wait_for_batches(persister, 1)
        assert table(path, "records") == []
        assert table(path, "journal") == [
            (b"kiwi", rec(b"kiwi", 1).at_line),
            (b"pear", rec(b"pear", 1).at_line),
        ]
        note(persister, rec(b"kiwi", 2))
        await wait_for_batches(persister, 2)
        assert len(table(path, "journal")) == 3  # kiwi twice: the later row is the newer
        assert rows(path) == {b"kiwi": rec(b"kiwi", 2).at_line, b"pear": rec(b"pear", 1).at_line}
        note(persister, rec(b"plum", 1))
        note(persister, rec(b"kiwi", 3))
        await wait_for_batches(persister, 3)  # 5 rows: folded
        assert table(path, "journal") == []
        assert sorted(table(path, "records")) == [
            (b"kiwi", rec(b"kiwi", 3).at_line),
            (b"pear", rec(b"pear", 1).at_line),
            (b"plum", rec(b"plum", 1).at_line),
        ]
        note(persister, rec(b"pear", 2))
        await wait_for_batches(persister, 4)
        assert table(path, "journal") == [(b"pear", rec(b"pear", 2).at_line)]
        nursery.cancel_scope.cancel()
    # A clean stop folds what is left, so the next start has no journal to scan.
    assert table(path, "journal") == []
    assert rows(path)[b"pear"] == rec(b"pear", 2).at_line
    assert len(table(path, "records")) == 3


async def test_a_journal_left_by_a_crash_is_read_and_folded_later(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    write_records(path, [rec(b"kiwi", 1), rec(b"pear", 1)])
    conn = open_file(path)  # what a killed server leaves: rows appended, never folded
    append_records(conn, [(b"kiwi", rec(b"kiwi", 2).at_line), (b"plum", rec(b"plum", 1).at_line)])
    append_records(conn, [(b"kiwi", rec(b"kiwi", 3).at_line)])
    conn.close()
    expected = [rec(b"kiwi", 3), rec(b"pear", 1), rec(b"plum", 1)]
    assert sorted(load_records(path), key=lambda r: r.client) == expected
    persister = Persister(path, fold_rows=2)  # more than that wait already
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        assert len(table(path, "journal")) == 3  # not folded while the server starts
        note(persister, rec(b"fig", 1))
        await wait_for_batches(persister, 1)  # the first batch after the start folds
        assert table(path, "journal") == []
        nursery.cancel_scope.cancel()
    assert sorted(load_records(path), key=lambda r: r.client) == [rec(b"fig", 1), *expected]


def test_a_file_from_before_the_journal_is_read_and_gains_one(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE records (client BLOB PRIMARY KEY, at_line BLOB NOT NULL)")
        conn.execute("INSERT INTO records VALUES (?, ?)", (b"kiwi", rec(b"kiwi", 1).at_line))
    conn.close()
    assert load_records(path) == [rec(b"kiwi", 1)]
    conn = open_file(path)
    append_records(conn, [(b"kiwi", rec(b"kiwi", 2).at_line)])
    conn.close()
    assert load_records(path) == [rec(b"kiwi", 2)]


async def test_cancellation_writes_what_is_pending(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    # A batch interval far beyond the test: only the final write can save these.
    persister = Persister(path, batch_interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        note(persister, rec(b"first", 1))
        await wait_for_batches(persister, 1)  # the first batch goes out at once
        records = [rec(b"client-%d" % i, i) for i in range(300)]
        for record in records:
            note(persister, record)
        assert persister.statistics().pending == 300
        nursery.cancel_scope.cancel()
    assert persister.statistics() == PersisterStatistics(
        pending=0, rows_written=301, batches_written=2, failures=0
    )
    loaded = await trio.to_thread.run_sync(load_records, path)
    assert len(loaded) == 301
    assert set(records) <= set(loaded)


async def test_open_persister_saves_what_the_store_keeps_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    store = Store()
    async with open_persister(path, store):
        store.offer(rec(b"kiwi", 1))
        store.offer(rec(b"pear", 2))
    assert sorted(load_records(path), key=lambda r: r.client) == [
        rec(b"kiwi", 1),
        rec(b"pear", 2),
    ]


@pytest.mark.parametrize("count", [0, 1, 3, UPSERT_ROWS, UPSERT_ROWS + 1, 3 * UPSERT_ROWS + 117])
def test_upsert_writes_every_row_and_replaces_a_clients_old_one(tmp_path: Path, count: int) -> None:
    path = tmp_path / "s.sqlite3"
    conn = open_file(path)
    try:
        upsert(conn, [(b"c%d" % n, b"old %d" % n) for n in range(0, 2 * count, 2)])
        # Half of these clients have a row already; the statements come in several sizes.
        upsert(conn, [(b"c%d" % n, b"new %d" % n) for n in range(count, 2 * count + count)])
        # One client several times in one call: the last row stands.
        upsert(conn, [(b"twice", b"first"), *[(b"x%d" % n, b"x") for n in range(count)]])
        upsert(conn, [(b"twice", b"second"), (b"twice", b"third")])
    finally:
        conn.close()
    expected = {b"c%d" % n: b"old %d" % n for n in range(0, 2 * count, 2)}
    expected |= {b"c%d" % n: b"new %d" % n for n in range(count, 3 * count)}
    expected |= {b"x%d" % n: b"x" for n in range(count)} | {b"twice": b"third"}
    assert rows(path) == expected


def test_write_records_makes_a_file_load_records_reads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "Clark.sqlite3"
    records = [rec(b"client-%d" % i, i) for i in range(100)]
    write_records(path, records)
    write_records(path, [rec(b"client-7", 1000)])  # a newer record replaces the row
    expected = [*records[:7], rec(b"client-7", 1000), *records[8:]]
    assert sorted(load_records(path), key=lambda r: r.client) == sorted(
        expected, key=lambda r: r.client
    )


async def test_reopen_after_close_keeps_old_rows_and_adds_new(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    first = Persister(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        note(first, rec(b"kiwi", 1))
        nursery.cancel_scope.cancel()
    second = Persister(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        note(second, rec(b"pear", 2))
        nursery.cancel_scope.cancel()
    assert set(rows(path)) == {b"kiwi", b"pear"}
    # Each run left the database closed and consistent: the WAL was checkpointed.
    assert wal_is_empty(path)


def test_rows_that_are_not_valid_at_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    good = rec(b"kiwi", 7)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE records (client BLOB PRIMARY KEY, at_line BLOB NOT NULL)")
        conn.executemany(
            "INSERT INTO records VALUES (?, ?)",
            [
                (b"kiwi", good.at_line),
                (b"junk", b"AT garbage"),
                (b"text", rec(b"text", 1).at_line.decode()),  # TEXT, not BLOB
                (b"other", rec(b"pear", 1).at_line),  # key and line disagree
                (b"spaced", b"AT  Clark +0.000000001 spaced +1+1 1"),  # not canonical
            ],
        )
    conn.close()
    log: list[str] = []
    assert load_records(path, log=log.append) == [good]
    assert f"skipped 4 rows of {path} that are not valid AT lines" in log


def test_a_file_that_is_not_a_database_is_an_error_not_an_empty_start(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PersistError, match=r"cannot read records from .*Clark\.sqlite3"):
        load_records(path)


async def test_unwritable_path_is_logged_and_retried_without_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    path = blocker / "Clark.sqlite3"
    log = Log()
    quick = Backoff(initial=0.01, cap=0.02)
    persister = Persister(path, log=log, retry=quick, log_every=1)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(persister.run)  # starts even though the file can't be opened
            [line] = log.lines  # reported, not raised
            assert line.startswith(f"cannot write records to {path}: ")
            assert line.endswith("(0 records pending, failure 1)")
            note(persister, rec(b"kiwi", 1))
            await log.wait_for("(1 record pending, failure 3)")  # retried, and kept
            blocker.unlink()  # the operator fixes it: the next retry succeeds
            await log.wait_for(f"writing {path} works again after ")
        nursery.cancel_scope.cancel()
    assert rows(path) == {b"kiwi": rec(b"kiwi", 1).at_line}


async def test_failed_writes_are_retried_with_backoff_and_logged_sparingly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "Clark.sqlite3"
    attempts: list[float] = []

    def fail_four_times() -> None:  # in the worker thread
        attempts.append(trio.from_thread.run_sync(trio.current_time))
        if len(attempts) <= 4:
            raise OSError("disk full (simulated)")

    log = Log()
    logged_at: list[float] = []

    def timed_log(line: str) -> None:
        logged_at.append(trio.current_time())
        log(line)

    persister = Persister(
        path,
        log=timed_log,
        retry=Backoff(initial=1, cap=4, rand=max),  # max(hi / 2, hi) == hi: no jitter
        log_every=2,
        # No trio deadline anywhere in this test (hence no `poll`): the autojump clock
        # would leap to it while a worker thread runs (waiting for a thread is blocking).
        final_deadline=math.inf,
        before_write=fail_four_times,
    )
    async with trio.open_nursery() as nursery:
        with wall_clock_limit(nursery.cancel_scope, 10):  # a failing test ends, not hangs
            await nursery.start(persister.run)
            note(persister, rec(b"kiwi", 1))
            await log.wait_for("works again")
        nursery.cancel_scope.cancel()
    assert attempts == [0, 1, 3, 7, 11]  # waits of 1, 2, 4, then the cap of 4
    failed = f"cannot write records to {path}: disk full (simulated) (1 record pending"
    assert list(zip(logged_at, log.lines, strict=True)) == [
        (0, f"{failed}, failure 1)"),  # the first failure, then every log_every-th
        (3, f"{failed}, failure 3)"),
        (11, f"writing {path} works again after 4 failures"),
    ]
    assert rows(path) == {b"kiwi": rec(b"kiwi", 1).at_line}


async def test_a_note_made_during_a_failed_write_beats_the_failed_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Clark.sqlite3"
    log = Log()
    gate = Gate(fail=1)
    quick = Backoff(initial=0.01, cap=0.02)
    persister = Persister(path, log=log, retry=quick, log_every=1, before_write=gate)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        note(persister, rec(b"kiwi", 1))
        await gate.wait_entered()  # the write holds kiwi 1 and waits at the gate
        assert persister.statistics().pending == 0  # taken by the write
        note(persister, rec(b"kiwi", 2))
        gate.opened.set()  # let the write fail now
        assert await wait_for_batches(persister, 1) == PersisterStatistics(
            pending=0, rows_written=1, batches_written=1, failures=0
        )
        nursery.cancel_scope.cancel()
    assert rows(path) == {b"kiwi": rec(b"kiwi", 2).at_line}
    assert log.lines == [  # the failed record went back only where nothing newer was
        f"cannot write records to {path}: disk full (simulated) (1 record pending, failure 1)",
        f"writing {path} works again after 1 failures",
    ]


async def test_stopping_with_an_unwritable_path_logs_the_loss(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    path.mkdir()
    log: list[str] = []
    persister = Persister(path, log=log.append, batch_interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        note(persister, rec(b"kiwi", 1))
        note(persister, rec(b"pear", 1))
        nursery.cancel_scope.cancel()
    assert log[-1].startswith("stopping with 2 records not saved: cannot write records to")


async def test_a_final_write_that_overruns_its_deadline_is_abandoned_and_logged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Clark.sqlite3"
    log: list[str] = []
    gate = Gate()  # a disk that hangs until the test opens the gate
    persister = Persister(
        path, log=log.append, batch_interval=3600, final_deadline=0.1, before_write=gate
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(persister.run)
            note(persister, rec(b"kiwi", 1))
            await gate.wait_entered()
            nursery.cancel_scope.cancel()
        assert log == [f"stopping: {path} not written within 0.1 s, 1 record may be lost"]
        assert b"kiwi" not in rows(path)
    finally:
        gate.opened.set()  # the abandoned worker now writes and closes
    # The abandoned worker thread signals nothing to trio: poll for its commit.
    await wait_for_row(path, b"kiwi")
