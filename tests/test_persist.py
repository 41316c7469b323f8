"""Persistence: records survive a restart, batches coalesce, failures are logged, not raised."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from herd_trio.persist import (
    Persister,
    PersistError,
    PersisterStatistics,
    load_records,
    open_persister,
    state_path,
)
from herd_trio.protocol import Record, parse_at
from herd_trio.store import Store
from tests.e2e.herd import poll


def rec(client: bytes, time: int, origin: bytes = b"Clark") -> Record:
    return parse_at(b"AT %s +0.000000001 %s +34.068930-118.445127 %d" % (origin, client, time))


def rows(path: Path) -> dict[bytes, bytes]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT client, at_line FROM records").fetchall())
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
            persister.note(record)
        await persister.flush()
        assert persister.statistics().rows_written == 1000
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
        assert store.offer(rec(b"kiwi", sent))
    store.offer(rec(b"kiwi", 5))  # older: the store refuses it, nothing is noted
    await persister.flush()
    assert persister.statistics() == PersisterStatistics(
        pending=0, rows_written=1, batches_written=1, failures=0
    )
    assert rows(path) == {b"kiwi": rec(b"kiwi", 99).at_line}
    async with trio.open_nursery() as nursery:  # run() closes the connection on cancel
        await nursery.start(persister.run)
        nursery.cancel_scope.cancel()


async def test_later_batches_replace_earlier_rows(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    persister = Persister(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        for sent in range(5):
            persister.note(rec(b"kiwi", sent))
            persister.note(rec(b"pear", sent, origin=b"Bona"))
            await persister.flush()
        nursery.cancel_scope.cancel()
    assert persister.statistics().batches_written == 5
    assert rows(path) == {
        b"kiwi": rec(b"kiwi", 4).at_line,
        b"pear": rec(b"pear", 4, origin=b"Bona").at_line,
    }


async def test_cancellation_writes_what_is_pending(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    # A batch interval far beyond the test: only the final write can save these.
    persister = Persister(path, batch_interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        persister.note(rec(b"first", 1))
        await trio.testing.wait_all_tasks_blocked()  # the first batch went out at once
        records = [rec(b"client-%d" % i, i) for i in range(300)]
        for record in records:
            persister.note(record)
        assert persister.statistics().pending == 300
        nursery.cancel_scope.cancel()
    loaded = await trio.to_thread.run_sync(load_records, path)
    assert len(loaded) == 301
    assert set(records) <= set(loaded)


async def test_open_persister_loads_into_the_store_and_saves_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    store = Store()
    async with open_persister(path, store):
        store.offer(rec(b"kiwi", 1))
        store.offer(rec(b"pear", 2))
    restarted = Store()
    async with open_persister(path, restarted) as persister:
        assert sorted(r.client for r in restarted) == [b"kiwi", b"pear"]
        assert persister.statistics().pending == 0  # loaded records are not rewritten
        restarted.offer(rec(b"kiwi", 3))
    assert sorted(load_records(path), key=lambda r: r.client) == [
        rec(b"kiwi", 3),
        rec(b"pear", 2),
    ]


async def test_reopen_after_close_keeps_old_rows_and_adds_new(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    first = Persister(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        first.note(rec(b"kiwi", 1))
        nursery.cancel_scope.cancel()
    second = Persister(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        second.note(rec(b"pear", 2))
        nursery.cancel_scope.cancel()
    first.note(rec(b"apple", 3))  # a closed persister still writes when asked to
    await first.flush()
    assert set(rows(path)) == {b"kiwi", b"pear", b"apple"}
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
    persister = Persister(path, log=log, retry_initial=0.01, retry_cap=0.02, log_every=1)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(persister.run)  # starts even though the file can't be opened
            [line] = log.lines  # reported, not raised
            assert line.startswith(f"cannot write records to {path}: ")
            assert line.endswith("(0 records pending, failure 1)")
            persister.note(rec(b"kiwi", 1))
            await log.wait_for("(1 records pending, failure 3)")  # retried, and kept
            blocker.unlink()  # the operator fixes it: the next retry succeeds
            await log.wait_for(f"writing {path} works again after ")
        nursery.cancel_scope.cancel()
    assert rows(path) == {b"kiwi": rec(b"kiwi", 1).at_line}


async def test_flush_raises_persist_error_and_keeps_the_records(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    path.mkdir()  # a directory where the file should be
    persister = Persister(path)
    persister.note(rec(b"kiwi", 1))
    with pytest.raises(PersistError, match="cannot write records to"):
        await persister.flush()
    persister.note(rec(b"kiwi", 2))  # a newer note replaces the failed one
    assert persister.statistics() == PersisterStatistics(
        pending=1, rows_written=0, batches_written=0, failures=0
    )


async def test_a_note_made_during_a_failed_write_beats_the_failed_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Clark.sqlite3"
    path.mkdir()
    persister = Persister(path)
    persister.note(rec(b"kiwi", 1))

    async def flush() -> None:
        with pytest.raises(PersistError):
            await persister.flush()

    # Hold the database lock so the write is still in its thread when the newer note lands.
    persister._db_lock.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()
        assert persister.statistics().pending == 0  # taken by the write
        persister.note(rec(b"kiwi", 2))
        persister._db_lock.release()  # let the write fail now
    path.rmdir()
    await persister.flush()
    assert rows(path) == {b"kiwi": rec(b"kiwi", 2).at_line}


async def test_stopping_with_an_unwritable_path_logs_the_loss(tmp_path: Path) -> None:
    path = tmp_path / "Clark.sqlite3"
    path.mkdir()
    log: list[str] = []
    persister = Persister(path, log=log.append, batch_interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        persister.note(rec(b"kiwi", 1))
        persister.note(rec(b"pear", 1))
        nursery.cancel_scope.cancel()
    assert log[-1].startswith("stopping with 2 records not saved: cannot write records to")


async def test_a_final_write_that_overruns_its_deadline_is_abandoned_and_logged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Clark.sqlite3"
    log: list[str] = []
    persister = Persister(path, log=log.append, batch_interval=3600, final_deadline=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        persister.note(rec(b"kiwi", 1))
        persister._db_lock.acquire()  # a disk that hangs: the final write cannot start
        nursery.cancel_scope.cancel()
    try:
        assert log[-1] == f"stopping: {path} not written within 0.1 s, 1 records may be lost"
    finally:
        persister._db_lock.release()  # the abandoned worker now writes and closes
    # The abandoned worker thread signals nothing to trio: poll for its commit.
    await wait_for_row(path, b"kiwi")
