"""Filling the store from the state file while the server already serves.

A server with `state_dir` opens its listeners first and loads its file in the
background (`Restore.run`): a worker thread reads the rows in chunks of CHUNK (SQLite
releases the GIL while it steps through the table), and the event loop parses and
offers them to the store SLICE at a time, with a checkpoint after each slice (a few
hundred microseconds of work), so no client waits behind the load for long. Parsing
on the loop rather than in the thread keeps the loop from waiting for the GIL (up to
the 5 ms switch interval each time). Loading a million records takes a few seconds;
until it is done:

- A batch of client lines first looks up the clients it names in the file
  (`Restore.ensure`: one indexed query, on the loop, as a thread's round trip would
  cost more than the query, plus the journal rows a crash left, if any, read into
  memory once: after a clean stop there are none; also for clients the store holds,
  which may be an older record from a peer), so a WHATSAT for a stored client is
  answered, never `?`, and an IAMAT older than the stored record gets the stored
  record's AT line, as it would after the load.
- Records from peers are offered to the store as usual: last writer wins, so the order
  in which loaded and flooded records meet does not matter.
- The server starts no anti-entropy sync and answers none (links.py): its store would
  look as if it lacked nearly everything.
- /readyz says not ready (`Stats.state_loaded`).

Loaded records are on disk already, so the persister does not write them back
(`Persister.from_file`).

Rows are checked for shape (an AT line for the row's client, canonical spacing, a
valid time and coordinates), not re-validated field by field as a peer's line is:
the file holds only records this server accepted. Building the Record (a Decimal and
an attrs instance) is most of the cost; the time spent is logged when the load ends.
"""

from __future__ import annotations

import contextlib
import gc
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import attrs
import trio

from herd_trio.log import plural
from herd_trio.persist import Persister
from herd_trio.protocol import Record
from herd_trio.statefile import ROWS, PersistError, connect, parse_rows, rows_query
from herd_trio.store import Store

CHUNK = 8192  # rows a worker thread reads per call
SLICE = 64  # rows parsed and offered to the store between two checkpoints (about 0.3 ms)
LOOKUP_BATCH = 500  # clients per lookup query (SQLite's variable limit is far above)
_COMMANDS = frozenset((b"IAMAT", b"WHATSAT", b"WHATISAT"))


