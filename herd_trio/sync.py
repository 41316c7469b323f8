"""Range-based reconciliation of two stores over a peer link (anti-entropy).

Floods carry every update while a link is up; this repairs what a link missed while
it was down, with traffic and work that grow with the number of differences d and
only with the logarithm of the store size n (Meyer's range-based set reconciliation,
as in the Negentropy protocol, over the fixed key tree of herd_trio/store.py):

* A round starts with `SUMS 0 0 <root fingerprint>`.
* A side that gets SUMS compares each node with its own. Equal nodes end there. A
  differing node is listed (`ITEMS`: the (key, fingerprint) of each record it holds
  there) if it holds at most ITEMS_MAX records there or the node is a single key;
  otherwise it is split (`SUMS` of its 16 children).
* A side that gets ITEMS sends its records in that node whose (key, fingerprint) the
  list lacks, and asks (`NEED`) for the listed keys it lacks or holds in another
  version; the other side answers NEED with those records. Each side offers what it
  receives to its store, which keeps the newer (last writer wins), so both
  directions converge whichever side holds the newer record.

A round costs O(d log n) lines, each bounded in size by the format (protocol.py).
Sending the records of a large node (an empty server joining) is the writer's job:
it pulls CHUNK records at a time from a generator walking the store (`stream`), so
the store is never copied into an outbox and the event loop never does more than a
chunk of work in one go.

A peer can't make this server work or send without bound: one round start is
answered per `interval` (RoundGate; past a small allowance the link is dropped),
replies and NEED answers are limited to REPLY_BUDGET bytes per interval (beyond it
lines are ignored until the next interval), and a leaf's records are streamed at
most once per interval and never twice for requests that arrived before the first
stream of it (two rounds running at once on one link do not send the store twice).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterator
from typing import Literal

import attrs
import trio

from herd_trio.stats import PeerStats
from herd_trio.store import (
    FANOUT,
    LEAF_LEVEL,
    LEAVES,
    MAX_LEVEL,
    Store,
    fingerprint_line,
    key_of,
)
from herd_trio.synclines import (
    ITEMS_MAX,
    NEED_MAX,
    Items,
    Need,
    Sums,
    SyncLine,
    format_items,
    format_need,
    format_sums,
)

CHUNK = 1000  # records per streamed chunk: well under a millisecond to gather
CHUNK_LEAVES = 1024  # leaves looked at per chunk, so skipped ranges also yield often
REPLY_BUDGET = 32 << 20  # bytes of replies per interval: ~1M differing records' lists
EARLY_ALLOWANCE = 3  # early round starts ignored per interval before the link is dropped
SCAN_COST = 32  # bytes of budget charged per record looked at below the leaves
STREAM_COST = 512  # bytes of budget charged per stream queued (its generator's memory)

Verdict = Literal["answer", "ignore", "drop"]


class PeerMisbehaved(Exception):
    """The peer kept asking for more than a link allows; the link is dropped."""


@attrs.define
class RoundGate:
    """Whether a peer's round start is answered, ignored, or ends the link; no I/O."""

    interval: float  # seconds: at most one answer per interval
    allowance: int = EARLY_ALLOWANCE
    answered_at: float = -math.inf
    early: int = 0  # round starts since the last answer that came too soon

    def verdict(self, now: float) -> Verdict:
        """What to do with a round start that arrived at `now` (and note it)."""
        if now - self.answered_at >= self.interval:
            self.answered_at, self.early = now, 0
            return "answer"
        self.early += 1
        return "drop" if self.early > self.allowance else "ignore"


@attrs.define
class Budget:
    """Bytes of replies allowed per interval; no I/O."""

    interval: float
    limit: int = REPLY_BUDGET
    window_at: float = -math.inf
    spent: int = 0
    refused: int = 0  # lines ignored in this window

    def allow(self, now: float) -> bool:
        """True if a reply may be made now (a new window starts every interval)."""
        if now - self.window_at >= self.interval:
            self.window_at, self.spent, self.refused = now, 0, 0
        if self.spent < self.limit:
            return True
        self.refused += 1
        return False


def child_fps(store: Store, level: int, index: int) -> list[int]:
    """The fingerprints of the 16 children of node (level, index)."""
    first = index * FANOUT
    if level + 1 <= LEAF_LEVEL:
        return [store.summary(level + 1, child)[0] for child in range(first, first + FANOUT)]
    fps = [0] * FANOUT
    shift = 64 - 4 * (level + 1)
    for key, line in store.members(level, index):
        fps[(key >> shift) - first] ^= fingerprint_line(line)
    return fps


