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

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import attrs
import trio

FLUSH_INTERVAL = 0.25  # seconds: PROTOCOL.md wants lines in the file within a second
PREVIEW_SLACK = 64  # characters an escaped line may add beyond twice its bytes
# ServerLog.exchanges' marks: a line received from a client, and a reply sent to it.
# Control bytes, so that the joined fast path can use them as placeholders for the heads.
RECEIVED = b"\x01"
SENT = b"\x02"
# The bytes that repr() of a bytes object writes as they are (printable ASCII but the
# quote and the backslash).
_UNESCAPED = bytes(c for c in range(0x20, 0x7F) if c not in b"'\\")
_UNESCAPED_OR_LF = _UNESCAPED + b"\n"  # ... and the LF, which repr() writes as \\n
# What follows a peer line in its log entry (peer_lines), by verdict: what the store
# made of the record.
KEPT, DUPLICATE, STALE = b"' kept\n", b"' duplicate\n", b"' stale\n"
VERDICT_TAILS = {"kept": KEPT, "duplicate": DUPLICATE, "stale": STALE}


class ServerLog:
    """Timestamped, append-only log of one server; the owner closes it.

    Bounded (issue 11, issue 12): a received line or reply whose escaped form would be
    longer than `line_limit`, or more than about twice its own size (bytes that escape
    to `\\xNN`), is logged as an escaped preview plus its length, so hostile input
    writes at most about twice its size to disk; a WHATSAT reply is logged as its AT
    line plus a summary of the JSON. Past `max_bytes` written (counted, not stat'ed),
    the file is rotated to NAME.log.1 (NAME.log.1 to .2, ... up to `backups`).
    `reopen()` (SIGHUP) starts a new file after logrotate has moved the old one.
    """

    def __init__(
        self,
        path: Path | None,
        name: str,
        *,
        line_limit: int = 1024,
        max_bytes: int = 100 << 20,
        backups: int = 3,
    ) -> None:
        self.name = name
        self.path = path
        self.line_limit = line_limit
        self.max_bytes = max_bytes or 1 << 62  # 0: never rotate
        self.backups = backups
        # Binary: the hot paths lay their entries out as bytes and write them as they
        # are, without a decode to str and TextIOWrapper's encode back (events given as
        # str are encoded as UTF-8 when written).
        self._file: BinaryIO | None = None
        self._size = 0  # bytes in the current file
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("ab", buffering=1 << 16)
            self._size = self._file.tell()
        self._second = -1
        self._stamp = ""  # up to the seconds
        self._offset = ""  # the UTC offset, e.g. +02:00 (it can change with DST)
        self._ms = -1
        self._ms_stamp = ""

    def _head(self) -> str:
        # Under load many lines share a millisecond, and formatting the stamp costs
        # more than writing the line: `<stamp> <name> ` is formatted once per
        # millisecond (strftime once a second).
        ms = int(time.time() * 1000)
        if ms != self._ms:
            self._ms = ms
            second = ms // 1000
            if second != self._second:
                self._second = second
                local = time.localtime(second)
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", local)
                self._offset = utc_offset(local.tm_gmtoff)
            self._ms_stamp = f"{self._stamp}.{ms % 1000:03d}{self._offset} {self.name} "
        return self._ms_stamp

    def write(self, text: str) -> None:
        """Log one event; `text` must already be escaped if it holds untrusted data."""
        if self._file is not None:
            self._emit(f"{self._head()}{text}\n")

    def _emit(self, entry: str) -> None:
        """Write one whole entry (stamp, name, event, LF), or several."""
        self._write(entry.encode())

    def _write(self, entries: bytes) -> None:
        """Write whole entries, encoded."""
        if self._file is not None:
            self._file.write(entries)
            self._size += len(entries)
            if self._size > self.max_bytes:
                self._rotate()

    def received_text(self, who: str, line: bytes) -> str:
        """The event of a line received from `who`, escaped (a preview if it is long),
        for `events`."""
        return f"{who} < {self.shown(line)}"

    def peer_lines(self, peer: str, lines: list[bytes], tails: list[bytes]) -> None:
        """Log record lines received together from `peer`, each followed by the tail
        of its verdict (KEPT, DUPLICATE or STALE, in `tails`), and empty both lists;
        one time stamp and one write for the lot.

        Each entry reads `<head>peer <peer> < b'<line>' <verdict>`, as repr() writes
        the line. A batch of lines that repr() would not change inside the quotes (no
        quote, backslash or unprintable byte: every line of a well-behaved herd) is
        laid out by slice assignments and joined as bytes in one go, without a Python
        step per line. Whole: a peer's lines are bounded by its link.
        """
        if lines and self._file is not None:
            head = f"{self._head()}peer {peer} < "
            parts = [f"{head}b'".encode()] * (3 * len(lines))
            parts[1::3] = lines
            parts[2::3] = tails
            joined = _joined(parts)
            if joined is None:  # some line needs repr()
                joined = "".join(
                    [
                        f"{head}{line!r} {tail[2:-1].decode()}\n"
                        for line, tail in zip(lines, tails, strict=True)
                    ]
                ).encode()
            self._write(joined)
        lines.clear()
        tails.clear()

    def exchanges(self, who: str, entries: list[bytes]) -> None:
        """Log lines received from client `who` and replies sent to it, in order, and
        empty `entries`; one time stamp and one write. `entries` alternates a mark and
        its bytes: RECEIVED and a line, or SENT and a reply.

        The entries read as `received_text` and `sent_text` make them. When every line
        and reply of the batch is shorter than `line_limit`, holds nothing for repr()
        to escape but LFs, and holds no `}` (so no WHATSAT reply, which is logged as a
        summary; a client line with one takes the slow path), the batch is laid out by
        slice assignments (each entry's mark, bytes and a NUL for its end) and joined
        as bytes; four replaces then write each LF as repr() does, end the entries and
        put the heads in place of the marks. No Python step per entry: about 1,800
        instructions fewer per IAMAT and reply than a loop over the entries (python -m
        bench.icount). Mapping a lookup of the heads over the marks instead of the
        last two replaces costs 0.5% more per IAMAT: bytes.replace of a byte that
        occurs once per entry is a memchr and a memcpy.
        """
        if entries and self._file is not None:
            if len(entries) == 4 and self._one_exchange(who, entries):
                return
            texts = entries[1::2]
            joined = b"".join(texts)
            if (
                max(map(len, texts)) < self.line_limit
                and not joined.translate(None, _UNESCAPED_OR_LF)
                and b"}" not in joined  # a memchr: a seventh of the cost of "}\n\n"
            ):
                parts = [b"'\x00"] * (3 * len(texts))
                parts[0::3] = entries[0::2]
                parts[1::3] = texts
                head = f"{self._head()}{who} "
                batch = b"".join(parts).replace(b"\n", b"\\n").replace(b"\x00", b"\n")
                batch = batch.replace(RECEIVED, f"{head}< b'".encode())
                self._write(batch.replace(SENT, f"{head}> b'".encode()))
            else:  # a long line, something to escape, a WHATSAT reply: entry by entry
                self.events(
                    [
                        self.received_text(who, data)
                        if mark == RECEIVED
                        else self.sent_text(who, data)
                        for mark, data in zip(entries[0::2], texts, strict=True)
                    ]
                )
        entries.clear()

    def _one_exchange(self, who: str, entries: list[bytes]) -> bool:
        """exchanges' fast path for one line and its one-line reply, the batch of a
        client that waits for each reply: the same bytes, with less work around them
        than the general layout (which costs twice as much for a batch this small).
        False (and nothing written) if the pair needs the general path."""
        mark, line, sent, reply = entries
        if not (
            mark == RECEIVED
            and sent == SENT
            and len(line) < self.line_limit
            and len(reply) < self.line_limit
            and reply[-1:] == b"\n"
            and not (line + reply[:-1]).translate(None, _UNESCAPED)
        ):
            return False
        head = f"{self._head()}{who} ".encode()
        self._write(b"%s< b'%s'\n%s> b'%s\\n'\n" % (head, line, head, reply[:-1]))
        entries.clear()
        return True

    def sent(self, who: str, reply: bytes) -> None:
        """Log a reply sent to `who`, escaped; a WHATSAT reply's JSON as a summary."""
        if self._file is not None:
            self._emit(f"{self._head()}{self.sent_text(who, reply)}\n")

    def sent_text(self, who: str, reply: bytes) -> str:
        """The event `sent` logs, for `events`."""
        if reply.startswith(b"AT ") and reply.endswith(b"}\n\n"):
            at_line, _, body = reply.partition(b"\n")
            shown = self.shown(at_line + b"\n")
            return f"{who} > {shown} + {places_summary(body)}"
        return f"{who} > {self.shown(reply)}"

    def events(self, texts: list[str]) -> None:
        """Log events that happened together (one time stamp, one write), and empty
        `texts`; each must already be escaped if it holds untrusted data."""
        if texts and self._file is not None:
            head = self._head()
            self._emit("".join([f"{head}{text}\n" for text in texts]))
        texts.clear()

    def shown(self, data: bytes) -> str:
        """`data` escaped for the log: whole if short, else a preview and its length.

        repr() is the escaping (for printable ASCII it only adds the quotes; a check
        whether there is anything to escape costs about as much as repr itself)."""
        if len(data) <= self.line_limit:
            text = repr(data)
            if len(text) <= 2 * len(data) + PREVIEW_SLACK:  # printable text: the hot path
                return text
        return preview(data, self.line_limit)

    def flush(self) -> None:
        """Push buffered lines to the kernel."""
        if self._file is not None:
            self._file.flush()

    def reopen(self) -> bool:
        """Start writing to a fresh open of `path` (SIGHUP: logrotate moved the old file).

        The old file stays in use if the new one cannot be opened; False then.
        """
        if self._file is None or self.path is None:
            return False
        try:
            fresh = self.path.open("ab", buffering=1 << 16)
        except OSError:
            return False
        self._file.close()
        self._file, self._size = fresh, fresh.tell()
        return True

    def _rotate(self) -> None:
        """NAME.log -> NAME.log.1 -> ... -> NAME.log.<backups> (the oldest goes); reopen.

        Renaming does not disturb the open file, so whatever fails, writing goes on:
        into a fresh NAME.log, or into the old file until another max_bytes passed.
        """
        path = str(self.path)
        try:
            for number in range(self.backups - 1, 0, -1):
                if os.path.exists(f"{path}.{number}"):
                    os.replace(f"{path}.{number}", f"{path}.{number + 1}")
            if self.backups:
                os.replace(path, f"{path}.1")
            else:
                os.unlink(path)
        except OSError:
            pass
        if not self.reopen():
            self._size = 0

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


