"""Durable records: each server keeps its store in `<state_dir>/<NAME>.sqlite3`.

With `state_dir` configured, a server reloads its records at start (in the
background, while it already serves: herd_trio/restore.py) and a `Persister` attached
to its store writes every record the store keeps, off the event loop, in batches.
Neighbours catch a restarted server up by digest, so persistence matters most when the
WHOLE herd restarts: then the files are the only copy.

The file holds one table, `records(client BLOB PRIMARY KEY, at_line BLOB NOT NULL)`.
Only the AT line is stored: it carries every field of a record (`parse_at` rebuilds
the Record), and keeping it byte for byte keeps WHATSAT's first line exact across a
restart.

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
  WAL_CHECKPOINT_PAGES pages of WAL; between them the kernel's own writeback (about
  30 s on Linux) bounds what an OS crash can take.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import NoReturn

import attrs
import trio

from herd_trio.backoff import Backoff
from herd_trio.log import plural
from herd_trio.protocol import Record
from herd_trio.store import Store

# Pages of WAL between checkpoints (SQLite's default is 1,000, about 4 MB). Client ids
# hash all over the table, so a batch dirties pages everywhere, and a checkpoint copies
# each dirty page once however many batches changed it: at 10,000 pages (about 40 MB
# of WAL on disk) a row costs about a quarter less CPU and a third less time (13.0-13.9
# against 16.7-18.3 us of CPU; 300,000 random clients written in batches of 500).
WAL_CHECKPOINT_PAGES = 10_000
BATCH_INTERVAL = 0.05  # seconds between batches: one transaction per 50 ms at most
# A failed write is retried after about 0.1 s, doubling up to about 5 s: a full disk
# is retried, not hammered.
RETRY = Backoff(initial=0.1, cap=5.0)
# A clean stop writes what is pending within this; PROTOCOL.md §5 gives the whole
# server 3 s to stop after SIGTERM, and a batch takes milliseconds.
FINAL_DEADLINE = 2.0
BUSY_TIMEOUT = 1.0  # seconds sqlite waits for a lock held by another connection
FAILURE_LOG_EVERY = 20  # while writes keep failing, log every 20th failure

_SCHEMA = "CREATE TABLE IF NOT EXISTS records (client BLOB PRIMARY KEY, at_line BLOB NOT NULL)"
UPSERT_ROWS = 256  # rows per INSERT statement at most (512 parameters): see upsert()
_SELECT = "SELECT client, at_line FROM records"
# The shape of a stored AT line's client time and coordinates (protocol.py's rules).
_TIME = re.compile(rb"[0-9]+(?:\.[0-9]+)?")
_COORDS = re.compile(rb"[+-][0-9]{1,2}(?:\.[0-9]+)?[+-][0-9]{1,3}(?:\.[0-9]+)?")


class PersistError(Exception):
    """The state file could not be read or written; the message names the file."""


def state_path(state_dir: str | Path, name: str) -> Path:
    """Where server `name` keeps its records."""
    return Path(state_dir) / f"{name}.sqlite3"


def connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    # check_same_thread=False: trio's worker threads differ from call to call; the
    # Persister's lock makes sure only one of them uses the connection at a time.
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    except BaseException:
        conn.close()
        raise
    return conn


def row_record(client: object, at_line: object) -> Record | None:
    """The record a state-file row holds, or None if the row is not an AT line for its key.

    The file holds only records this server accepted, so a row is checked for shape
    (an AT line for the row's client, canonical spacing, a valid time and coordinates)
    rather than parsed field by field as a peer's line is (`protocol.parse_at`): that
    halves the cost of a restart.
    """
    if not isinstance(at_line, bytes) or not isinstance(client, bytes):
        return None
    fields = at_line.split()
    if (
        len(fields) != 6
        or fields[0] != b"AT"
        or fields[3] != client
        or b" ".join(fields) != at_line
        or not _TIME.fullmatch(fields[5])
        or not _COORDS.fullmatch(fields[4])
    ):
        return None
    return Record(client, fields[4], Decimal(fields[5].decode("ascii")), fields[1], at_line)


def parse_rows(rows: Iterable[tuple[object, object]]) -> tuple[list[Record], int]:
    """The records of state-file `rows`, and how many rows were skipped as not valid."""
    records: list[Record] = []
    skipped = 0
    for client, at_line in rows:
        record = row_record(client, at_line)
        if record is None:
            skipped += 1
        else:
            records.append(record)
    return records, skipped


def load_records(path: str | Path, *, log: Callable[[str], None] | None = None) -> list[Record]:
    """Every record stored in `path`; [] if there is no such file yet.

    Blocking: call it from a thread (`trio.to_thread.run_sync`) or before `trio.run`.
    A server loads its file with herd_trio/restore.py instead, in chunks, while it
    serves; this is for tests and tools. Rows that are not a valid AT line for their
    client are skipped and counted (the count goes to `log`, the only thing logged
    here); a file that is not a readable records database raises PersistError, rather
    than letting the server start empty and overwrite it.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        conn = connect(path)
        try:
            tables = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'"
            ).fetchall()
            rows = conn.execute(_SELECT).fetchall() if tables else []
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        raise PersistError(f"cannot read records from {path}: {exc}") from exc
    records, skipped = parse_rows(rows)
    if log is not None and skipped:  # the caller logs how many were loaded
        log(f"skipped {skipped} rows of {path} that are not valid AT lines")
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    """Store `records` in `path` in one transaction, as a Persister would (blocking).

    For tests and benchmarks that need a state file of a given size quickly; a server
    writes through its Persister.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = connect(path)
        try:
            conn.execute(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            rest = iter(records)
            while chunk := list(itertools.islice(rest, 4096)):
                upsert(conn, [(r.client, r.at_line) for r in chunk])
            conn.execute("COMMIT")
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        raise PersistError(f"cannot write records to {path}: {exc}") from exc


def upsert(conn: sqlite3.Connection, rows: Sequence[tuple[bytes, bytes]]) -> None:
    """Insert `rows` (client, AT line), replacing a client's row if it has one.

    One statement per up to UPSERT_ROWS rows (256, 128, ... 1: a few statement texts,
    each prepared once), not executemany's one per row. Each statement is one step of
    SQLite, and sqlite3 lets go of the GIL for every step and takes it back after: a
    worker thread writing row by row beside a busy main thread handed the GIL back and
    forth about 20 times per row (a batch of 750 rows: ~15,000 context switches,
    against ~2,500 this way), and a row costs less CPU even alone (2.0-3.0 against
    2.7-3.5 us). In a loaded herd the difference is inside the noise.
    """
    start = 0
    while start < len(rows):
        count = min(UPSERT_ROWS, 1 << ((len(rows) - start).bit_length() - 1))
        chunk = rows[start : start + count]
        conn.execute(_upsert_sql(count), [field for row in chunk for field in row])
        start += count


@functools.cache
def _upsert_sql(rows: int) -> str:
    # The store only ever notifies records newer than the last one it notified for
    # that client, and batches are written one at a time in the order they were
    # taken, so the last write for a client is always its newest record: a plain
    # REPLACE is enough. Within one statement, too, a later row replaces an earlier
    # row of the same client.
    values = ", ".join(["(?, ?)"] * rows)
    return f"INSERT OR REPLACE INTO records (client, at_line) VALUES {values}"


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
    _pending: dict[bytes, Record] = attrs.field(factory=dict, init=False)
    _wake: trio.Event = attrs.field(factory=trio.Event, init=False)
    _db_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _conn: sqlite3.Connection | None = attrs.field(default=None, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _rows_written: int = attrs.field(default=0, init=False)
    _batches_written: int = attrs.field(default=0, init=False)
    _failures: int = attrs.field(default=0, init=False)
    # While the file is being loaded: the clients noted since the load began.
    _noted: set[bytes] | None = attrs.field(default=None, init=False)
    _from_file: bool = attrs.field(default=False, init=False)

    def note(self, record: Record) -> None:
        """Queue `record` for writing (sync, O(1)); a later note for its client replaces it."""
        if (noted := self._noted) is not None:
            if self._from_file:
                # The file holds this record already, unless the client was noted during
                # the load: then an older record of it may be pending or being written.
                if record.client not in noted:
                    return
            else:
                noted.add(record.client)
        self._pending[record.client] = record
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
            for client, record in batch.items():
                self._pending.setdefault(client, record)
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
        await trio.to_thread.run_sync(self._sync, {}, abandon_on_cancel=True)

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

    def _sync(self, batch: dict[bytes, Record]) -> None:
        """In a worker thread: open if needed, write `batch` in one transaction."""
        with self._db_lock:
            try:
                if batch or not self._closing:
                    conn = self._connection()
                    if batch:
                        self.before_write()
                        self._write(conn, batch)
            except (sqlite3.Error, OSError) as exc:
                self._drop_connection()  # the next attempt starts from a fresh open
                raise PersistError(f"cannot write records to {self.path}: {exc}") from exc
            finally:
                if self._closing:
                    self._drop_connection()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            try:
                conn.execute(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    @staticmethod
    def _write(conn: sqlite3.Connection, batch: dict[bytes, Record]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            upsert(conn, [(r.client, r.at_line) for r in batch.values()])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

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
