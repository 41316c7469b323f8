"""LineReader: framing (PROTOCOL.md §1) and the hard cap on line length."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
import trio
import trio.testing

from herd_trio.lines import CHUNK, LineReader, LineTimeout, LineTooLong


class Script(trio.abc.ReceiveStream):
    """A receive stream that hands out scripted chunks, then EOF; it records its use."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._rest = b""
        self.delivered = 0
        self.asked: list[int | None] = []
        self.reader: LineReader | None = None
        self.buffered_at_receive: list[int] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        self.asked.append(max_bytes)
        if self.reader is not None:
            self.buffered_at_receive.append(len(self.reader._buffer))
        if not self._rest:
            self._rest = next(self._chunks, b"")
        size = len(self._rest) if max_bytes is None else max_bytes
        data, self._rest = self._rest[:size], self._rest[size:]
        self.delivered += len(data)
        return data

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


async def drain(reader: LineReader, lines: list[bytes]) -> None:
    while batch := await reader.receive_lines():
        lines += batch


async def all_lines(reader: LineReader) -> list[bytes]:
    lines: list[bytes] = []
    while (line := await reader.receive_line()) is not None:
        lines.append(line)
    return lines


async def test_lines_end_at_lf() -> None:
    reader = LineReader(Script([b"a\nbb\n\nccc\n"]), max_line=64)
    assert await reader.receive_lines() == [b"a", b"bb", b"", b"ccc"]
    assert await reader.receive_lines() == []


async def test_one_cr_before_lf_is_dropped() -> None:
    reader = LineReader(Script([b"a\r\nb\r\r\nc\rd\n\r\n\re\n"]), max_line=64)
    assert await all_lines(reader) == [b"a", b"b\r", b"c\rd", b"", b"\re"]


async def test_unterminated_last_line_is_a_line_at_eof() -> None:
    reader = LineReader(Script([b"first\nla", b"st"]), max_line=64)
    assert await reader.receive_lines() == [b"first"]
    assert await reader.receive_lines() == [b"last"]
    assert await reader.receive_lines() == []
    assert await reader.receive_line() is None


async def test_lines_split_one_byte_at_a_time() -> None:
    data = b"IAMAT kiwi +34-118 1\r\nWHATSAT kiwi 10 5\n\n\r\nz"
    reader = LineReader(Script(one_byte_at_a_time(data)), max_line=64)
    assert await all_lines(reader) == [
        b"IAMAT kiwi +34-118 1",
        b"WHATSAT kiwi 10 5",
        b"",
        b"",
        b"z",
    ]


async def test_crlf_split_between_chunks_drops_the_cr() -> None:
    reader = LineReader(Script([b"abc\r", b"\ndef\r", b"\r", b"\n"]), max_line=64)
    assert await all_lines(reader) == [b"abc", b"def\r"]


class ByteArrays(Script):
    """Hands out its chunks as bytearrays, as a TLS stream may."""

    async def receive_some(self, max_bytes: int | None = None) -> bytearray:  # type: ignore[override]
        return bytearray(await super().receive_some(max_bytes))


@pytest.mark.parametrize("stream", [Script, ByteArrays])
async def test_lines_are_bytes_whole_chunks_or_not(stream: type[Script]) -> None:
    reader = LineReader(stream([b"a\r\nbb\n", b"c", b"c\n", b"dd\n"]), max_line=64)
    lines = [*await reader.receive_lines(), *await reader.receive_lines()]
    lines += await reader.receive_lines()
    assert lines == [b"a", b"bb", b"cc", b"dd"]
    assert {type(line) for line in lines} == {bytes}  # hashable: store keys, log entries


async def test_empty_stream_gives_no_lines() -> None:
    reader = LineReader(Script([]), max_line=64)
    assert await reader.receive_lines() == []
    assert await reader.receive_line() is None
    assert await reader.receive_lines() == []


async def test_receive_line_and_receive_lines_share_the_buffer() -> None:
    reader = LineReader(Script([b"a\nb\nc\n", b"d\ne"]), max_line=64)
    assert await reader.receive_line() == b"a"
    assert await reader.receive_lines() == [b"b", b"c"]
    assert await reader.receive_line() == b"d"
    assert await reader.receive_line() == b"e"
    assert await reader.receive_lines() == []


@pytest.mark.parametrize(
    "line",
    [b"x" * 64, b"x" * 63 + b"\r", b"x" * 62 + b"\r\r"],
    ids=["64-bytes", "63-bytes-and-cr", "62-bytes-and-2-cr"],
)
async def test_line_of_exactly_max_line_bytes_is_accepted(line: bytes) -> None:
    reader = LineReader(Script([line + b"\n", b"next\n"]), max_line=64)
    assert await all_lines(reader) == [line.removesuffix(b"\r"), b"next"]


@pytest.mark.parametrize(
    "line", [b"x" * 65, b"x" * 64 + b"\r"], ids=["65-bytes", "64-bytes-and-cr"]
)
@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "byte-by-byte"])
async def test_line_of_max_line_plus_one_bytes_is_refused(line: bytes, split: bool) -> None:
    data = line + b"\nnext\n"
    reader = LineReader(Script(one_byte_at_a_time(data) if split else [data]), max_line=64)
    with pytest.raises(LineTooLong) as info:
        await reader.receive_lines()
    assert info.value.head == line[:64]
    with pytest.raises(LineTooLong):  # nothing after a refused line is ever returned
        await reader.receive_line()


