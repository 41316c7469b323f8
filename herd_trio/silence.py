"""The watchdog that ends a peer link whose peer went silent."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NoReturn

import attrs
import trio


@attrs.define(eq=False)
class Silence:
    """Raises `error()` once the reader has waited `seconds` for the peer's next lines.

    One watchdog task per link instead of a deadline on every receive: a cancel scope
    with a deadline costs more than reading and handling a record line, and a link
    under load receives thousands of batches a second. The reader says when it starts
    waiting and when lines arrived; the time it spends handling them (answering a sync
    round may wait) does not count as the peer's silence.
    """

    seconds: float
    error: Callable[[], Exception]
    _waiting_since: float = attrs.field(default=math.inf, init=False)

    def waiting(self) -> None:
        """The reader waits for the peer's next lines from now on."""
        self._waiting_since = trio.current_time()

    def heard(self) -> None:
        """Lines arrived; the reader handles them."""
        self._waiting_since = math.inf

    async def watch(self) -> NoReturn:
        """Raise `error()` once the reader has been waiting for `seconds`."""
        while True:
            now = trio.current_time()
            due = self._waiting_since + self.seconds
            if now >= due:
                raise self.error()
            await trio.sleep_until(min(due, now + self.seconds))
