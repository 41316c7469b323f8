"""Durable records: each server keeps its store in `<state_dir>/<NAME>.records`.

With `state_dir` configured, a server reloads its records at start (in the
background, while it already serves: herd_trio/restore.py) and a `Persister` attached
to its store writes every record the store keeps, off the event loop, in batches: the
lines of a batch are appended to the file in one write. When the appended lines
outnumber the clients the store holds (and at least `compact_min` of them), the
Persister compacts the file: it writes the store's lines in the sorted order to a new
file, then every record kept since it began, and renames the new file into place.
Neighbours catch a restarted server up by digest, so persistence matters most when the
WHOLE herd restarts: then the files are the only copy.

The file's format, and reading and writing it whole, are herd_trio/statefile.py's.

Durability:

- A record is written (handed to the kernel) within about `batch_interval` (plus one
  write) of the store keeping it. A clean stop (SIGINT/SIGTERM, i.e. cancellation)
  writes everything still pending, and syncs, before the file is closed, so it loses
  nothing.
- A process crash (SIGKILL, a bug) loses only the batch not yet written: the kernel
  writes out what the process wrote even though the process is gone.
- An OS crash or power cut can also lose what was written since the last sync: the
  file is synced (fdatasync) after a write once SYNC_INTERVAL has passed since the last
  sync, and SYNC_INTERVAL after the last write. A compaction's file is synced before
  it replaces the old one, and the directory after, so a crash leaves either file
  whole. A line a crash cut short is skipped when the file is read.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import NoReturn

import attrs
import trio

from herd_trio.backoff import Backoff
from herd_trio.log import plural
from herd_trio.statefile import (
    HEADER_BYTES,
    PersistError,
    datasync,
    discard_tmp,
    open_for_append,
    open_tmp,
    seal,
    sync_dir,
    tmp_path,
    write_lines,
)
from herd_trio.store import LEAVES, Store

BATCH_INTERVAL = 0.05  # seconds between batches: one write per 50 ms at most
SYNC_INTERVAL = 1.0  # seconds between syncs of the file at most, while records come
# A failed write is retried after about 0.1 s, doubling up to about 5 s: a full disk
# is retried, not hammered.
RETRY = Backoff(initial=0.1, cap=5.0)
# A clean stop writes what is pending within this; PROTOCOL.md §5 gives the whole
# server 3 s to stop after SIGTERM, and a batch takes milliseconds.
FINAL_DEADLINE = 2.0
FAILURE_LOG_EVERY = 20  # while writes keep failing, log every 20th failure
COMPACT_MIN = 65_536  # appended lines before a compaction, however few clients
COMPACT_LEAVES = 256  # leaves whose lines a compaction gathers between two checkpoints
COMPACT_LINES = 8192  # lines a compaction gathers before it writes them


@attrs.frozen
class PersisterStatistics:
    """What a Persister has done so far."""

    pending: int  # records noted but not yet written
    rows_written: int  # lines written (a client noted 10 times in one batch counts once)
    batches_written: int  # writes of a batch
    failures: int  # failed writes (each is retried)
    compactions: int  # files compacted


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

    The file is opened, written and closed only inside worker threads, one at a time
    (`_lock`: a thread abandoned on cancel may still hold it). Only `run()` writes,
    one batch at a time, in the order the batches were taken. A failed write (disk
    full, read-only, file removed) never raises out of `run()`: it is logged through
    `log`, its records go back to the pending set (a newer note for the same client
    wins) and are retried after `retry.delay(...)`; the next write starts where the
    failed one did, so a line it cut short is overwritten. Pending records are bounded
    by the number of clients (one entry per client).

    Compacting needs every record of the file in `store`: it starts only after
    `allow_compaction()`, which the load calls once it has offered the whole file
    (herd_trio/restore.py). A failed compaction is logged and tried again after
    `compact_min` more lines; the old file stays in use meanwhile.

    `before_write` runs in the worker thread, with the file open, just before each
    batch is written; an OSError it raises fails that write like a disk error would.
    Tests use it to hold or fail writes.
    """

    path: Path = attrs.field(converter=Path)
    log: Callable[[str], None] = _ignore
    store: Store | None = None  # what a compaction writes; None: never compacts
    batch_interval: float = BATCH_INTERVAL
    retry: Backoff = RETRY
    final_deadline: float = FINAL_DEADLINE
    log_every: int = FAILURE_LOG_EVERY
    before_write: Callable[[], None] = _no_hook
    compact_min: int = COMPACT_MIN
    sync_interval: float = SYNC_INTERVAL
    _pending: dict[bytes, bytes] = attrs.field(factory=dict, init=False)  # client -> AT line
    _wake: trio.Event = attrs.field(factory=trio.Event, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _fd: int | None = attrs.field(default=None, init=False)
    _end: int = attrs.field(default=0, init=False)  # where the next line goes
    _appended: int = attrs.field(default=0, init=False)  # lines after the sorted section
    _cut: bool = attrs.field(default=False, init=False)  # a failed write may have left bytes
    _unsynced_since: float | None = attrs.field(default=None, init=False)  # None: all synced
    _closing: bool = attrs.field(default=False, init=False)
    _rows_written: int = attrs.field(default=0, init=False)
    _batches_written: int = attrs.field(default=0, init=False)
    _failures: int = attrs.field(default=0, init=False)
    _compactions: int = attrs.field(default=0, init=False)
    _compactable: bool = attrs.field(default=False, init=False)
    _next_compaction: int = attrs.field(default=0, init=False)  # after a failed one
    # While compacting: every record noted since the compaction began, written again
    # after the store's lines (a leaf's lines may have been gathered before the note).
    _replay: dict[bytes, bytes] | None = attrs.field(default=None, init=False)
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
        if (replay := self._replay) is not None:
            replay[client] = at_line
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

    def allow_compaction(self) -> None:
        """The store holds every record of the file now: it may be compacted."""
        self._compactable = True

    def statistics(self) -> PersisterStatistics:
        """Counters for tests and diagnostics."""
        return PersisterStatistics(
            pending=len(self._pending),
            rows_written=self._rows_written,
            batches_written=self._batches_written,
            failures=self._failures,
            compactions=self._compactions,
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
            sync_at: float | None = None  # when to sync what is written, if no write does
            while True:
                if self._unsynced_since is None:
                    sync_at = None
                    await self._wake.wait()
                else:
                    if sync_at is None:
                        sync_at = trio.current_time() + self.sync_interval
                    with trio.move_on_at(sync_at):
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
                if self._should_compact():
                    await self._compact()
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
        # Called only by run() (also from a compaction it runs) and, after its loop has
        # stopped, by its finally: never twice at once, so batches go out in the order
        # they were taken.
        batch, self._pending = self._pending, {}
        self._wake = trio.Event()
        if not batch and self._unsynced_since is None and not self._closing:
            return
        try:
            await trio.to_thread.run_sync(self._sync, batch, abandon_on_cancel=True)
        except BaseException:
            # Failed, or abandoned on cancel (the thread may still write it, which a
            # rewrite makes harmless). A newer note for the same client wins.
            for client, at_line in batch.items():
                self._pending.setdefault(client, at_line)
            if self._pending:
                self._wake.set()
            raise
        if batch:
            self._rows_written += len(batch)
            self._batches_written += 1

    async def _write_and_close(self) -> None:
        # From here on, whichever thread uses the file last closes it; a record noted
        # while this runs gets its own (reopening) write.
        self._closing = True
        failed: PersistError | None = None
        while self._pending and failed is None:
            try:
                await self._write_pending()
            except PersistError as exc:
                failed = exc
        if failed is not None:
            self.log(f"stopping with {plural(len(self._pending), 'record')} not saved: {failed}")
        try:  # syncs what the last write left unsynced, and closes the file
            await trio.to_thread.run_sync(self._sync, {}, abandon_on_cancel=True)
        except PersistError as exc:
            self.log(f"stopping without syncing {self.path}: {exc}")

    def _give_up(self) -> None:
        """The final write overran its deadline: stop waiting, leave the thread to close."""
        self.log(
            f"stopping: {self.path} not written within {self.final_deadline:g} s, "
            f"{plural(len(self._pending), 'record')} may be lost"
        )
        if self._lock.acquire(blocking=False):
            try:
                self._drop_file()
            finally:
                self._lock.release()
        # else a worker still holds the file and closes it when done (_closing is set)

    def _sync(self, batch: dict[bytes, bytes]) -> None:
        """In a worker thread: open the file if needed, append `batch` in one write, and
        sync if the interval is up (or on closing, or with nothing to write)."""
        with self._lock:
            if not batch and self._closing and self._fd is None:
                return  # nothing to write, sync or close
            try:
                fd = self._file()
                if batch:
                    self.before_write()
                    self._end += write_lines(fd, list(batch.values()), self._end)
                    self._appended += len(batch)
                    if self._cut:  # bytes a failed write left past the end
                        os.ftruncate(fd, self._end)
                        self._cut = False
                    if self._unsynced_since is None:
                        self._unsynced_since = time.monotonic()
                since = self._unsynced_since
                if since is not None and (
                    not batch or self._closing or time.monotonic() - since >= self.sync_interval
                ):
                    datasync(fd)
                    self._unsynced_since = None
            except OSError as exc:
                self._cut = True
                self._drop_file()  # the next attempt starts from a fresh open
                raise PersistError(f"cannot write records to {self.path}: {exc}") from exc
            finally:
                if self._closing:
                    self._drop_file()

    def _file(self) -> int:
        """The file, open for writing at the end of its last whole line (a line a crash
        cut short is cut off); created empty if there is none."""
        if self._fd is not None:
            return self._fd
        fd, self._end, self._appended = open_for_append(self.path)
        self._fd, self._cut = fd, False
        return fd

    def _drop_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- compaction ---------------------------------------------------------------

    def _should_compact(self) -> bool:
        store = self.store
        return (
            self._compactable
            and store is not None
            and self._fd is not None
            and self._appended >= max(self.compact_min, len(store), self._next_compaction)
        )

    async def _compact(self) -> None:
        """Replace the file with the store's lines, sorted, and what was kept since.

        The store's lines are gathered a slice of leaves at a time on the loop and
        written by a worker thread; batches keep going to the old file meanwhile (and
        are noted for replay, as a leaf may have been gathered before its record came).
        """
        store = self.store
        assert store is not None
        began, appended = trio.current_time(), self._appended
        fd: int | None = None
        self._replay = {}
        try:
            fd = await trio.to_thread.run_sync(open_tmp, self.path)
            offset = HEADER_BYTES
            lines: list[bytes] = []
            written_at = trio.current_time()
            for first in range(0, LEAVES, COMPACT_LEAVES):
                lines += store.lines_of_leaves(first, first + COMPACT_LEAVES)
                if len(lines) < COMPACT_LINES and first + COMPACT_LEAVES < LEAVES:
                    await trio.lowlevel.checkpoint()
                    continue
                offset += await trio.to_thread.run_sync(write_lines, fd, lines, offset)
                lines = []
                if self._pending and trio.current_time() - written_at >= self.batch_interval:
                    await self._write_pending()  # to the old file, as if not compacting
                    written_at = trio.current_time()
            replay, self._replay = list(self._replay.values()), None
            await trio.to_thread.run_sync(self._switch, fd, offset, replay)
            fd = None
        except (OSError, PersistError) as exc:
            self._next_compaction = self._appended + self.compact_min
            self.log(f"cannot compact {self.path}, going on with it as it is: {exc}")
            return
        finally:
            self._replay = None
            if fd is not None and fd != self._fd:  # not the file in place now
                discard_tmp(fd, self.path)
        self._compactions += 1
        self._next_compaction = 0
        self.log(
            f"compacted {self.path}: {plural(len(store), 'record')} from"
            f" {plural(appended, 'line')} appended, in {trio.current_time() - began:.3f} s"
        )

    def _switch(self, fd: int, sorted_end: int, replay: list[bytes]) -> None:
        """In a worker thread: finish the compacted file (`fd`, its sorted section ending
        at `sorted_end`) with `replay`, sync it, and put it in the old one's place."""
        with self._lock:
            if self._closing or self._fd is None:
                raise PersistError("the file was closed meanwhile")
            end = sorted_end + write_lines(fd, replay, sorted_end)
            seal(fd, sorted_end)
            os.replace(tmp_path(self.path), self.path)
            # The file in place is the new one from here on, whatever happens next.
            old, self._fd = self._fd, fd
            self._end, self._appended, self._cut = end, len(replay), False
            self._unsynced_since = None
            with contextlib.suppress(OSError):
                os.close(old)
            # The rename itself; if this fails, only an OS crash could undo it.
            with contextlib.suppress(OSError):
                sync_dir(self.path)


@asynccontextmanager
async def open_persister(
    path: str | Path, store: Store, *, log: Callable[[str], None] = _ignore
) -> AsyncIterator[Persister]:
    """Keep every record `store` keeps in `path` (loading it is herd_trio/restore.py's job).

    Use it around everything that feeds the store (listeners, links, the load): on
    exit, those are done, so the final write (bounded by FINAL_DEADLINE) sees every
    record.
    """
    persister = Persister(path, log=log, store=store)
    store.on_change(persister.note)
    async with trio.open_nursery() as nursery:
        await nursery.start(persister.run)
        try:
            yield persister
        finally:
            nursery.cancel_scope.cancel(reason="persister closing")