_loads = 0  # loads in progress in this process (`--all` runs several servers in one)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while loading, then freeze what was loaded.

    Loading allocates millions of objects that all survive, and CPython's full
    collections scan every tracked object: on a million records that is ten or so
    pauses of up to a quarter of a second each (1.1 s in all, measured), during which
    no client is answered. Records hold no cycles (reference counting frees them), so
    nothing is lost by pausing; `gc.freeze()` at the end moves what is loaded out of
    the collector's sight, so later full collections do not scan it either.
    """
    global _loads  # one counter per process, like the collector it pauses
    if _loads == 0 and not gc.isenabled():  # someone else turned it off: leave it alone
        yield
        return
    _loads += 1
    gc.disable()
    try:
        yield
    finally:
        _loads -= 1
        if _loads == 0:
            gc.freeze()
            gc.enable()


def clients_named(lines: Iterable[bytes]) -> list[bytes]:
    """The client ids that client lines name (IAMAT and WHATSAT), in order; junk is skipped."""
    out: list[bytes] = []
    for line in lines:
        fields = line.split()
        if len(fields) == 4 and fields[0] in _COMMANDS:
            out.append(fields[1])
    return out


@attrs.define(eq=False)
class StateReader:
    """Blocking reads of a state file: the rows in chunks (from a worker thread), and
    lookups by client (indexed, quick). Each has its own connection (the bulk read holds
    one statement open for the whole load, a consistent snapshot), used under its own
    lock, so closing never races a thread abandoned on cancel.
    """

    path: Path
    _bulk: sqlite3.Connection | None = attrs.field(default=None, init=False)
    _rows: sqlite3.Cursor | None = attrs.field(default=None, init=False)
    _point: sqlite3.Connection | None = attrs.field(default=None, init=False)
    _bulk_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _point_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    # The journal's last rowid when the file was opened (0: none), for lookups: rows
    # appended since are records the store kept in this run (and if a fold emptied the
    # journal meanwhile, rowids start again at 1: such rows are harmless, as old news).
    _journal_end: int = attrs.field(default=0, init=False)

    def open(self) -> bool:
        """Open the file; False if there is no file or no records table (nothing to load).

        PersistError if it exists but is not a readable records database.
        """
        if not self.path.exists():
            return False
        try:
            self._bulk = connect(self.path)
            query = rows_query(self._bulk)
            if query is None:
                return False
            if query == ROWS:  # the rows a crash (or a failed fold) left in the journal
                self._journal_end = (
                    self._bulk.execute("SELECT max(rowid) FROM journal").fetchone()[0] or 0
                )
            self._rows = self._bulk.execute(query)  # one snapshot of both tables
            self._point = connect(self.path)
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise PersistError(f"cannot read records from {self.path}: {exc}") from exc
        return True

    def next_rows(self, size: int = CHUNK) -> list[tuple[object, object]]:
        """The next `size` rows ([] at the end); parsing them is the caller's job."""
        with self._bulk_lock:
            if self._rows is None or self._closed:
                return []
            try:
                rows: list[tuple[object, object]] = self._rows.fetchmany(size)
            except sqlite3.Error as exc:
                raise PersistError(f"cannot read records from {self.path}: {exc}") from exc
            finally:
                if self._closed:  # closed while this thread was reading (abandoned)
                    self._close_bulk()
            return rows

    def lookup(self, clients: list[bytes]) -> list[Record]:
        """The stored records of those of `clients` the records table holds (invalid rows
        left out); `journal` has the rest."""
        found: list[Record] = []
        with self._point_lock:
            if self._point is None or self._closed:
                return found
            try:
                for start in range(0, len(clients), LOOKUP_BATCH):
                    batch = clients[start : start + LOOKUP_BATCH]
                    marks = ",".join("?" * len(batch))
                    query = f"SELECT client, at_line FROM records WHERE client IN ({marks})"
                    found += parse_rows(self._point.execute(query, batch).fetchall())[0]
            except sqlite3.Error as exc:
                raise PersistError(f"cannot read records from {self.path}: {exc}") from exc
        return found

    def journal(self) -> dict[bytes, bytes]:
        """The journal rows the file held when opened (a crash's, or a failed fold's), the
        newest per client; {} if none. Blocking: from a worker thread. The journal has no
        index, so lookups use this instead of a scan each (65,536 rows: ~70 ms once,
        against ~10 ms for every lookup)."""
        with self._point_lock:
            if self._point is None or self._closed or not self._journal_end:
                return {}
            try:
                rows = self._point.execute(
                    "SELECT client, at_line FROM journal WHERE rowid <= ? ORDER BY rowid",
                    (self._journal_end,),
                )
                return dict(rows)
            except sqlite3.Error as exc:
                raise PersistError(f"cannot read records from {self.path}: {exc}") from exc

    @property
    def has_journal(self) -> bool:
        """True if the file held journal rows when opened."""
        return self._journal_end > 0

    def close(self) -> None:
        """Close both connections; one a worker thread still uses closes when it is done."""
        self._closed = True
        if self._bulk_lock.acquire(blocking=False):
            try:
                self._close_bulk()
            finally:
                self._bulk_lock.release()
        if self._point_lock.acquire(blocking=False):
            try:
                if self._point is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self._point.close()
                    self._point = None
            finally:
                self._point_lock.release()

    def _close_bulk(self) -> None:
        conn, self._bulk, self._rows = self._bulk, None, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


async def _read_rows(
    reader: StateReader, send: trio.MemorySendChannel[list[tuple[object, object]]]
) -> None:
    with send:
        while rows := await trio.to_thread.run_sync(reader.next_rows, abandon_on_cancel=True):
            await send.send(rows)


def _ignore(message: str) -> None:
    pass


