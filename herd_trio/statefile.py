"""The state file's format: `<state_dir>/<NAME>.records`, a log of AT lines.

The file is text, one AT line per LF-terminated line, in two sections after a header:

- the header, HEADER_BYTES long: `herd_trio records 1 sorted=<20 digits>\\n`, the
  length in bytes of the sorted section that follows it;
- the sorted section: one line per client, in the order of the client's leaf in the
  reconciliation tree (`leaf_of`: the top 16 bits of its key), written whole when the
  file is compacted;
- the appended section: the lines the server kept since, in the order it kept them.

A client's last line in the file is its newest record: a server only appends a record
that superseded the one it held, and a compaction writes the store as it is and then
every record kept since the compaction began (herd_trio/persist.py). A line without
its final LF at the end of the file is a write cut short by a crash: readers skip it
and the writer cuts it off before it appends.

Why not a database: a record is written once when kept (its share of one write of the
batch's lines, about 0.02 us) and about once more when the file is compacted (the
store's lines in leaf order, when the appended section has grown to as many lines as
the store holds clients). SQLite, with a journal table folded into a keyed table, cost
3.4-4.6 us of CPU per record per server (docs/performance.md), a fifth of a herd's CPU
per update. The leaf order lets a restarting server look a client up in the sorted
section by bisection (herd_trio/restore.py) while it loads the rest.

Only the AT line is stored: it carries every field of a record (`line_record` rebuilds
the Record), and keeping it byte for byte keeps WHATSAT's first line exact across a
restart. Files of the SQLite format that came before (`<NAME>.sqlite3`) are converted
once, when a server opens its state (`convert_legacy`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from pathlib import Path

from herd_trio.protocol import Record
from herd_trio.store import leaf_of

MAGIC = b"herd_trio records 1 sorted="
HEADER_BYTES = len(MAGIC) + 21  # 20 digits and an LF
SUFFIX = ".records"
LEGACY_SUFFIX = ".sqlite3"
TMP_SUFFIX = ".tmp"  # a compaction's file until it is renamed into place
READ_CHUNK = 1 << 20  # bytes read at a time
# The shape of a stored AT line's client time and coordinates (protocol.py's rules).
_TIME = re.compile(rb"[0-9]+(?:\.[0-9]+)?")
_COORDS = re.compile(rb"[+-][0-9]{1,2}(?:\.[0-9]+)?[+-][0-9]{1,3}(?:\.[0-9]+)?")


class PersistError(Exception):
    """The state file could not be read or written; the message names the file."""


def state_path(state_dir: str | Path, name: str) -> Path:
    """Where server `name` keeps its records."""
    return Path(state_dir) / f"{name}{SUFFIX}"


def legacy_path(path: Path) -> Path:
    """Where the SQLite file that `path` replaces would be."""
    return path.with_suffix(LEGACY_SUFFIX)


def tmp_path(path: Path) -> Path:
    """Where a compaction writes the file that replaces `path`."""
    return path.with_name(path.name + TMP_SUFFIX)


def header(sorted_bytes: int) -> bytes:
    """The header of a file whose sorted section is `sorted_bytes` long."""
    return b"%s%020d\n" % (MAGIC, sorted_bytes)


def parse_header(data: bytes, path: Path, size: int) -> int:
    """The sorted section's length from a file's first HEADER_BYTES; PersistError if
    they are not a header or the section would run past the file's `size`."""
    digits = data[len(MAGIC) : HEADER_BYTES - 1]
    if (
        len(data) != HEADER_BYTES
        or not data.startswith(MAGIC)
        or data[-1:] != b"\n"
        or not digits.isdigit()
        or HEADER_BYTES + int(digits) > size
    ):
        raise PersistError(f"{path} is not a herd_trio records file")
    return int(digits)


def line_record(line: bytes) -> Record | None:
    """The record a stored line holds, or None if the line is not an AT line.

    The file holds only records this server accepted, so a line is checked for shape
    (six fields, canonical spacing, a valid time and coordinates) rather than parsed
    field by field as a peer's line is (`protocol.parse_at`): that halves the cost of
    a restart.
    """
    fields = line.split()
    if (
        len(fields) != 6
        or fields[0] != b"AT"
        or b" ".join(fields) != line
        or not _TIME.fullmatch(fields[5])
        or not _COORDS.fullmatch(fields[4])
    ):
        return None
    return Record(fields[3], fields[4], Decimal(fields[5].decode("ascii")), fields[1], line)


def client_of(line: bytes) -> bytes:
    """The client field of a stored line (b"" if it has too few fields)."""
    fields = line.split(b" ", 4)
    return fields[3] if len(fields) == 5 else b""


