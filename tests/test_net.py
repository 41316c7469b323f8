"""send_within on real sockets: the direct write, the rest under a deadline, the errors."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from herd_trio.net import send_within


def stream_pair() -> tuple[trio.SocketStream, socket.socket]:
    """A trio SocketStream and the plain socket at its other end."""
    ours, theirs = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(5)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the other end closed"
        data += chunk
    return data


async def test_a_reply_that_fits_is_written_at_once() -> None:
    stream, theirs = stream_pair()
    with theirs:
        async with stream:
            await send_within(stream, b"AT Clark +0.000000001 kiwi +1+1 5\n", 1.0)
            assert receive_exactly(theirs, 34) == b"AT Clark +0.000000001 kiwi +1+1 5\n"


async def test_what_the_kernel_does_not_take_goes_under_the_deadline() -> None:
    stream, theirs = stream_pair()
    big = bytes(range(256)) * 40_000  # 10 MB: far beyond the socket buffers
    received = bytearray()

    def read_all() -> None:
        theirs.settimeout(10)
        while len(received) < len(big):
            received.extend(theirs.recv(1 << 20))

    with theirs:
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, read_all)
            await send_within(stream, big, 10.0)
    assert bytes(received) == big  # in order, nothing lost or doubled


async def test_a_reader_that_stops_reading_gives_too_slow_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream, theirs = stream_pair()
    with theirs:
        async with stream:
            with pytest.raises(trio.TooSlowError):
                await send_within(stream, b"x" * (64 << 20), 5.0)


async def test_a_closed_stream_and_a_gone_peer_give_trio_errors() -> None:
    stream, theirs = stream_pair()
    theirs.close()

    async def write_until_broken() -> None:
        for _ in range(100):  # the first write may still land in the buffer
            await send_within(stream, b"x" * 65536, 1.0)

    with pytest.raises(trio.BrokenResourceError):
        await write_until_broken()
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await send_within(stream, b"late\n", 1.0)
