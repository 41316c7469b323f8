"""The state file's format: `<state_dir>/<NAME>.sqlite3`, read and written whole.

The file holds two tables of (client, AT line) rows:

- `records(client BLOB PRIMARY KEY, at_line BLOB NOT NULL)`, one row per client;
- `journal(client BLOB NOT NULL, at_line BLOB NOT NULL)`, rows appended in the order
  the server kept them (by rowid), newer than `records` for the same client.

A server appends what it keeps to the journal (`append_records`) and folds the journal
into `records` every FOLD_ROWS rows and when it stops (`fold`): one sorted
`INSERT OR REPLACE ... SELECT` and a `DELETE`, in one transaction. Client ids hash all
over the primary key's B-tree, and rows upserted in the order they came cost 11.8 us of
CPU each (240,000 random clients in batches of 1,200), against 1.2 us for an append,
and 3.5 us per row all in all with a fold, in key order, every 48,000 rows. Readers
take both tables (`ROWS`, `load_records`): a client's journal rows come after its
`records` row, and the last one read is the newest.

Only the AT line is stored: it carries every field of a record (`parse_at` rebuilds
the Record), and keeping it byte for byte keeps WHATSAT's first line exact across a
restart. A server writes it through a Persister (herd_trio/persist.py) and loads it
with herd_trio/restore.py; the functions here are what both, and tests and tools,
share.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from pathlib import Path

from herd_trio.protocol import Record

# Pages of WAL between checkpoints (SQLite's default is 1,000, about 4 MB). Client ids
# hash all over the table, so a batch dirties pages everywhere, and a checkpoint copies
# each dirty page once however many batches changed it: at 10,000 pages (about 40 MB
# of WAL on disk) a row costs about a quarter less CPU and a third less time (13.0-13.9
# against 16.7-18.3 us of CPU; 300,000 random clients written in batches of 500).
WAL_CHECKPOINT_PAGES = 10_000
BUSY_TIMEOUT = 1.0  # seconds sqlite waits for a lock held by another connection

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records (client BLOB PRIMARY KEY, at_line BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS journal (client BLOB NOT NULL, at_line BLOB NOT NULL)",
)
UPSERT_ROWS = 256  # rows per INSERT statement at most (512 parameters): see upsert()
FOLD_ROWS = 65_536  # journal rows a server folds into `records` at once (~0.1-0.2 s)
# Every row of the file, `records` first, then the journal in the order it was written:
# the last row read for a client is its newest record.
ROWS = (
    "SELECT client, at_line FROM records"
    " UNION ALL SELECT client, at_line FROM (SELECT client, at_line FROM journal ORDER BY rowid)"
)
_FOLD = (
    "INSERT OR REPLACE INTO records (client, at_line)"
    " SELECT client, at_line FROM journal ORDER BY client, rowid"
)
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
            query = rows_query(conn)
            rows = conn.execute(query).fetchall() if query is not None else []
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        raise PersistError(f"cannot read records from {path}: {exc}") from exc
    newest = dict(rows)  # a client's last row is its newest record (ROWS)
    records, skipped = parse_rows(newest.items())
    if log is not None and skipped:  # the caller logs how many were loaded
        log(f"skipped {skipped} rows of {path} that are not valid AT lines")
    return records


def rows_query(conn: sqlite3.Connection) -> str | None:
    """The query for every row of the file (ROWS); None if it has no records table. A
    file written before the journal existed has only `records`."""
    tables = {
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('records', 'journal')"
        )
    }
    if "records" not in tables:
        return None
    return ROWS if "journal" in tables else "SELECT client, at_line FROM records"


def open_file(path: Path) -> sqlite3.Connection:
    """A connection to the state file at `path`, created (with its tables) if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


def commit_records(conn: sqlite3.Connection, rows: Iterable[tuple[bytes, bytes]]) -> None:
    """Write `rows` (client, AT line) into `records` in one transaction (rolled back if
    anything fails), replacing a client's row."""
    _transaction(conn, rows, upsert)


def append_records(conn: sqlite3.Connection, rows: Iterable[tuple[bytes, bytes]]) -> None:
    """Append `rows` (client, AT line) to the journal in one transaction (rolled back if
    anything fails); each must be newer than what the file holds for its client."""
    _transaction(conn, rows, _append)


def fold(conn: sqlite3.Connection) -> None:
    """Move the journal into `records` in one transaction: a client's newest row wins."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_FOLD)
        conn.execute("DELETE FROM journal")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def journal_rows(conn: sqlite3.Connection) -> int:
    """How many rows the journal holds (not folded yet)."""
    return int(conn.execute("SELECT count(*) FROM journal").fetchone()[0])


def _transaction(
    conn: sqlite3.Connection,
    rows: Iterable[tuple[bytes, bytes]],
    write: Callable[[sqlite3.Connection, Sequence[tuple[bytes, bytes]]], None],
) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        rest = iter(rows)
        while chunk := list(itertools.islice(rest, 4096)):  # any number, a slice at a time
            write(conn, chunk)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    """Store `records` in `path`'s records table in one transaction (blocking).

    For tests and benchmarks that need a state file of a given size quickly; a server
    writes through its Persister.
    """
    path = Path(path)
    try:
        conn = open_file(path)
        try:
            commit_records(conn, ((r.client, r.at_line) for r in records))
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        raise PersistError(f"cannot write records to {path}: {exc}") from exc


def upsert(conn: sqlite3.Connection, rows: Sequence[tuple[bytes, bytes]]) -> None:
    """Insert `rows` (client, AT line) into `records`, replacing a client's row if it has one.

    One statement per up to UPSERT_ROWS rows (256, 128, ... 1: a few statement texts,
    each prepared once), not executemany's one per row. Each statement is one step of
    SQLite, and sqlite3 lets go of the GIL for every step and takes it back after: a
    worker thread writing row by row beside a busy main thread handed the GIL back and
    forth about 20 times per row (a batch of 750 rows: ~15,000 context switches,
    against ~2,500 this way), and a row costs less CPU even alone (2.0-3.0 against
    2.7-3.5 us). In a loaded herd the difference is inside the noise.
    """
    _insert(conn, rows, _upsert_sql)


def _append(conn: sqlite3.Connection, rows: Sequence[tuple[bytes, bytes]]) -> None:
    """Append `rows` (client, AT line) to the journal, the statements as upsert's."""
    _insert(conn, rows, _append_sql)


def _insert(
    conn: sqlite3.Connection, rows: Sequence[tuple[bytes, bytes]], sql: Callable[[int], str]
) -> None:
    start = 0
    while start < len(rows):
        count = min(UPSERT_ROWS, 1 << ((len(rows) - start).bit_length() - 1))
        chunk = rows[start : start + count]
        conn.execute(sql(count), [field for row in chunk for field in row])
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


@functools.cache
def _append_sql(rows: int) -> str:
    # In rowid order, which is the order the rows were written in (ROWS reads it so).
    values = ", ".join(["(?, ?)"] * rows)
    return f"INSERT INTO journal (client, at_line) VALUES {values}"
