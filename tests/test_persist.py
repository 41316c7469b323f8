"""Persistence: records survive a restart, batches coalesce, failures are logged, not raised."""

from __future__ import annotations

import math
import os
import random
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from herd_trio import statefile
from herd_trio.backoff import Backoff
from herd_trio.persist import Persister, PersisterStatistics, open_persister
from herd_trio.protocol import Record, parse_at
from herd_trio.statefile import (
    HEADER_BYTES,
    PersistError,
    convert_legacy,
    header,
    legacy_path,
    load_records,
    read_all,
    state_path,
    write_records,
)
from herd_trio.store import Store, leaf_of
from tests.e2e.herd import poll


def note(persister: Persister, record: Record) -> None:
    """What the store tells the persister when it keeps `record`."""
    persister.note(record.client, record.at_line)


def rec(client: bytes, time: int, origin: bytes = b"Clark") -> Record:
    return parse_at(b"AT %s +0.000000001 %s +34.068930-118.445127 %d" % (origin, client, time))


def rows(path: Path) -> dict[bytes, bytes]:
    """What the file holds per client: its last line."""
    return read_all(path)


def sections(path: Path) -> tuple[list[bytes], list[bytes]]:
    """The lines of the file's sorted section and of its appended section."""
    data = path.read_bytes()
    sorted_bytes = int(data[HEADER_BYTES - 21 : HEADER_BYTES - 1])
    assert data[:HEADER_BYTES] == header(sorted_bytes)
    end = HEADER_BYTES + sorted_bytes
    return data[HEADER_BYTES:end].splitlines(), data[end:].splitlines()


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


async def wait_for_compactions(persister: Persister, compactions: int) -> None:
    """Poll until `persister` has compacted its file `compactions` times; fail after 5 s."""

    async def compacted() -> bool | None:
        await trio.lowlevel.checkpoint()
        return True if persister.statistics().compactions >= compactions else None

    await poll(f"{compactions} compactions of {persister.path}", compacted, deadline=5)


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
    assert state_path(tmp_path, "Clark") == tmp_path / "Clark.records"
    assert state_path(str(tmp_path), "Bona").name == "Bona.records"


def test_missing_file_loads_nothing(tmp_path: Path) -> None:
    assert load_records(tmp_path / "nobody.records") == []
    assert not (tmp_path / "nobody.records").exists()  # loading creates nothing


async def test_round_trip_of_a_thousand_records(tmp_path: Path) -> None:
    path = tmp_path / "state" / "Clark.records"  # the directory is created on demand
    records = [rec(b"client-%d" % i, 1_600_000_000 + i) for i in range(1000)]
    persister = Persister(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        for record in records:
            note(persister, record)
        stats = await wait_for_batches(persister, 1)  # one batch: no checkpoint in between
        assert stats == PersisterStatistics(
            pending=0, rows_written=1000, batches_written=1, failures=0, compactions=0
        )
        nursery.cancel_scope.cancel()
    loaded = await trio.to_thread.run_sync(load_records, path)
    assert sorted(loaded, key=lambda r: r.client) == sorted(records, key=lambda r: r.client)


async def test_updates_of_one_client_coalesce_into_one_row_with_the_newest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Clark.records"
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
            pending=0, rows_written=1, batches_written=1, failures=0, compactions=0
        )
        assert rows(path) == {b"kiwi": rec(b"kiwi", 99).at_line}
        nursery.cancel_scope.cancel()
    assert persister.statistics().batches_written == 1  # nothing left for the final write


