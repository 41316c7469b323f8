"""What one server's rooms share: built once by `serve()`, handed down, never reached into.

The client handler, the peer links and (later) the admin surface each take a `Node`
instead of the server object that owns them, so none of them imports the module that
runs them, and the owner stays at the top.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

from herd_trio.bus import Bus
from herd_trio.config import Settings
from herd_trio.log import ServerLog
from herd_trio.restore import Restore
from herd_trio.stats import Stats
from herd_trio.store import Store


@attrs.frozen(eq=False)
class Node:
    """One server's name, settings, store, bus, log and counters."""

    name: str
    settings: Settings
    store: Store
    bus: Bus
    log: ServerLog
    now_ns: Callable[[], int] = time.time_ns  # wall clock for AT time differences
    stats: Stats = attrs.field(factory=Stats)  # counters for the admin port
    restore: Restore = attrs.field(factory=Restore)  # loading the state file (done without)
    wire_name: bytes = attrs.field(init=False)

    @wire_name.default
    def _wire_name(self) -> bytes:
        return self.name.encode("ascii")  # config allows ASCII names only
