"""The fault proxy itself, over real loopback sockets: each mode does what it says."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import attrs
import pytest
import trio

from tests.faultproxy import (
    BLACKHOLE,
    PASS,
    RESET,
    Delay,
    FaultProxy,
    FaultProxyStatistics,
    Throttle,
    open_fault_proxy,
)

QUIET = 0.3  # seconds of silence taken as "nothing arrives" (loopback takes microseconds)


@attrs.define(eq=False)
class Target:
    """A server behind the proxy: echoes, or hands each connection to the test."""

    echo: bool
    port: int = 0
    ended: list[str] = attrs.field(factory=list)  # how each echo connection ended
    _send: trio.MemorySendChannel[trio.SocketStream] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[trio.SocketStream] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.SocketStream](math.inf)

    async def handle(self, stream: trio.SocketStream) -> None:
        await trio.lowlevel.checkpoint()
        if not self.echo:
            self._send.send_nowait(stream)
            await trio.sleep_forever()  # the test drives it; serve_tcp closes it on cancel
        try:
            async for chunk in stream:
                await stream.send_all(chunk)
            await stream.send_eof()
            self.ended.append("eof")
        except trio.BrokenResourceError:
            self.ended.append("reset")

    async def accept(self) -> trio.SocketStream:
        """The next connection that reached this target."""
        return await self._receive.receive()


async def start_target(nursery: trio.Nursery, *, echo: bool) -> Target:
    target = Target(echo)
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, target.handle, 0, host="127.0.0.1")
    )
    target.port = listeners[0].socket.getsockname()[1]
    return target


@pytest.fixture
async def echo(nursery: trio.Nursery) -> Target:
    return await start_target(nursery, echo=True)


@pytest.fixture
async def target(nursery: trio.Nursery) -> Target:
    return await start_target(nursery, echo=False)


async def start_proxy(nursery: trio.Nursery, target: Target) -> FaultProxy:
    proxy = FaultProxy(target.port)
    port: int = await nursery.start(proxy.serve)
    assert port == proxy.port != 0
    return proxy


async def dial(proxy: FaultProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """`size` bytes from `stream`; fails on EOF, or if they take more than 5 s."""
    data = b""
    with trio.fail_after(5):
        await trio.lowlevel.checkpoint()
        while len(data) < size:
            chunk = await stream.receive_some(size - len(data))
            assert chunk, f"EOF after {len(data)} of {size} bytes"
            data += chunk
    return data


async def assert_quiet(stream: trio.abc.ReceiveStream) -> None:
    """Nothing arrives on `stream` for QUIET seconds, and it is not closed either."""
    with trio.move_on_after(QUIET) as scope:
        data = await stream.receive_some()
        raise AssertionError(f"expected silence, got {data!r}")
    assert scope.cancelled_caught


async def assert_reset(stream: trio.abc.ReceiveStream) -> None:
    """`stream` is reset (RST, not a polite EOF) promptly."""
    with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
        await stream.receive_some()


async def wait_stats(
    proxy: FaultProxy, condition: Callable[[FaultProxyStatistics], bool]
) -> FaultProxyStatistics:
    with trio.fail_after(2):
        return await proxy.wait_for(condition)


async def test_pass_forwards_both_ways_and_counts(nursery: trio.Nursery, target: Target) -> None:
    proxy = await start_proxy(nursery, target)
    async with await dial(proxy) as client, await target.accept() as server:
        await client.send_all(b"ping")
        assert await receive_exactly(server, 4) == b"ping"
        await server.send_all(b"pong!")
        assert await receive_exactly(client, 5) == b"pong!"
        stats = await wait_stats(proxy, lambda s: s.bytes_to_client == 5)
        assert stats == FaultProxyStatistics(
            accepted=1,
            active=1,
            refused=0,
            resets=0,
            bytes_to_target=4,
            bytes_to_client=5,
            bytes_dropped=0,
        )
    await wait_stats(proxy, lambda s: s.active == 0)


async def test_half_close_is_forwarded_each_way(nursery: trio.Nursery, echo: Target) -> None:
    proxy = await start_proxy(nursery, echo)
    payload = bytes(range(256)) * 1000  # more than the kernel buffers and one CHUNK
    async with await dial(proxy) as client:

        async def send_then_eof() -> None:
            await client.send_all(payload)
            await client.send_eof()

        async with trio.open_nursery() as sender:
            sender.start_soon(send_then_eof)
            assert await receive_exactly(client, len(payload)) == payload
            with trio.fail_after(2):
                assert await client.receive_some() == b""  # the echo's EOF came through
    assert echo.ended == ["eof"]  # and the echo saw our EOF, not a reset
    await wait_stats(proxy, lambda s: s.active == 0 and s.resets == 0)


async def test_blackhole_drops_both_ways_without_closing(
    nursery: trio.Nursery, target: Target
) -> None:
    proxy = await start_proxy(nursery, target)
    async with await dial(proxy) as client, await target.accept() as server:
        await client.send_all(b"before")
        assert await receive_exactly(server, 6) == b"before"
        proxy.mode = BLACKHOLE
        await client.send_all(b"lost up")
        await server.send_all(b"lost down")
        await assert_quiet(server)
        await assert_quiet(client)
        stats = await wait_stats(proxy, lambda s: s.bytes_dropped == 16)
        assert (stats.bytes_to_target, stats.bytes_to_client, stats.active) == (6, 0, 1)
        await client.send_eof()  # FINs vanish too
        await assert_quiet(server)


async def test_after_a_blackhole_new_connections_pass_and_lost_bytes_stay_lost(
    nursery: trio.Nursery, target: Target
) -> None:
    proxy = await start_proxy(nursery, target)
    async with (
        await dial(proxy) as used,
        await target.accept() as used_far,
        await dial(proxy) as idle,
        await target.accept() as idle_far,
    ):
        proxy.mode = BLACKHOLE
        await used.send_all(b"dropped")
        await wait_stats(proxy, lambda s: s.bytes_dropped == 7)
        async with await dial(proxy) as during:  # dialled during the partition
            await wait_stats(proxy, lambda s: s.accepted == 3)
            proxy.mode = PASS
            # A stream with a hole in it is never delivered: that connection stays dead.
            await used.send_all(b"after")
            await during.send_all(b"after")
            await assert_quiet(used_far)
            # A connection that lost nothing carries on, and new ones pass.
            await idle.send_all(b"resumed")
            assert await receive_exactly(idle_far, 7) == b"resumed"
            async with await dial(proxy) as fresh, await target.accept() as fresh_far:
                await fresh.send_all(b"new")
                assert await receive_exactly(fresh_far, 3) == b"new"
                with trio.move_on_after(QUIET):  # `during` never reached the target
                    pytest.fail(f"unexpected connection {await target.accept()!r}")


async def test_delay_holds_each_chunk_for_the_delay_in_order(
    nursery: trio.Nursery, target: Target
) -> None:
    proxy = await start_proxy(nursery, target)
    proxy.mode = Delay(0.2)
    async with await dial(proxy) as client, await target.accept() as server:
        start = trio.current_time()
        for part in (b"one ", b"two ", b"three"):
            await client.send_all(part)
            await trio.sleep(0.05)  # separate chunks
        assert await receive_exactly(server, 4) == b"one "
        first = trio.current_time() - start
        assert await receive_exactly(server, 9) == b"two three"
        last = trio.current_time() - start
    assert 0.2 <= first < 0.5
    # Latency, not a bandwidth cap: the three chunks were in flight together.
    assert 0.3 <= last < 0.6


async def test_ending_a_delay_releases_held_chunks_at_once(
    nursery: trio.Nursery, target: Target
) -> None:
    proxy = await start_proxy(nursery, target)
    proxy.mode = Delay(30)
    async with await dial(proxy) as client, await target.accept() as server:
        await client.send_all(b"held")
        await wait_stats(proxy, lambda s: s.accepted == 1)
        await assert_quiet(server)
        proxy.mode = PASS
        with trio.fail_after(1):
            assert await receive_exactly(server, 4) == b"held"


async def test_throttle_limits_throughput(nursery: trio.Nursery, target: Target) -> None:
    proxy = await start_proxy(nursery, target)
    proxy.mode = Throttle(200_000)
    payload = b"x" * 100_000
    async with await dial(proxy) as client, await target.accept() as server:
        start = trio.current_time()
        async with trio.open_nursery() as sender:
            sender.start_soon(client.send_all, payload)
            assert await receive_exactly(server, len(payload)) == payload
        elapsed = trio.current_time() - start
    assert 0.4 <= elapsed < 1.5  # 100 kB at 200 kB/s: 0.5 s


async def test_reset_resets_both_ends_and_refuses_new_connections(
    nursery: trio.Nursery, target: Target
) -> None:
    proxy = await start_proxy(nursery, target)
    async with await dial(proxy) as client, await target.accept() as server:
        await client.send_all(b"hi")
        assert await receive_exactly(server, 2) == b"hi"
        proxy.mode = RESET
        await assert_reset(client)
        await assert_reset(server)
    async with await dial(proxy) as refused:
        await assert_reset(refused)
    stats = await wait_stats(proxy, lambda s: s.refused == 1)
    assert (stats.accepted, stats.active, stats.resets) == (2, 0, 1)
    proxy.mode = PASS
    async with await dial(proxy) as client, await target.accept() as server:
        await client.send_all(b"back")
        assert await receive_exactly(server, 4) == b"back"


async def test_a_reset_from_one_side_resets_the_other(
    nursery: trio.Nursery, target: Target
) -> None:
    proxy = await start_proxy(nursery, target)
    async with await dial(proxy) as client:
        async with await target.accept() as server:
            await client.send_all(b"hi")
            assert await receive_exactly(server, 2) == b"hi"
            server.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        await assert_reset(client)
    await wait_stats(proxy, lambda s: s.resets == 1 and s.active == 0)


async def test_an_unreachable_target_resets_the_client(nursery: trio.Nursery) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # a port with nobody listening
    async with open_fault_proxy(port) as proxy, await dial(proxy) as client:
        await assert_reset(client)
        await wait_stats(proxy, lambda s: s.resets == 1)


async def test_hundreds_of_concurrent_connections(echo: Target) -> None:
    count, rounds = 200, 3
    async with open_fault_proxy(echo.port) as proxy:

        async def talk(i: int) -> None:
            async with await dial(proxy) as client:
                for r in range(rounds):
                    message = b"%04d/%d:" % (i, r) + b"." * 1000
                    await client.send_all(message)
                    assert await receive_exactly(client, len(message)) == message

        with trio.fail_after(10):
            async with trio.open_nursery() as clients:
                for i in range(count):
                    clients.start_soon(talk, i)
            stats = await proxy.wait_for(lambda s: s.active == 0)
    size = count * rounds * 1007
    assert (stats.accepted, stats.resets) == (count, 0)
    assert stats.bytes_to_target == stats.bytes_to_client == size


async def test_stopping_the_proxy_closes_its_connections(echo: Target) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", echo.port) as direct:
        await direct.send_all(b"!")  # the echo target outlives the proxy
        async with open_fault_proxy(echo.port) as proxy:
            client = await dial(proxy)
            await client.send_all(b"hi")
            assert await receive_exactly(client, 2) == b"hi"
        async with client:
            with trio.fail_after(2):
                assert await client.receive_some() == b""  # closed (FIN), not reset
        assert await receive_exactly(direct, 1) == b"!"