def _joined(parts: list[bytes]) -> bytes | None:
    """Log entries given as (head, text, tail) triples in `parts`, joined; None if a
    text holds a byte that repr() would escape."""
    if b"".join(parts[1::3]).translate(None, _UNESCAPED):
        return None
    return b"".join(parts)


def preview(data: bytes, limit: int) -> str:
    """`b'...'... (N bytes)`: the escaped first bytes of `data` and its whole length.

    At most limit/8 bytes, and at most an eighth of `data`: bytes that escape to
    `\\xNN` take four characters each, so the entry stays well under twice the input.
    """
    head = data[: max(1, min(len(data), limit) // 8)]
    return f"{head!r}... ({len(data)} bytes)"


def places_summary(body: bytes) -> str:
    """A WHATSAT reply's JSON as `places: OK, 3 results, 1234 bytes` for the log."""
    try:
        parsed = json.loads(body)
        status = str(parsed.get("status"))
        results = parsed.get("results")
        count = len(results) if isinstance(results, list) else 0
    except (ValueError, AttributeError):
        return f"places: unreadable JSON, {len(body)} bytes"
    return f"places: {status!r}, {plural(count, 'result')}, {len(body)} bytes"


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

    def write(self, address: str, log: Callable[[str], None], text: str) -> None:
        """Log `text` unless `address`'s line is suppressed now, saying how many were."""
        suppressed = self.allow(address)
        if suppressed is not None:
            log(f"{text} ({suppressed} more since the last)" if suppressed else text)

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