def parse_lines(lines: Iterable[bytes]) -> tuple[list[Record], int]:
    """The records of stored `lines`, and how many were skipped as not valid."""
    records: list[Record] = []
    skipped = 0
    for line in lines:
        record = line_record(line)
        if record is None:
            skipped += 1
        else:
            records.append(record)
    return records, skipped


def complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """The LF-terminated lines at the start of `data` (without their LFs), and how many
    bytes they take; what follows the last LF is left for the next read."""
    end = data.rfind(b"\n") + 1
    if not end:
        return [], 0
    return data[: end - 1].split(b"\n"), end


def read_lines(fd: int, start: int, stop: int) -> Iterator[list[bytes]]:
    """The complete lines of file `fd` between offsets `start` (a line's start) and
    `stop`, a chunk of about READ_CHUNK bytes at a time; an unfinished last line is
    left out. Blocking; OSError if a read fails."""
    rest = b""
    offset = start
    while offset < stop:
        data = os.pread(fd, min(READ_CHUNK, stop - offset), offset)
        if not data:
            break  # the file is shorter than it was: what is there has been read
        offset += len(data)
        data = rest + data
        lines, used = complete_lines(data)
        rest = data[used:]
        if lines:
            yield lines


def open_header(fd: int, path: Path) -> tuple[int, int]:
    """(size, end of the sorted section) of the records file open as `fd`;
    PersistError if it is empty or not a records file."""
    size = os.fstat(fd).st_size
    if size == 0:  # not ours: written whole, a records file is never empty
        raise PersistError(f"{path} is empty, not a herd_trio records file")
    return size, HEADER_BYTES + parse_header(os.pread(fd, HEADER_BYTES, 0), path, size)


def newest_lines(fd: int, start: int, stop: int) -> tuple[dict[bytes, bytes], int]:
    """Each client's last whole line of file `fd` between `start` and `stop`, and how
    many lines there had no client field. Blocking; OSError if a read fails."""
    newest: dict[bytes, bytes] = {}
    junk = 0
    for lines in read_lines(fd, start, stop):
        for line in lines:
            client = client_of(line)
            if client:
                newest[client] = line
            else:
                junk += 1
    return newest, junk


def open_for_append(path: Path) -> tuple[int, int, int]:
    """(fd, end, lines) of the records file at `path`, opened for writing, made empty
    if there is none: `end` is where its last whole line ends (a line a crash cut short
    is cut off), `lines` how many lines follow its sorted section. A compaction's file
    that a crash left is removed. Blocking; OSError or PersistError."""
    with contextlib.suppress(OSError):  # if it stays, the next compaction says why
        os.unlink(tmp_path(path))
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        write_file(path, [])
        fd = os.open(path, os.O_RDWR)
    try:
        size, start = open_header(fd, path)
        end, count, offset = start, 0, start
        while offset < size:
            data = os.pread(fd, min(READ_CHUNK, size - offset), offset)
            if not data:
                break
            if found := data.count(b"\n"):
                count += found
                end = offset + data.rfind(b"\n") + 1
            offset += len(data)
        if end < size:
            os.ftruncate(fd, end)
    except BaseException:
        os.close(fd)
        raise
    return fd, end, count


def datasync(fd: int) -> None:
    """fdatasync where the OS has it (Linux), else fsync (macOS)."""
    (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)


def read_all(path: Path) -> dict[bytes, bytes]:
    """Every client's newest line in the file at `path` ({} if there is no file).

    Blocking. PersistError if the file cannot be read or is not a records file. For
    tools, tests and benchmarks; a server loads its file with herd_trio/restore.py, in
    chunks, while it serves.
    """
    return _read_newest(path)[0]


def _read_newest(path: Path) -> tuple[dict[bytes, bytes], int]:
    """read_all's lines, and how many lines it left out for having no client field."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}, 0
    except OSError as exc:
        raise PersistError(f"cannot read records from {path}: {exc}") from exc
    try:
        size, _ = open_header(fd, path)
        return newest_lines(fd, HEADER_BYTES, size)
    except OSError as exc:
        raise PersistError(f"cannot read records from {path}: {exc}") from exc
    finally:
        os.close(fd)


def load_records(path: str | Path, *, log: Callable[[str], None] | None = None) -> list[Record]:
    """Every record stored in `path`; [] if there is no such file yet.

    Blocking: call it from a thread (`trio.to_thread.run_sync`) or before `trio.run`.
    Lines that are not a valid AT line are skipped and counted (the count goes to
    `log`, the only thing logged here); a file that is not a records file raises
    PersistError, rather than letting the server start empty and overwrite it.
    """
    path = Path(path)
    newest, junk = _read_newest(path)
    records, skipped = parse_lines(newest.values())
    skipped += junk
    if log is not None and skipped:  # the caller logs how many were loaded
        log(f"skipped {skipped} lines of {path} that are not valid AT lines")
    return records


def sorted_lines(lines: Iterable[bytes]) -> list[bytes]:
    """`lines` (one per client) in the sorted section's order."""
    return sorted(lines, key=lambda line: leaf_of(client_of(line)))