@attrs.define(eq=False)
class Reconciler:
    """One link's side of reconciliation: starts rounds and answers the peer's lines.

    `send` queues a line (without LF) for the link's writer; `stream` hands it a
    generator of ready-to-write chunks that it pulls one at a time, after writing the
    previous one. Neither blocks; handle() does a bounded amount of work per line.
    """

    store: Store
    send: Callable[[bytes], None]
    stream: Callable[[Iterator[bytes]], None]
    log: Callable[[str], None]
    peer: str
    counts: PeerStats
    interval: float  # seconds: half the sync interval
    gate: RoundGate = attrs.field()
    budget: Budget = attrs.field()
    clock: Callable[[], float] = trio.current_time  # when a streamed leaf was sent
    list_max: int = ITEMS_MAX  # records a node may hold to be listed rather than split
    _streamed_at: array[float] | None = attrs.field(default=None, init=False)

    @gate.default
    def _gate(self) -> RoundGate:
        return RoundGate(self.interval)

    @budget.default
    def _budget(self) -> Budget:
        return Budget(self.interval)

    def start(self) -> bytes:
        """The line that starts a round: this store's root fingerprint."""
        self.counts.rounds_sent += 1
        return format_sums(0, 0, [self.store.summary(0, 0)[0]])

    def handle(self, message: SyncLine, now: float) -> None:
        """Answer one of the peer's sync lines; PeerMisbehaved if it keeps starting rounds."""
        if isinstance(message, Sums) and message.level == 0:
            verdict = self.gate.verdict(now)
            if verdict == "drop":
                raise PeerMisbehaved(
                    f"{self.peer} started {self.gate.early} sync rounds within"
                    f" {self.interval:g} s of the last one answered (one is answered per"
                    f" {self.interval:g} s)"
                )
            if verdict == "ignore":
                return
            self.counts.rounds_received += 1
        if not self.budget.allow(now):
            if self.budget.refused == 1:
                self.log(
                    f"sync with {self.peer}: reply budget ({self.budget.limit} bytes per"
                    f" {self.interval:g} s) spent; its lines are ignored until the next interval"
                )
            self.counts.sync_ignored += 1
            return
        if isinstance(message, Sums):
            self._sums(message)
        elif isinstance(message, Items):
            self._items(message, now)
        else:
            self._need(message)

    def _reply(self, line: bytes) -> None:
        self.budget.spent += len(line) + 1
        self.send(line)

    def _sums(self, message: Sums) -> None:
        store, level = self.store, message.level
        for offset, theirs in enumerate(message.fps):
            index = message.first + offset
            if level > LEAF_LEVEL:  # a scan of the leaf's members, maybe twice
                self.budget.spent += 2 * SCAN_COST * store.leaf_size(level, index)
            mine, count = store.summary(level, index)
            if mine == theirs:
                continue
            if count <= self.list_max or level == MAX_LEVEL:
                pairs = [(key, fingerprint_line(line)) for key, line in store.members(level, index)]
                self._reply(format_items(level, index, sorted(pairs)[:ITEMS_MAX]))
            else:
                fps = child_fps(store, level, index)
                self._reply(format_sums(level + 1, index * FANOUT, fps))

    def _items(self, message: Items, now: float) -> None:
        store, theirs = self.store, dict(message.pairs)
        need: list[int] = []
        mine: dict[int, bytes] = {}  # key -> client, for the leaves the list touches
        for leaf in {key >> (64 - 4 * LEAF_LEVEL) for key in theirs}:
            for member in store.leaf_clients(leaf):
                mine[key_of(member)] = member
        for key, fp in theirs.items():
            client = mine.get(key)
            line = None if client is None else store.line(client)
            if line is None or fingerprint_line(line) != fp:
                need.append(key)
        self.budget.spent += SCAN_COST * len(theirs)
        for start in range(0, len(need), NEED_MAX):
            self._reply(format_need(need[start : start + NEED_MAX]))
        if store.summary(min(message.level, LEAF_LEVEL), _clip(message.level, message.index))[1]:
            self.budget.spent += STREAM_COST
            self.stream(self._records(message.level, message.index, theirs, now))

    def _need(self, message: Need) -> None:
        for key in message.keys:
            line = self.store.find(key)
            if line is not None:
                self.counts.sync_records_sent += 1
                self._reply(line)

    def _records(
        self, level: int, index: int, theirs: dict[int, int], asked_at: float
    ) -> Iterator[bytes]:
        """Chunks of AT lines (with LFs): my records in the node that `theirs` lacks.

        Pulled by the writer: the store is read as it stands when each chunk is made.
        Leaves streamed since `asked_at`, or within the last interval, are skipped.
        """
        store = self.store
        if level > LEAF_LEVEL:
            lines = [
                line + b"\n"
                for key, line in store.members(level, index)
                if theirs.get(key) != fingerprint_line(line)
            ]
            self.counts.sync_records_sent += len(lines)
            yield b"".join(lines)
            return
        if self._streamed_at is None:
            self._streamed_at = array("d", [-math.inf]) * LEAVES
        streamed = self._streamed_at
        listed = {key >> (64 - 4 * LEAF_LEVEL) for key in theirs}
        out: list[bytes] = []
        looked = 0
        for leaf in store.leaves(level, index):
            now = self.clock()
            if streamed[leaf] >= asked_at or now - streamed[leaf] < self.interval:
                continue
            streamed[leaf] = now
            for client in store.leaf_clients(leaf):
                line = store.line(client)
                if line is None:  # pragma: no cover - clients are never removed
                    continue
                if leaf in listed and theirs.get(key_of(client)) == fingerprint_line(line):
                    continue
                out.append(line + b"\n")
            looked += 1
            if len(out) >= CHUNK or looked >= CHUNK_LEAVES:
                self.counts.sync_records_sent += len(out)
                yield b"".join(out)
                out, looked = [], 0
        self.counts.sync_records_sent += len(out)
        yield b"".join(out)


def _clip(level: int, index: int) -> int:
    """The index of the node's ancestor at LEAF_LEVEL (or the node itself above it)."""
    return index >> (4 * (level - LEAF_LEVEL)) if level > LEAF_LEVEL else index
