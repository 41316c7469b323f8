"""One log file per server: every input line, every reply, every peer link event.

Written for the hot path: a log line is formatted with one f-string into a buffered
file, and a flusher task pushes it to the kernel at least every FLUSH_INTERVAL, so a
line reaches the file within a second and the event loop never waits on a slow disk
per message. `close()` flushes what is left, so a clean shutdown loses no line.
Untrusted bytes are always written as `repr()` (`b'...'`, with `\\n`, `\\x1b` escaped),
so no client can forge a log line or send escape sequences to an operator's terminal.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

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
        self._stamp = ""
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
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
            self._ms_stamp = f"{self._stamp}.{ms % 1000:03d}"
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
