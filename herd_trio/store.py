"""The newest record per client: last writer wins, and that decision is the flood dedupe."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from hashlib import blake2b

from herd_trio.protocol import Record

BUCKETS = 256  # digest granularity: a difference costs resending 1/256 of the store


def bucket_of(client: bytes) -> int:
    """The digest bucket of a client: the same on every server."""
    return zlib.crc32(client) % BUCKETS


def fingerprint(record: Record) -> int:
    """64 bits that change whenever the record does; the same on every server."""
    return int.from_bytes(blake2b(record.at_line, digest_size=8).digest(), "big")


class Store:
    """One record per client; a record replaces another only if it supersedes it.

    Every server applies the same rule (PROTOCOL.md §2: client time, then origin, then
    coords), so all of them converge on the same winner whatever order floods arrive
    in, and a record that is not newer is neither stored nor forwarded, which is what
    makes floods terminate on graphs with cycles.
    """

    def __init__(self, records: Iterable[Record] = ()) -> None:
        self._records: dict[bytes, Record] = {}
        self._listeners: list[Callable[[Record], None]] = []
        # Per bucket, the XOR of the fingerprints of its records: kept up to date on
        # every change, so a digest costs nothing to produce and two stores that hold
        # the same records have the same digest whatever order they got them in.
        self._digest = [0] * BUCKETS
        for record in records:
            self.offer(record)

    def get(self, client: bytes) -> Record | None:
        """The newest record held for `client`, if any."""
        return self._records.get(client)

    def offer(self, record: Record, *, repeat: bool = False) -> Record:
        """Keep `record` if it supersedes what is held; the record that stands now.

        The result `is record` exactly when it was kept: that one answer is the flood
        dedupe, the client's reply and the peer log's verdict. `repeat=True` is for a
        client's own IAMAT: an equal rank is then a repeat (PROTOCOL.md §2), never a
        replacement, even if its AT line (another time difference) sorts higher.
        """
        held = self._records.get(record.client)
        if held is not None:
            if repeat and record.rank <= held.rank:
                return held
            if not record.supersedes(held):
                return held
        self._records[record.client] = record
        change = fingerprint(record) ^ (0 if held is None else fingerprint(held))
        self._digest[bucket_of(record.client)] ^= change
        for listener in self._listeners:
            listener(record)
        return record

    def on_change(self, listener: Callable[[Record], None]) -> None:
        """Call `listener` (sync, must not raise) with every record the store keeps."""
        self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.snapshot())

    def digest(self) -> list[int]:
        """One 64-bit summary per bucket of what this store holds."""
        return list(self._digest)

    def snapshot(self) -> list[Record]:
        """Every record held, in the order their clients first arrived.

        Clients are never removed, so an index into one snapshot names the same
        client in every later one (herd_trio/digests.py resumes answers by index).
        """
        return list(self._records.values())

    def differing_buckets(self, other: list[int]) -> frozenset[int]:
        """The buckets whose summary differs from `other`'s (a peer's digest)."""
        pairs = enumerate(zip(self._digest, other, strict=True))
        return frozenset(bucket for bucket, (mine, theirs) in pairs if mine != theirs)

    def differing(self, other: list[int]) -> list[Record]:
        """The records of every bucket whose summary differs from `other`'s, in one pass.

        For tests and small stores; a link answers in chunks (digests.answer_digest).
        """
        buckets = self.differing_buckets(other)
        if not buckets:
            return []
        return [r for client, r in self._records.items() if bucket_of(client) in buckets]
