"""Fan-out of live changes (links up and down, records kept) to /events subscribers.

Publishing is synchronous and never waits (like the bus): each subscriber has a small
bounded channel, and one that is full is a slow reader; it is cut off, and its browser
reconnects and reloads the whole picture. No subscriber can slow the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio

from herd_trio.protocol import Record
from herd_trio.stats import Event
from herd_trio.store import record_of

SUBSCRIBER_BUFFER = 256  # events a reader may fall behind before it is dropped


def record_event(record: Record) -> Event:
    """The map's view of a kept record: client id as text (the page sets it as text)."""
    lat, lon = record.lat_lon
    return {
        "type": "client",
        "id": record.client.decode("utf-8", "backslashreplace"),
        "origin": record.origin.decode("ascii", "replace"),
        "lat": float(lat),
        "lon": float(lon),
    }


@attrs.define(eq=False)
class EventHub:
    """Subscribers of the live change stream; `publish` is a Stats watcher and a store listener."""

    buffer: int = SUBSCRIBER_BUFFER
    _subscribers: set[trio.MemorySendChannel[Event]] = attrs.field(factory=set, init=False)

    @property
    def subscribers(self) -> int:
        """How many readers are subscribed now."""
        return len(self._subscribers)

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[Event]]:
        """A channel of events for the block; it ends early if the reader falls behind."""
        send, receive = trio.open_memory_channel[Event](self.buffer)
        self._subscribers.add(send)
        with send, receive:
            try:
                yield receive
            finally:
                self._subscribers.discard(send)

    def publish(self, event: Event) -> None:
        """Hand `event` to every subscriber; drop the ones that are full. Never blocks."""
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                send.close()  # the reader drains what it holds, then sees the end
                self._subscribers.discard(send)

    def record_kept(self, client: bytes, at_line: bytes) -> None:
        """Store listener: a record was kept (Store.on_change)."""
        if self._subscribers:  # the store calls this for every record: stay cheap
            self.publish(record_event(record_of(at_line)))
