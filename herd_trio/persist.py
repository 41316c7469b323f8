"""Durable records: each server keeps its store in `<state_dir>/<NAME>.sqlite3`.

With `state_dir` configured, a server reloads its records at start (in the
background, while it already serves: herd_trio/restore.py) and a `Persister` attached
to its store writes every record the store keeps, off the event loop, in batches.
Neighbours catch a restarted server up by digest, so persistence matters most when the
WHOLE herd restarts: then the files are the only copy.

The file's format, and reading and writing it whole, are herd_trio/statefile.py's.

Durability (WAL journal, `synchronous=NORMAL`):

- A record is on its way to disk within about `batch_interval` (plus one write) of
  the store keeping it. A clean stop (SIGINT/SIGTERM, i.e. cancellation) writes
  everything still pending before the file is closed, so it loses nothing.
- A process crash (SIGKILL, a bug) loses only the batch not yet committed: every
  committed transaction is in the WAL file, and the OS writes it out even though the
  process is gone.
- An OS crash or power cut can also lose the last commits: with NORMAL the WAL is
  fsynced at checkpoints, not at every commit. The file stays consistent (never
  half a batch); FULL would fsync every batch, which costs a disk flush per 50 ms
  for records the rest of the herd usually still holds. Checkpoints come every
  statefile.WAL_CHECKPOINT_PAGES pages of WAL; between them the kernel's own
  writeback (about 30 s on Linux) bounds what an OS crash can take.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import NoReturn

import attrs
import trio

from herd_trio.backoff import Backoff
from herd_trio.log import plural
from herd_trio.statefile import (
    FOLD_ROWS,
    PersistError,
    append_records,
    fold,
    journal_rows,
    open_file,
)
from herd_trio.store import Store

BATCH_INTERVAL = 0.05  # seconds between batches: one transaction per 50 ms at most
# A failed write is retried after about 0.1 s, doubling up to about 5 s: a full disk
# is retried, not hammered.
RETRY = Backoff(initial=0.1, cap=5.0)
# A clean stop writes what is pending within this; PROTOCOL.md §5 gives the whole
# server 3 s to stop after SIGTERM, and a batch takes milliseconds.
FINAL_DEADLINE = 2.0
FAILURE_LOG_EVERY = 20  # while writes keep failing, log every 20th failure


@attrs.frozen
class PersisterStatistics:
    """What a Persister has done so far."""

    pending: int  # records noted but not yet committed
    rows_written: int  # rows committed (a client noted 10 times in one batch counts once)
    batches_written: int  # transactions committed
    failures: int  # failed writes (each is retried)


def _ignore(message: str) -> None:
    pass


def _no_hook() -> None:
    pass


@attrs.define(eq=False)
class Persister:
    """Writes the records a Store keeps to `path`, in batches, from a worker thread.

    Attach with `store.on_change(persister.note)` and run `run()` in the server's
    nursery, or use `open_persister`, which does both. Records loaded from the file
    are offered to the store inside `from_file()`, so they are not written back.

    The connection is opened, used and closed only inside worker threads, one at a
    time (`_db_lock`: a thread abandoned on cancel may still hold it). Only `run()`
    writes, one batch at a time, in the order the batches were taken. A failed write
    (disk full, read-only, file removed) never raises out of `run()`: it is logged
    through `log`, its records go back to the pending set (a newer note for the same
    client wins) and are retried after `retry.delay(...)`. Pending records are
    bounded by the number of clients (one entry per client).

    `before_write` runs in the worker thread, with the connection open, just before
    each batch is written; an OSError or sqlite3.Error it raises fails that write
    like a disk error would. Tests use it to hold or fail writes.
    """

    path: Path = attrs.field(converter=Path)
    log: Callable[[str], None] = _ignore
    batch_interval: float = BATCH_INTERVAL
    retry: Backoff = RETRY
    final_deadline: float = FINAL_DEADLINE
    log_every: int = FAILURE_LOG_EVERY
    before_write: Callable[[], None] = _no_hook
    _pending: dict[bytes, bytes] = attrs.field(factory=dict, init=False)  # client -> AT line
    _wake: trio.Event = attrs.field(factory=trio.Event, init=False)
    _db_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    fold_rows: int = FOLD_ROWS  # journal rows folded into the records table at once
    _conn: sqlite3.Connection | None = attrs.field(default=None, init=False)
    _journal: int = attrs.field(default=0, init=False)  # rows appended since the last fold
    _closing: bool = attrs.field(default=False, init=False)
    _rows_written: int = attrs.field(default=0, init=False)
    _batches_written: int = attrs.field(default=0, init=False)
    _failures: int = attrs.field(default=0, init=False)
    # While the file is being loaded: the clients noted since the load began.
    _noted: set[bytes] | None = attrs.field(default=None, init=False)
    _from_file: bool = attrs.field(default=False, init=False)

    def note(self, client: bytes, at_line: bytes) -> None:
        """Queue `client`'s record (its AT line) for writing (sync, O(1)); a later note
        for the client replaces it. A store listener (Store.on_change)."""
        if (noted := self._noted) is not None:
            if self._from_file:
                # The file holds this record already, unless the client was noted during
                # the load: then an older record of it may be pending or being written.
                if client not in noted:
                    return
            else:
                noted.add(client)
        self._pending[client] = at_line
        self._wake.set()

    def track_clients(self, on: bool) -> None:
        """Start (True) or stop remembering which clients are noted: on while loading."""
        self._noted = set() if on else None

    @contextmanager
    def from_file(self) -> Iterator[None]:
        """Records the store keeps inside this block came from the file: not written back.

        Only with `track_clients(True)`; the block must not checkpoint.
        """
        self._from_file = True
        try:
            yield
        finally:
            self._from_file = False

    def statistics(self) -> PersisterStatistics:
        """Counters for tests and diagnostics."""
        return PersisterStatistics(
            pending=len(self._pending),
            rows_written=self._rows_written,
            batches_written=self._batches_written,
            failures=self._failures,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Write pending records until cancelled; then write what is left and close.

        Reports started once the file is open, or once opening it failed and was
        logged (the server serves on; records wait in memory and are retried).
        """
        try:
            try:
                await trio.to_thread.run_sync(self._sync, {}, abandon_on_cancel=True)
            except PersistError as exc:
                self._failed(exc)
            task_status.started()
            while True:
                await self._wake.wait()
                try:
                    await self._write_pending()
                except PersistError as exc:
                    self._failed(exc)
                    await trio.sleep(self.retry.delay(self._failures - 1))
                    continue
                if self._failures:
                    self.log(f"writing {self.path} works again after {self._failures} failures")
                    self._failures = 0
                await trio.sleep(self.batch_interval)  # let the next batch gather
        finally:
            with trio.move_on_after(self.final_deadline, shield=True) as scope:
                await self._write_and_close()
            if scope.cancelled_caught:
                self._give_up()

    def _failed(self, exc: PersistError) -> None:
        self._failures += 1
        if (self._failures - 1) % self.log_every == 0:  # the first, then every log_every-th
            self.log(
                f"{exc} ({plural(len(self._pending), 'record')} pending, failure {self._failures})"
            )

    async def _write_pending(self) -> None:
        # Called only by run() and, after its loop has stopped, by its finally: never
        # twice at once, so batches go out in the order they were taken.
        batch, self._pending = self._pending, {}
        self._wake = trio.Event()
        if not batch:
            return
        try:
            await trio.to_thread.run_sync(self._sync, batch, abandon_on_cancel=True)
        except BaseException:
            # Failed, or abandoned on cancel (the thread may still commit it, which
            # a rewrite makes harmless). A newer note for the same client wins.
            for client, at_line in batch.items():
                self._pending.setdefault(client, at_line)
            if self._pending:
                self._wake.set()
            raise
        self._rows_written += len(batch)
        self._batches_written += 1

    async def _write_and_close(self) -> None:
        # From here on, whichever thread uses the connection last closes it; a
        # record noted while this runs gets its own (reopening) write.
        self._closing = True
        failed: PersistError | None = None
        while self._pending and failed is None:
            try:
                await self._write_pending()
            except PersistError as exc:
                failed = exc
        if failed is not None:
            self.log(f"stopping with {plural(len(self._pending), 'record')} not saved: {failed}")
        try:  # folds the journal if the last batch did not (or there was none)
            await trio.to_thread.run_sync(self._sync, {}, abandon_on_cancel=True)
        except PersistError as exc:  # the journal keeps its rows: nothing is lost
            self.log(f"stopping without folding the journal of {self.path}: {exc}")

    def _give_up(self) -> None:
        """The final write overran its deadline: stop waiting, leave the thread to close."""
        self.log(
            f"stopping: {self.path} not written within {self.final_deadline:g} s, "
            f"{plural(len(self._pending), 'record')} may be lost"
        )
        if self._db_lock.acquire(blocking=False):
            try:
                self._drop_connection()
            finally:
                self._db_lock.release()
        elif (conn := self._conn) is not None:
            # A worker still holds it and will close it (_closing is set); make it quick.
            with contextlib.suppress(sqlite3.Error):
                conn.interrupt()

    def _sync(self, batch: dict[bytes, bytes]) -> None:
        """In a worker thread: open if needed, append `batch` to the journal in one
        transaction; fold the journal into the records table every `fold_rows` rows and
        when closing (statefile.py says why)."""
        with self._db_lock:
            try:
                if batch or not self._closing or self._journal:
                    conn = self._connection()
                    if batch:
                        self.before_write()
                        append_records(conn, batch.items())
                        self._journal += len(batch)
                    # Not when the file opens: the server starts in the meantime.
                    if (batch and self._journal >= self.fold_rows) or (
                        self._closing and self._journal
                    ):
                        fold(conn)
                        self._journal = 0
            except (sqlite3.Error, OSError) as exc:
                self._drop_connection()  # the next attempt starts from a fresh open
                raise PersistError(f"cannot write records to {self.path}: {exc}") from exc
            finally:
                if self._closing:
                    self._drop_connection()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = open_file(self.path)
            try:
                self._journal = journal_rows(conn)  # left by a crash, or by a failed fold
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


@asynccontextmanager
async def open_persister(
    path: str | Path, store: Store, *, log: Callable[[str], None] = _ignore
) -> AsyncIterator[Persister]:
    """Keep every record `store` keeps in `path` (loading it is herd_trio/restore.py's job).

    Use it around everything that feeds the store (listeners, links, the load): on
    exit, those are done, so the final write (bounded by FINAL_DEADLINE) sees every
    record.
    """
    persister = Persister(path, log=log)
    store.on_change(persister.note)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        try:
            yield persister
        finally:
            nursery.cancel_scope.cancel(reason="persister closing")
