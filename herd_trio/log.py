"""One log file per server: every input line, every reply, every peer link event.

Written for the hot path: a log line is formatted with one f-string into a buffered
file, and a flusher task pushes it to the kernel at least every FLUSH_INTERVAL, so a
line reaches the file within a second and the event loop never waits on a slow disk
per message. `close()` flushes what is left, so a clean shutdown loses no line.
Untrusted bytes are always written as `repr()` (`b'...'`, with `\\n`, `\\x1b` escaped),
so no client can forge a log line or send escape sequences to an operator's terminal.
Timestamps are local time in ISO 8601 with the UTC offset
(`2024-05-19T14:03:07.125+02:00`), so logs from machines in other zones line up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import attrs
import trio

FLUSH_INTERVAL = 0.25  # seconds: PROTOCOL.md wants lines in the file within a second


class ServerLog:
    """Timestamped, append-only log of one server; the owner closes it."""

    def __init__(self, path: Path | None, name: str) -> None:
        self.name = name
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8", buffering=1 << 16)
        self._second = -1
        self._stamp = ""  # up to the seconds
        self._offset = ""  # the UTC offset, e.g. +02:00 (it can change with DST)
        self._ms = -1
        self._ms_stamp = ""

    def _now(self) -> str:
        # Under load many lines share a millisecond, and formatting the stamp costs
        # more than writing the line: format once per millisecond (strftime once a second).
        ms = int(time.time() * 1000)
        if ms != self._ms:
            self._ms = ms
            second = ms // 1000
            if second != self._second:
                self._second = second
                local = time.localtime(second)
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", local)
                self._offset = utc_offset(local.tm_gmtoff)
            self._ms_stamp = f"{self._stamp}.{ms % 1000:03d}{self._offset}"
        return self._ms_stamp

    def write(self, text: str) -> None:
        """Log one event; `text` must already be escaped if it holds untrusted data."""
        if self._file is not None:
            self._file.write(f"{self._now()} {self.name} {text}\n")

    def received(self, who: str, line: bytes) -> None:
        """Log a line received from `who`, escaped."""
        self.write(f"{who} < {line!r}")

    def sent(self, who: str, reply: bytes) -> None:
        """Log a reply sent to `who`, escaped."""
        self.write(f"{who} > {reply!r}")

    def flush(self) -> None:
        """Push buffered lines to the kernel."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close; later writes are dropped."""
        if self._file is not None:
            self._file.close()
            self._file = None

    async def run_flusher(self) -> None:
        """Flush every FLUSH_INTERVAL until cancelled."""
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            self.flush()


def utc_offset(seconds: int) -> str:
    """An ISO 8601 UTC offset (`+02:00`, `-03:30`, `+00:00`) from seconds east of UTC."""
    sign = "-" if seconds < 0 else "+"
    minutes = abs(seconds) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 record`, `0 records`, `2 records`; `nouns` for an irregular plural."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


@attrs.define(eq=False)
class RateLimiter:
    """At most one log line per remote address per `interval`; counts the rest.

    `allow(address)` returns None to suppress a line, else how many lines for that
    address were suppressed since the last one logged (0 most of the time): test it
    with `is not None`. Memory is bounded: past `max_addresses` tracked addresses,
    expired ones are forgotten and, if that is not enough, new addresses share one
    "other addresses" entry, so a flood from many addresses logs a bounded number of
    lines per interval as well.
    """

    interval: float = 10.0  # seconds
    clock: Callable[[], float] = trio.current_time
    max_addresses: int = 1024
    _last: dict[str, tuple[float, int]] = attrs.field(factory=dict, init=False)

    OVERFLOW = "(other addresses)"

    def allow(self, address: str) -> int | None:
        """None to suppress this address's line now; else how many were suppressed."""
        now = self.clock()
        if address not in self._last and len(self._last) >= self.max_addresses:
            self._last = {
                a: entry for a, entry in self._last.items() if now - entry[0] < self.interval
            }
            if len(self._last) >= self.max_addresses:
                address = self.OVERFLOW
        entry = self._last.get(address)
        if entry is not None and now - entry[0] < self.interval:
            self._last[address] = (entry[0], entry[1] + 1)
            return None
        self._last[address] = (now, 0)
        return 0 if entry is None else entry[1]
