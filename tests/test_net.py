"""send_within and receive_some on real sockets: the direct write, the rest under a
deadline, the direct read, the waits and the errors."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from herd_trio.net import receive_some, send_within


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


async def test_a_send_is_a_checkpoint_like_send_all_also_when_written_at_once() -> None:
    stream, theirs = stream_pair()
    with theirs:
        async with stream:
            with trio.testing.assert_checkpoints():
                await send_within(stream, b"AT Clark +0.000000001 kiwi +1+1 5\n", 1.0)
            assert receive_exactly(theirs, 34) == b"AT Clark +0.000000001 kiwi +1+1 5\n"
            with trio.CancelScope() as scope:  # and a cancelled task gets Cancelled
                scope.cancel()
                with pytest.raises(trio.Cancelled):
                    await send_within(stream, b"x\n", 1.0)
            assert receive_exactly(theirs, 2) == b"x\n"  # after the write, as send_all may
            with trio.testing.assert_no_checkpoints():  # a caller that yields itself after
                await send_within(stream, b"y\n", 1.0, then_yield=False)
            assert receive_exactly(theirs, 2) == b"y\n"


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


async def test_receive_some_reads_what_is_there_waits_for_more_and_sees_the_end(
    nursery: trio.Nursery,
) -> None:
    stream, theirs = stream_pair()
    with theirs:
        async with stream:
            theirs.sendall(b"IAMAT a +1+1 1\n")
            assert await receive_some(stream, 65536) == b"IAMAT a +1+1 1\n"
            received: list[bytes] = []
            done = trio.Event()

            async def reader() -> None:
                received.append(bytes(await receive_some(stream, 65536)))
                done.set()

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert received == []  # nothing there: it waits
            theirs.sendall(b"IAMAT b +1+1 2\n")
            with trio.fail_after(5):
                await done.wait()
            assert received == [b"IAMAT b +1+1 2\n"]
            theirs.shutdown(socket.SHUT_WR)
            assert await receive_some(stream, 65536) == b""  # the end of the stream


async def test_receive_some_checkpoints_even_when_data_is_there() -> None:
    stream, theirs = stream_pair()
    with theirs:
        async with stream:
            theirs.sendall(b"x\n")
            with trio.CancelScope() as scope:
                scope.cancel()
                await receive_some(stream, 65536)  # cancelled before it reads
            assert scope.cancelled_caught
            assert await receive_some(stream, 65536) == b"x\n"  # nothing was lost


async def test_receive_some_gives_trio_errors_for_a_reset_and_a_closed_stream() -> None:
    stream, theirs = stream_pair()
    theirs.sendall(b"sent before the reset\n")
    await send_within(stream, b"unread\n", 1.0)
    theirs.close()  # with our line unread: the kernel resets the connection

    async def read_until_broken() -> None:
        for _ in range(3):  # what was sent before the reset may come first
            await receive_some(stream, 65536)

    with pytest.raises(trio.BrokenResourceError):
        await read_until_broken()
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await receive_some(stream, 65536)


async def test_receive_some_on_another_stream_is_its_own() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"hello\n")
    assert await receive_some(right, 65536) == b"hello\n"