async def test_long_line_is_refused_while_it_is_still_arriving() -> None:
    stream = Script(itertools.repeat(b"x", 10_000))  # one byte per chunk, never an LF
    reader = LineReader(stream, max_line=64)
    with pytest.raises(LineTooLong):
        await reader.receive_lines()
    assert stream.delivered == 65
    calls = len(stream.asked)
    with pytest.raises(LineTooLong):
        await reader.receive_lines()
    assert len(stream.asked) == calls  # no more reading after the refusal


async def test_long_line_over_a_memory_stream_is_refused_before_any_lf() -> None:
    client, server = trio.testing.memory_stream_pair()
    reader = LineReader(server, max_line=100)
    outcome: list[list[bytes] | LineTooLong] = []

    async def read() -> None:
        try:
            outcome.append(await reader.receive_lines())
        except LineTooLong as exc:
            outcome.append(exc)

    await client.send_all(b"ok\r\n" + b"y" * 50)
    assert await reader.receive_lines() == [b"ok"]
    with trio.fail_after(5):  # a reader that never refuses fails instead of hanging
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await client.send_all(b"y" * 49 + b"\r")  # exactly 100 bytes so far: still fine
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == []
            await client.send_all(b"y")  # the 101st byte, and still no LF
    [error] = outcome
    assert isinstance(error, LineTooLong)
    assert error.head == b"y" * 64


async def test_lines_before_a_long_line_are_returned_first() -> None:
    stream = Script([b"one\ntwo\r\n" + b"x" * 100 + b"\nafter\n"])
    reader = LineReader(stream, max_line=64)
    assert await reader.receive_lines() == [b"one", b"two"]
    with pytest.raises(LineTooLong):
        await reader.receive_lines()


async def test_lines_before_an_unfinished_long_line_are_returned_first() -> None:
    stream = Script([b"one\n", b"two\n" + b"x" * 40, b"x" * 40])
    reader = LineReader(stream, max_line=64)
    assert await reader.receive_line() == b"one"
    assert await reader.receive_line() == b"two"
    with pytest.raises(LineTooLong):
        await reader.receive_line()
    assert stream.delivered == 88


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
async def test_buffer_stays_below_max_line_plus_chunk(chunk: int) -> None:
    pattern = b"x" * 30 + b"\r\n" + b"y" * 60 + b"\n"  # lines near the cap, then a long one
    stream = Script(itertools.chain([pattern * 5], itertools.repeat(b"z" * 50, 1000)))
    reader = LineReader(stream, max_line=64, chunk=chunk)
    stream.reader = reader
    lines: list[bytes] = []
    with pytest.raises(LineTooLong):
        await drain(reader, lines)
    assert lines == [b"x" * 30, b"y" * 60] * 5
    assert set(stream.asked) == {chunk}
    assert max(stream.buffered_at_receive) <= 64  # + at most one chunk while splitting
    assert len(reader._buffer) == 0  # the refused line is dropped at once
    assert stream.delivered <= len(pattern) * 5 + 65 + chunk


async def test_default_chunk_is_asked_for() -> None:
    stream = Script([b"a\n"])
    reader = LineReader(stream, max_line=64)
    assert await reader.receive_lines() == [b"a"]
    assert stream.asked == [CHUNK]


async def test_receive_line_checkpoints_even_when_the_line_is_buffered() -> None:
    # The docstrings promise "Always checkpoints"; a reader that returns buffered lines
    # without a schedule point lets a pipelining peer starve every other task.
    reader = LineReader(Script([b"a\nb\n"]), max_line=64)
    assert await reader.receive_line() == b"a"
    with trio.testing.assert_checkpoints():
        assert await reader.receive_line() == b"b"


async def test_receive_lines_checkpoints_at_end_of_stream() -> None:
    reader = LineReader(Script([b"a\n"]), max_line=64)
    assert await reader.receive_lines() == [b"a"]
    assert await reader.receive_lines() == []
    with trio.testing.assert_checkpoints():
        assert await reader.receive_lines() == []


# --- line_timeout (slowloris) --------------------------------------------------------------------


async def test_an_unfinished_line_times_out_counted_from_its_first_byte(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    client, server = trio.testing.memory_stream_pair()
    reader = LineReader(server, 4096, line_timeout=3)
    await client.send_all(b"done\nIAM")  # a line ends, the next one begins now
    assert await reader.receive_lines() == [b"done"]
    begun = trio.current_time()

    async def trickle() -> None:  # a byte every 0.9 s, never the LF
        for byte in b"AT kiwi":
            await trio.sleep(0.9)
            await client.send_all(bytes([byte]))

    nursery.start_soon(trickle)
    with pytest.raises(LineTimeout) as caught:
        await reader.receive_lines()
    assert trio.current_time() - begun == 3
    assert caught.value.head == b"IAMAT "  # bytes at 0.9, 1.8 and 2.7 s
    assert await reader.receive_lines() == []  # nothing after it is read


async def test_each_line_gets_its_own_line_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    reader = LineReader(server, 4096, line_timeout=3)
    await client.send_all(b"ab")
    await trio.sleep(2)
    await client.send_all(b"c\nde")  # "abc" ends in time; "de" begins at t=2
    assert await reader.receive_lines() == [b"abc"]
    await trio.sleep(2.5)  # t=4.5: past the first line's deadline, inside the second's
    await client.send_all(b"f\n")
    assert await reader.receive_lines() == [b"def"]
    await trio.sleep(3600)  # no line begun: waiting for one is never timed
    await client.send_all(b"g\n")
    assert await reader.receive_lines() == [b"g"]
