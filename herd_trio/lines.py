"""A line reader over a trio byte stream with a hard cap on line length.

Framing follows PROTOCOL.md §1: a line ends at LF, one CR before the LF is dropped, an
unterminated last line at EOF is a complete line. Memory stays bounded: a line that
grows past `max_line` bytes (counting every byte before the LF) is refused while it is
still arriving, so a client streaming bytes without a newline costs at most
`max_line + chunk` bytes. Time stays bounded too: a line that has begun must end within
`line_timeout` seconds (slowloris: a trickle of bytes that never reaches its LF).
"""

from __future__ import annotations

import math

import trio

from herd_trio.net import receive_some

CHUNK = 65536  # bytes per receive_some: large enough that pipelined clients batch well


class LineTooLong(Exception):
    """A line longer than the reader's `max_line`; the connection should be closed."""

    def __init__(self, max_line: int, head: bytes) -> None:
        super().__init__(f"line longer than {max_line} bytes")
        self.head = head  # the first bytes of the line, for the log


class LineTimeout(Exception):
    """A line that began but did not end within the reader's `line_timeout`."""

    def __init__(self, line_timeout: float, head: bytes) -> None:
        super().__init__(f"line not ended within {line_timeout} s")
        self.head = head  # the first bytes of the line, for the log


class LineReader:
    """Reads LF-terminated lines from `stream`; the one task reading it owns it.

    `receive_lines` hands over every complete line that is buffered at once, so a
    pipelining client's lines are answered in batches with one write each batch.
    """

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        max_line: int,
        chunk: int = CHUNK,
        *,
        line_timeout: float = math.inf,
    ) -> None:
        self._stream = stream
        self._max_line = max_line
        self._chunk = chunk
        self._line_timeout = line_timeout
        self._line_began = math.inf  # trio time the buffered, unfinished line began
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._error: LineTooLong | None = None
        self._eof = False

    async def receive_lines(self) -> list[bytes]:
        """The next complete lines (at least one), or [] at end of stream.

        Raises LineTooLong once every line before the long one has been returned, and
        LineTimeout if a line that began is still unfinished `line_timeout` seconds
        later. Always checkpoints (it may receive), plus the stream's own errors.
        """
        received = False
        while not self._lines:
            if self._error is not None:
                raise self._error
            if self._eof:
                if self._buffer:
                    self._lines.append(bytes(self._buffer))
                    self._buffer.clear()
                break
            if self._buffer and self._line_timeout != math.inf:
                data = await self._receive_rest()  # a line has begun: it gets line_timeout
            else:  # the hot path: no deadline to arm (a cancel scope costs a few us)
                data = await receive_some(self._stream, self._chunk)
            received = True
            if data:
                if isinstance(data, bytes) and not self._buffer and data.endswith(b"\n"):
                    # Whole lines in a plain socket's bytes: split them without a copy.
                    lines = data.split(b"\n")
                    lines.pop()  # the empty piece after the last LF
                    self._take(lines, data)
                    continue
                self._buffer += data
                self._split()
                # The unfinished tail began in this chunk iff it fits inside it (a LF in
                # the chunk, or nothing buffered before): one clock read per partial line.
                if 0 < len(self._buffer) <= len(data):
                    self._line_began = trio.current_time()
            else:
                self._eof = True
        if not received:  # like tricycle's receive_line: a checkpoint on every call
            await trio.lowlevel.checkpoint()
        lines, self._lines = self._lines, []
        return lines

    async def receive_line(self) -> bytes | None:
        """The next complete line, or None at end of stream; see `receive_lines`."""
        if not self._lines:
            self._lines = await self.receive_lines()
            if not self._lines:
                return None
        else:
            await trio.lowlevel.checkpoint()
        return self._lines.pop(0)

    async def _receive_rest(self) -> bytes | bytearray:
        with trio.move_on_at(self._line_began + self._line_timeout):
            return await self._stream.receive_some(self._chunk)
        error = LineTimeout(self._line_timeout, bytes(self._buffer[:64]))
        self._buffer.clear()
        self._eof = True  # like a long line: nothing after it is read
        raise error

    def _split(self) -> None:
        buffer = self._buffer
        end = buffer.rfind(b"\n")
        if end >= 0:
            block = bytes(buffer[:end])
            del buffer[: end + 1]
            self._take(block.split(b"\n"), block)
        if self._error is None and len(buffer) > self._max_line:
            self._fail(bytes(buffer))

    def _take(self, lines: list[bytes], block: bytes) -> None:
        """Queue `lines` (the LF-separated pieces of `block`), CRs before LFs dropped."""
        # Checked for the whole block at once (C loops); line by line only if needed.
        if max(map(len, lines)) > self._max_line:
            index = next(i for i, line in enumerate(lines) if len(line) > self._max_line)
            self._fail(lines[index])
            del lines[index:]
        if b"\r" in block:
            lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        self._lines.extend(lines)

    def _fail(self, line: bytes) -> None:
        self._error = LineTooLong(self._max_line, line[:64])
        self._buffer.clear()
        self._eof = True  # nothing after a refused line is read
