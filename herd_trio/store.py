"""The newest record per client: last writer wins, and that decision is the flood dedupe."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from herd_trio.protocol import Record


class Store:
    """One record per client; a record replaces another only if its rank is higher.

    Every server applies the same rule (PROTOCOL.md §2: client time, then origin, then
    coords), so all of them converge on the same winner whatever order floods arrive
    in, and a record that is not newer is neither stored nor forwarded, which is what
    makes floods terminate on graphs with cycles.
    """

    def __init__(self, records: Iterator[Record] | None = None) -> None:
        self._records: dict[bytes, Record] = {}
        self._listeners: list[Callable[[Record], None]] = []
        for record in records or ():
            self.offer(record)

    def get(self, client: bytes) -> Record | None:
        """The newest record held for `client`, if any."""
        return self._records.get(client)

    def offer(self, record: Record) -> bool:
        """Keep `record` if it is newer than what is held; True if it was kept."""
        held = self._records.get(record.client)
        if held is not None and record.rank <= held.rank:
            return False
        self._records[record.client] = record
        for listener in self._listeners:
            listener(record)
        return True

    def on_change(self, listener: Callable[[Record], None]) -> None:
        """Call `listener` (sync, must not raise) with every record the store keeps."""
        self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records.values()))