def write_file(path: Path, lines: Iterable[bytes]) -> None:
    """Replace the file at `path` with one whose sorted section holds `lines` (in the
    sorted section's order already, one per client), atomically: written beside it,
    synced, renamed into place. Blocking; OSError if anything fails (the old file, if
    any, is then untouched)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_tmp(path)
    try:
        offset = HEADER_BYTES
        chunk: list[bytes] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) >= 8192:
                offset += write_lines(fd, chunk, offset)
                chunk = []
        seal(fd, offset + write_lines(fd, chunk, offset))
    except BaseException:
        discard_tmp(fd, path)
        raise
    os.close(fd)
    os.replace(tmp_path(path), path)
    sync_dir(path)


def write_lines(fd: int, lines: list[bytes], offset: int) -> int:
    """Write `lines`, each with its LF, at `offset`; the bytes written."""
    if not lines:
        return 0
    data = b"\n".join(lines) + b"\n"
    write_all(fd, data, offset)
    return len(data)


def write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite all of `data` at `offset` (a short write is continued); OSError if not."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def open_tmp(path: Path) -> int:
    """A new, empty file for the one that replaces `path` (`tmp_path`), open to write."""
    return os.open(tmp_path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def seal(fd: int, sorted_end: int) -> None:
    """Give the file open as `fd` its header, for a sorted section that ends at
    `sorted_end`, and sync it: it is ready to be renamed into place."""
    write_all(fd, header(sorted_end - HEADER_BYTES), 0)
    os.fsync(fd)


def discard_tmp(fd: int, path: Path) -> None:
    """Close and remove the unfinished file (open_tmp) that was to replace `path`."""
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp_path(path))


def sync_dir(path: Path) -> None:
    """Sync the directory of `path`, so that a rename into it survives a crash."""
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    """Write `records` into the records file at `path` (made if need be), in one
    compacted file: a record replaces the one the file holds for its client, and a
    later one in `records` an earlier one. Blocking.

    For tests and benchmarks that need a state file of a given size quickly; a server
    writes through its Persister.
    """
    path = Path(path)
    newest = read_all(path)
    for record in records:
        newest[record.client] = record.at_line
    try:
        write_file(path, sorted_lines(newest.values()))
    except OSError as exc:
        raise PersistError(f"cannot write records to {path}: {exc}") from exc


# --- the SQLite format that came before ------------------------------------------------

# Every row of a legacy file, `records` first, then its journal in the order written:
# the last row read for a client is its newest record.
_LEGACY_ROWS = (
    "SELECT client, at_line FROM records"
    " UNION ALL SELECT client, at_line FROM (SELECT client, at_line FROM journal ORDER BY rowid)"
)


def convert_legacy(path: Path, log: Callable[[str], None]) -> None:
    """If there is no file at `path` but a SQLite state file of the format that came
    before (`legacy_path`), write its records to `path` (blocking). The old file is
    left as it was, and no longer used. PersistError if it cannot be read."""
    legacy = legacy_path(path)
    if path.exists() or not legacy.exists():
        return
    try:
        conn = sqlite3.connect(f"file:{legacy}?mode=ro", uri=True, timeout=5.0)
        try:
            tables = {
                name
                for (name,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name IN ('records', 'journal')"
                )
            }
            query = _LEGACY_ROWS if "journal" in tables else "SELECT client, at_line FROM records"
            rows = conn.execute(query).fetchall() if "records" in tables else []
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise PersistError(f"cannot read records from {legacy}: {exc}") from exc
    newest = {c: line for c, line in rows if isinstance(c, bytes) and isinstance(line, bytes)}
    lines = [line for c, line in newest.items() if client_of(line) == c]
    try:
        write_file(path, sorted_lines(lines))
    except OSError as exc:
        raise PersistError(f"cannot write records to {path}: {exc}") from exc
    log(
        f"converted {len(lines)} records from {legacy} to {path}; the old file is no"
        " longer used and can be removed"
    )