@attrs.define(eq=False)
class Restore:
    """Whether the store is still being filled from the state file; a server without
    `state_dir` has nothing to load, so the default is done.
    """

    store: Store | None = None
    persister: Persister | None = None
    reader: StateReader | None = None
    log: Callable[[str], None] = _ignore
    done: bool = True
    _finished: trio.Event = attrs.field(factory=trio.Event, init=False)
    _journal: dict[bytes, bytes] | None = attrs.field(default=None, init=False)  # read once
    _journal_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    lookups: int = attrs.field(default=0, init=False)  # clients looked up while loading

    @classmethod
    async def open(cls, path: Path, store: Store, log: Callable[[str], None]) -> Restore:
        """Open `path` for loading into `store` by `run()`; done at once if there is no
        file or no records table. PersistError if the file cannot be read.

        `attach` the persister writing `path` before anything else offers to the store.
        """
        reader = StateReader(path)
        if not await trio.to_thread.run_sync(reader.open):
            reader.close()
            return cls(store, None, None, log, done=True)
        return cls(store, None, reader, log, done=False)

    def attach(self, persister: Persister) -> None:
        """The persister writing the file: from now until the load ends, it notes which
        clients it is told about, so that records loaded later are written back only
        for those (an older record of theirs may be on its way to disk)."""
        self.persister = persister
        if not self.done:
            persister.track_clients(True)

    async def wait(self) -> None:
        """Return once the store holds everything the file held."""
        if not self.done:
            await self._finished.wait()

    async def run(self) -> None:
        """Load the file into the store, in chunks; logs the start and the end.

        A read error part way (the file changed under us, a disk error) is logged and
        ends the load: the server carries on with what it has and anti-entropy fetches
        the rest from its neighbours.
        """
        reader, store, persister = self.reader, self.store, self.persister
        if self.done or reader is None or store is None or persister is None:
            self._finish()
            return
        self.log(f"loading records from {reader.path}")
        began = trio.current_time()
        # A worker thread reads the next rows (SQLite releases the GIL while it steps
        # through the table) while the loop parses and offers these, a slice at a time.
        send, receive = trio.open_memory_channel[list[tuple[object, object]]](1)
        loaded = skipped = 0
        try:
            with receive, _collector_paused():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_read_rows, reader, send)
                    async for rows in receive:
                        for start in range(0, len(rows), SLICE):
                            records, bad = parse_rows(rows[start : start + SLICE])
                            loaded, skipped = loaded + len(records), skipped + bad
                            with persister.from_file():
                                for record in records:
                                    store.offer(record)
                            await trio.lowlevel.checkpoint()
        except* PersistError as group:
            exc = group.exceptions[0]
            self.log(f"{exc}; serving the {plural(len(store), 'record')} held so far")
        finally:
            persister.track_clients(False)
            reader.close()
        if skipped:
            self.log(f"skipped {skipped} rows of {reader.path} that are not valid AT lines")
        took = trio.current_time() - began
        self.log(
            f"{plural(loaded, 'record')} loaded from {reader.path} in {took:.3f} s"
            f" ({plural(len(store), 'client')} held)"
        )
        self._finish()

    def close(self) -> None:
        """Close the file (a load still running closes it itself)."""
        if self.reader is not None:
            self.reader.close()

    def _finish(self) -> None:
        self.done = True
        self._finished.set()
        self._journal = {}  # no more lookups

    async def _read_journal(self, reader: StateReader) -> dict[bytes, bytes]:
        """The journal rows the file held at open, read in a worker thread the first time
        a lookup needs them (client lines wait for it meanwhile, not the loop)."""
        async with self._journal_lock:
            if self._journal is None:
                self._journal = await trio.to_thread.run_sync(
                    reader.journal, abandon_on_cancel=True
                )
        return self._journal

    async def ensure(self, lines: Iterable[bytes]) -> None:
        """While loading: offer the store the file's records of the clients `lines` name,
        so that they are answered as they would be after the load. Returns at once once
        loaded.

        Also for clients the store holds already: what it holds may be an older record
        a peer sent before the load reached the file's newer one.
        """
        store, persister, reader = self.store, self.persister, self.reader
        if self.done or store is None or persister is None or reader is None:
            return
        named = list(dict.fromkeys(clients_named(lines)))
        if not named:
            return
        self.lookups += len(named)
        try:
            # On the loop: an indexed read of a few rows costs less than a thread's round trip.
            found = reader.lookup(named)
            if reader.has_journal:  # newer than the records table's rows
                journal = await self._read_journal(reader)
                found += parse_rows((c, journal[c]) for c in named if c in journal)[0]
        except PersistError as exc:
            self.log(f"{exc}; waiting for the load instead")
            await self.wait()
            return
        with persister.from_file():
            for record in found:
                store.offer(record)