async def test_later_batches_replace_earlier_rows(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
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


async def test_cancellation_writes_what_is_pending(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
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
        pending=0, rows_written=301, batches_written=2, failures=0, compactions=0
    )
    loaded = await trio.to_thread.run_sync(load_records, path)
    assert len(loaded) == 301
    assert set(records) <= set(loaded)


async def test_open_persister_saves_what_the_store_keeps_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
    store = Store()
    async with open_persister(path, store):
        store.offer(rec(b"kiwi", 1))
        store.offer(rec(b"pear", 2))
    assert sorted(load_records(path), key=lambda r: r.client) == [
        rec(b"kiwi", 1),
        rec(b"pear", 2),
    ]


def test_write_records_makes_a_file_load_records_reads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "Clark.records"
    records = [rec(b"client-%d" % i, i) for i in range(100)]
    write_records(path, records)
    write_records(path, [rec(b"client-7", 1000)])  # a newer record replaces the row
    expected = [*records[:7], rec(b"client-7", 1000), *records[8:]]
    assert sorted(load_records(path), key=lambda r: r.client) == sorted(
        expected, key=lambda r: r.client
    )


async def test_reopen_after_close_keeps_old_rows_and_adds_new(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
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
    assert sections(path) == ([], [rec(b"kiwi", 1).at_line, rec(b"pear", 2).at_line])


def test_lines_that_are_not_valid_at_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
    good = rec(b"kiwi", 7)
    lines = [
        good.at_line,
        b"AT garbage",
        b"AT  Clark +0.000000001 spaced +1+1 1",  # not canonical
        b"AT Clark +0.000000001 bad +1+1 1.x",  # not a time
        b"\xff\xfe",
    ]
    body = b"".join(line + b"\n" for line in lines)
    path.write_bytes(header(0) + body + b"AT Clark +0.000000001 cut")  # the tail a crash cut
    log: list[str] = []
    assert load_records(path, log=log.append) == [good]
    assert f"skipped 4 lines of {path} that are not valid AT lines" in log


@pytest.mark.parametrize(
    "content",
    [b"this is not a records file" * 100, header(10**6) + b"AT x\n", b"SQLite format 3\x00"],
)
def test_a_file_that_is_not_a_records_file_is_an_error_not_an_empty_start(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "Clark.records"
    path.write_bytes(content)
    with pytest.raises(PersistError, match=r"Clark\.records is not a herd_trio records file"):
        load_records(path)


async def test_a_persister_refuses_a_file_that_is_not_a_records_file(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
    path.write_bytes(b"precious data of someone else\n")
    log: list[str] = []
    persister = Persister(path, log=log.append, batch_interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        note(persister, rec(b"kiwi", 1))
        nursery.cancel_scope.cancel()
    assert path.read_bytes() == b"precious data of someone else\n"  # never overwritten
    assert log[0].startswith(f"{path} is not a herd_trio records file")


def test_the_file_is_text_a_header_then_the_sorted_then_the_appended_section(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Clark.records"
    records = [rec(b"client-%d" % i, i) for i in range(300)]
    write_records(path, records)
    data = path.read_bytes()
    assert data.startswith(b"herd_trio records 1 sorted=")
    first, appended = sections(path)
    assert appended == []
    assert sorted(first) == sorted(r.at_line for r in records)
    leaves = [leaf_of(line.split()[3]) for line in first]
    assert leaves == sorted(leaves)  # in leaf order: a restart bisects it


async def test_a_line_cut_short_by_a_crash_is_cut_off_before_the_next_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Clark.records"
    write_records(path, [rec(b"kiwi", 1)])
    with path.open("ab") as file:  # a killed server's last write, half done
        file.write(rec(b"pear", 1).at_line + b"\n" + rec(b"plum", 1).at_line[:20])
    assert rows(path) == {b"kiwi": rec(b"kiwi", 1).at_line, b"pear": rec(b"pear", 1).at_line}
    persister = Persister(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        note(persister, rec(b"fig", 1))
        await wait_for_batches(persister, 1)
        nursery.cancel_scope.cancel()
    assert sections(path) == (
        [rec(b"kiwi", 1).at_line],
        [rec(b"pear", 1).at_line, rec(b"fig", 1).at_line],
    )


async def test_a_failed_write_is_overwritten_by_the_next_one(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
    written: list[int] = []

    def half_then_fail() -> None:  # in the worker thread: leave junk past the end, then fail
        if not written:
            written.append(1)
            with path.open("ab") as file:
                file.write(b"AT Clark +0.000000001 half a li")
            raise OSError("disk full (simulated)")

    quick = Backoff(initial=0.01, cap=0.02)
    persister = Persister(path, retry=quick, before_write=half_then_fail)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        note(persister, rec(b"kiwi", 1))
        await wait_for_batches(persister, 1)
        nursery.cancel_scope.cancel()
    assert sections(path) == ([], [rec(b"kiwi", 1).at_line])


async def test_a_compaction_a_crash_cut_short_is_discarded(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
    write_records(path, [rec(b"kiwi", 1)])
    leftover = tmp_path / "Clark.records.tmp"
    leftover.write_bytes(b"half a compaction")
    assert statefile.tmp_path(path) == leftover
    persister = Persister(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        nursery.cancel_scope.cancel()
    assert not leftover.exists()
    assert rows(path) == {b"kiwi": rec(b"kiwi", 1).at_line}


def stored(store: Store) -> dict[bytes, bytes]:
    return {r.client: r.at_line for r in store}


async def test_the_file_is_compacted_once_appended_lines_outnumber_clients(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Clark.records"
    log: list[str] = []
    store = Store()
    persister = Persister(path, log=log.append, store=store, compact_min=70)
    store.on_change(persister.note)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        for sent in range(1, 3):
            for i in range(20):
                store.offer(rec(b"client-%d" % i, sent))
            await wait_for_batches(persister, sent)
        assert persister.statistics().compactions == 0  # not before it may
        persister.allow_compaction()
        for i in range(20):  # 60 lines for 20 clients: more than they, not compact_min
            store.offer(rec(b"client-%d" % i, 3))
        await wait_for_batches(persister, 3)
        for i in range(20):
            store.offer(rec(b"client-%d" % i, 4))  # 80: more than compact_min too
        await wait_for_compactions(persister, 1)
        first, appended = sections(path)
        assert appended == []
        assert sorted(first) == sorted(stored(store).values())
        store.offer(rec(b"client-3", 99))
        await wait_for_batches(persister, 5)
        assert sections(path)[1] == [rec(b"client-3", 99).at_line]
        nursery.cancel_scope.cancel()
    assert rows(path) == stored(store)
    assert any(line.startswith(f"compacted {path}: 20 records from 80 lines") for line in log)


async def test_a_failed_compaction_is_logged_and_the_file_stays_in_use(
    tmp_path: Path,
) -> None:
    path = tmp_path / "Clark.records"
    log = Log()
    store = Store()
    persister = Persister(path, log=log, store=store, compact_min=10)
    store.on_change(persister.note)
    persister.allow_compaction()
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        statefile.tmp_path(path).mkdir()  # where the compacted file would go: not a file
        for sent in range(1, 3):
            for i in range(10):
                store.offer(rec(b"client-%d" % i, sent))
            await wait_for_batches(persister, sent)
        await log.wait_for(f"cannot compact {path}, going on with it as it is: ")
        for i in range(5):  # appended as before
            store.offer(rec(b"client-%d" % i, 3))
        await wait_for_batches(persister, 3)
        assert persister.statistics().compactions == 0
        statefile.tmp_path(path).rmdir()  # the next try, compact_min lines later, works
        for i in range(10):
            store.offer(rec(b"client-%d" % i, 4))
        await wait_for_compactions(persister, 1)
        nursery.cancel_scope.cancel()
    assert rows(path) == stored(store)
    assert sections(path)[1] == []


async def test_records_kept_while_a_compaction_runs_are_not_lost(tmp_path: Path) -> None:
    """A compaction gathers the store a slice of leaves at a time; records kept between
    two slices must reach the new file (replayed after the store's lines)."""
    path = tmp_path / "Clark.records"
    store = Store()
    log: list[str] = []
    persister = Persister(path, log=log.append, store=store, compact_min=1000, batch_interval=0.001)
    store.on_change(persister.note)
    persister.allow_compaction()
    rnd = random.Random(15)
    clients = [b"client-%d" % i for i in range(3000)]
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        sent = 0
        with trio.fail_after(10):
            while persister.statistics().compactions < 3:
                sent += 1
                for client in rnd.sample(clients, 200):
                    store.offer(rec(client, sent))
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert rows(path) == stored(store)
    assert sorted(load_records(path), key=lambda r: r.client) == sorted(
        store, key=lambda r: r.client
    )


async def test_the_file_is_synced_a_sync_interval_after_a_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "Clark.records"
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    persister = Persister(path, sync_interval=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        note(persister, rec(b"kiwi", 1))
        await wait_for_batches(persister, 1)
        assert synced == []  # not with every write

        async def one_sync() -> bool | None:
            await trio.sleep(0.01)
            return True if synced else None

        await poll("the write synced", one_sync, deadline=5)
        nursery.cancel_scope.cancel()
    assert len(synced) == 1  # nothing written since: nothing to sync at the stop


def test_a_file_of_the_sqlite_format_is_converted_once(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
    legacy = legacy_path(path)
    assert legacy == tmp_path / "Clark.sqlite3"
    conn = sqlite3.connect(legacy)
    with conn:
        conn.execute("CREATE TABLE records (client BLOB PRIMARY KEY, at_line BLOB NOT NULL)")
        conn.execute("CREATE TABLE journal (client BLOB NOT NULL, at_line BLOB NOT NULL)")
        conn.executemany(
            "INSERT INTO records VALUES (?, ?)",
            [(b"kiwi", rec(b"kiwi", 1).at_line), (b"pear", rec(b"pear", 1).at_line)],
        )
        conn.executemany(  # newer than records, oldest first
            "INSERT INTO journal VALUES (?, ?)",
            [(b"kiwi", rec(b"kiwi", 2).at_line), (b"kiwi", rec(b"kiwi", 3).at_line)],
        )
    conn.close()
    log: list[str] = []
    convert_legacy(path, log.append)
    assert rows(path) == {b"kiwi": rec(b"kiwi", 3).at_line, b"pear": rec(b"pear", 1).at_line}
    assert log == [
        f"converted 2 records from {legacy} to {path}; the old file is no longer used"
        " and can be removed"
    ]
    assert legacy.exists()  # left as it was
    convert_legacy(path, log.append)  # the records file is there: nothing to do
    assert len(log) == 1


async def test_unwritable_path_is_logged_and_retried_without_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    path = blocker / "Clark.records"
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
    path = tmp_path / "Clark.records"
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
    path = tmp_path / "Clark.records"
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
            pending=0, rows_written=1, batches_written=1, failures=0, compactions=0
        )
        nursery.cancel_scope.cancel()
    assert rows(path) == {b"kiwi": rec(b"kiwi", 2).at_line}
    assert log.lines == [  # the failed record went back only where nothing newer was
        f"cannot write records to {path}: disk full (simulated) (1 record pending, failure 1)",
        f"writing {path} works again after 1 failures",
    ]


async def test_stopping_with_an_unwritable_path_logs_the_loss(tmp_path: Path) -> None:
    path = tmp_path / "Clark.records"
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
    path = tmp_path / "Clark.records"
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
