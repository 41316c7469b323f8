"""Filling the store from the state file while the server already serves.

A server with `state_dir` opens its listeners first and loads its file in the
background (`Restore.run`): a worker thread reads the lines in chunks of about a
megabyte (os.pread lets go of the GIL), and the event loop parses and offers them to
the store SLICE at a time, with a checkpoint after each slice (a few hundred
microseconds of work), so no client waits behind the load for long. Parsing on the
loop rather than in the thread keeps the loop from waiting for the GIL (up to the 5 ms
switch interval each time). Loading a million records takes a few seconds; until it
is done:

- A batch of client lines first looks up the clients it names in the file
  (`Restore.ensure`: a bisection of the file's sorted section, mapped into memory, on
  the loop, as a thread's round trip would cost more, plus the lines appended after
  that section, read into memory once; also for clients the store holds, which may be
  an older record from a peer), so a WHATSAT for a stored client is answered, never
  `?`, and an IAMAT older than the stored record gets the stored record's AT line, as
  it would after the load.
- Records from peers are offered to the store as usual: last writer wins, so the order
  in which loaded and flooded records meet does not matter.
- The server starts no anti-entropy sync and answers none (links.py): its store would
  look as if it lacked nearly everything.
- /readyz says not ready (`Stats.state_loaded`).
- The persister does not compact the file (it writes the store's lines): only a
  complete load allows it (`Persister.allow_compaction`).

Loaded records are on disk already, so the persister does not write them back
(`Persister.from_file`).

A new client's line in the canonical form (`protocol.canonical_at`, the one regex a
flood's new line gets) is kept without building a Record (`Store.add_new`). Any other
line is checked for shape (an AT line, canonical spacing, a valid time and
coordinates) rather than re-validated field by field as a peer's line is, since the
file holds only records this server accepted, and offered as a Record, so a client met
twice keeps its newer record. The time spent is logged when the load ends.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import attrs
import trio

from herd_trio.log import plural
from herd_trio.persist import Persister
from herd_trio.protocol import Record, canonical_at
from herd_trio.statefile import (
    HEADER_BYTES,
    PersistError,
    client_of,
    convert_legacy,
    line_record,
    newest_lines,
    open_header,
    parse_lines,
    read_lines,
)
from herd_trio.store import Store, leaf_of

SLICE = 64  # lines parsed and offered to the store between two checkpoints (about 0.3 ms)
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
    """Blocking reads of a state file (herd_trio/statefile.py): its lines in chunks (from
    a worker thread), and lookups by client (a bisection of the sorted section, mapped
    into memory, and the appended section read into a dict once). The file as it was
    when opened: lines appended since are records the store kept in this run.
    """

    path: Path
    _fd: int | None = attrs.field(default=None, init=False)
    _map: mmap.mmap | None = attrs.field(default=None, init=False)  # the sorted section
    _chunks: Iterator[list[bytes]] | None = attrs.field(default=None, init=False)
    _sorted_end: int = attrs.field(default=0, init=False)
    _size: int = attrs.field(default=0, init=False)  # bytes when opened
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def open(self) -> bool:
        """Open the file; False if there is no file or it holds no lines (nothing to load).

        PersistError if it exists but is not a readable records file.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise PersistError(f"cannot read records from {self.path}: {exc}") from exc
        self._fd = fd
        try:
            self._size, self._sorted_end = open_header(fd, self.path)
            if self._size == HEADER_BYTES:
                self.close()
                return False
            if self._sorted_end > HEADER_BYTES:
                self._map = mmap.mmap(fd, self._sorted_end, access=mmap.ACCESS_READ)
            self._chunks = read_lines(fd, HEADER_BYTES, self._size)
        except OSError as exc:
            self.close()
            raise PersistError(f"cannot read records from {self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        return True

    def next_rows(self) -> list[bytes]:
        """The next lines of the file, about READ_CHUNK bytes of them ([] at the end);
        parsing them is the caller's job."""
        with self._lock:
            if self._chunks is None or self._closed:
                return []
            try:
                return next(self._chunks, [])
            except OSError as exc:
                raise PersistError(f"cannot read records from {self.path}: {exc}") from exc
            finally:
                if self._closed:  # closed while this thread was reading (abandoned)
                    self._close_file()

    def lookup(self, clients: list[bytes]) -> list[Record]:
        """The records of those of `clients` the sorted section holds (invalid lines left
        out); `journal` has the newer ones appended after it. On the loop: a bisection
        touches about 20 lines, mapped into memory."""
        found: list[Record] = []
        view = self._map
        if view is None or self._closed:
            return found
        for client in clients:
            leaf = leaf_of(client)
            start = _first_of_leaf(view, HEADER_BYTES, self._sorted_end, leaf)
            while start < self._sorted_end:
                stop = view.find(b"\n", start, self._sorted_end)
                if stop < 0:  # not a whole line: the section was not written by us
                    break
                line = view[start:stop]
                held = client_of(line)
                if held == client:
                    if (record := line_record(line)) is not None:
                        found.append(record)
                    break
                if leaf_of(held) != leaf:
                    break
                start = stop + 1
        return found

    def journal(self) -> dict[bytes, bytes]:
        """The lines appended after the sorted section when the file was opened, the
        newest per client; {} if none. Blocking: from a worker thread. They are in the
        order written, so lookups use this instead of a scan each."""
        with self._lock:
            if self._fd is None or self._closed or not self.has_journal:
                return {}
            try:
                return newest_lines(self._fd, self._sorted_end, self._size)[0]
            except OSError as exc:
                raise PersistError(f"cannot read records from {self.path}: {exc}") from exc

    @property
    def has_journal(self) -> bool:
        """True if the file held lines after its sorted section when opened."""
        return self._size > self._sorted_end

    def close(self) -> None:
        """Close the file; a worker thread still reading closes it when it is done."""
        self._closed = True
        view, self._map = self._map, None
        if view is not None:
            view.close()
        if self._lock.acquire(blocking=False):
            try:
                self._close_file()
            finally:
                self._lock.release()

    def _close_file(self) -> None:
        fd, self._fd, self._chunks = self._fd, None, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _first_of_leaf(view: mmap.mmap, lo: int, hi: int, leaf: int) -> int:
    """The offset of the first line in view[lo:hi] (whole lines, in leaf order) whose
    client's leaf is `leaf` or later; `hi` if there is none."""
    while lo < hi:
        mid = (lo + hi) // 2
        start = view.rfind(b"\n", lo, mid) + 1 or lo  # the line holding offset mid
        stop = view.find(b"\n", start, hi)
        if stop < 0:
            stop = hi
        if leaf_of(client_of(view[start:stop])) < leaf:
            lo = stop + 1
        else:
            hi = start
    return lo


def _offer_lines(store: Store, lines: list[bytes]) -> int:
    """Offer the records of stored `lines` to `store`; how many lines were not valid.

    A new client's line in the canonical form (nearly every line of a file) is kept as
    the hot paths keep a flood's new record (`Store.add_new`), without building a
    Record: that halves the cost of a load. Any other line is checked for shape
    (statefile.line_record) and offered, so a client held already keeps the newer of
    its two records.
    """
    held, bad = store.held, 0
    for line in lines:
        if (match := canonical_at(line)) is not None and (client := match[2]) not in held:
            begin, end = match.span(2)
            store.add_new(client, line[:begin] + line[end:], line)  # store.pack's form
        elif (record := line_record(line)) is not None:
            store.offer(record)
        else:
            bad += 1
    return bad


async def _read_rows(reader: StateReader, send: trio.MemorySendChannel[list[bytes]]) -> None:
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
        file or it holds no records. PersistError if the file cannot be read.

        A state file of the SQLite format that came before is converted first, once
        (statefile.convert_legacy): the server does not listen meanwhile.

        `attach` the persister writing `path` before anything else offers to the store.
        """
        await trio.to_thread.run_sync(convert_legacy, path, log)
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
        else:  # nothing to load: the store holds what the file does (nothing)
            persister.allow_compaction()

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
        # A worker thread reads the next lines (os.pread lets go of the GIL) while the
        # loop parses and offers these, a slice at a time.
        send, receive = trio.open_memory_channel[list[bytes]](1)
        loaded = skipped = 0
        whole = False
        try:
            with receive, _collector_paused():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_read_rows, reader, send)
                    async for rows in receive:
                        for start in range(0, len(rows), SLICE):
                            lines = rows[start : start + SLICE]
                            with persister.from_file():
                                bad = _offer_lines(store, lines)
                            loaded += len(lines) - bad
                            skipped += bad
                            await trio.lowlevel.checkpoint()
            whole = True
        except* PersistError as group:
            exc = group.exceptions[0]
            self.log(
                f"{exc}; serving the {plural(len(store), 'record')} held so far"
                " (the file is not compacted until a restart loads it whole)"
            )
        finally:
            persister.track_clients(False)
            reader.close()
        if whole:  # a compaction writes the store: only once it holds the whole file
            persister.allow_compaction()
        if skipped:
            self.log(f"skipped {skipped} lines of {reader.path} that are not valid AT lines")
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
        """The appended lines the file held at open, read in a worker thread the first time
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
            # On the loop: a bisection of a mapped file costs less than a thread's round trip.
            found = reader.lookup(named)
            if reader.has_journal:  # newer than the sorted section's lines
                journal = await self._read_journal(reader)
                found += parse_lines(journal[c] for c in named if c in journal)[0]
        except PersistError as exc:
            self.log(f"{exc}; waiting for the load instead")
            await self.wait()
            return
        with persister.from_file():
            for record in found:
                store.offer(record)
