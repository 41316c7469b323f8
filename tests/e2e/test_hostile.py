"""End to end: a server under hostile clients (real processes on 127.0.0.1).

Each test bounds its connection count and its time, asserts the outcome, and prints
the figures that docs/security.md and docs/reliability.md quote (`pytest -s` shows them).
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import trio

from tests.e2e.herd import Herd, connect, poll, read_until_close, running

IAMAT = b"IAMAT kiwi +34.068930-118.445127 1621464827.959498503\n"
GRACE = 0.5  # admission_grace in these tests: held connections become evictable fast


def raise_fd_limit(needed: int) -> None:
    """Give this test process `needed` descriptors, or skip if the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def percentile(samples: list[float], fraction: float) -> float:
    """The sample below which `fraction` of `samples` lie (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def round_trips(stream: trio.SocketStream, count: int) -> list[float]:
    """`count` sequential IAMAT round trips on `stream`; each one's seconds."""
    times = []
    for _ in range(count):
        start = trio.current_time()
        await stream.send_all(IAMAT)
        reply = b""
        with trio.fail_after(5):
            while not reply.endswith(b"\n"):
                reply += await stream.receive_some()
        times.append(trio.current_time() - start)
        assert reply.startswith(b"AT Solo ")
    return times


async def count_logged(herd: Herd, text: str, count: int) -> None:
    """Wait until server Solo's log holds `text` at least `count` times."""

    async def check() -> bool | None:
        await trio.lowlevel.checkpoint()
        log = herd.log("Solo")
        return True if log.exists() and log.read_text().count(text) >= count else None

    await poll(f"{count} x {text!r} in the log", check, deadline=60)


async def held_full(max_clients: int, tmp_path: Path) -> None:
    raise_fd_limit(max_clients + 500)
    herd = Herd.create(tmp_path, ["Solo"], [], max_clients=max_clients, admission_grace=GRACE)
    with running(herd):
        herd.start("Solo")
        port = herd.ports["Solo"]
        held: list[trio.SocketStream] = []
        try:
            for _ in range(max_clients):  # one local process takes every slot
                held.append(await connect(port))
            await count_logged(herd, " connected", max_clients)
            await trio.sleep(GRACE)  # the time the held connections need to become evictable
            start = trio.current_time()
            async with await connect(port) as newcomer:
                first = await round_trips(newcomer, 1)
                admitted = trio.current_time() - start
                times = first + await round_trips(newcomer, 500)
            # The one that gave way is the connection idle longest: the first opened.
            assert await read_until_close(held[0], deadline=LINGER_BOUND) == b""
        finally:
            for stream in held:
                await stream.aclose()
        await herd.wait_logged("Solo", "admitted by closing")
        p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
        print(
            f"\n{max_clients} held: admitted in {admitted * 1000:.1f} ms;"
            f" {len(times)} IAMATs p50 {p50 * 1000:.2f} ms p99 {p99 * 1000:.2f} ms"
        )
        # Served, not stalled behind the held connections (a scan of every held one per
        # admission, or an eviction that waits on a linger, would show here). The bounds
        # leave room for a loaded machine: latency figures belong in `nox -s bench`.
        assert admitted < 1.0
        assert p99 < 0.1


LINGER_BOUND = 5.0  # seconds: an evicted connection's FIN arrives at once, well within this


async def test_a_newcomer_is_admitted_and_served_while_max_clients_are_held(
    tmp_path: Path,
) -> None:
    await held_full(1000, tmp_path)


@pytest.mark.slow
async def test_a_newcomer_is_admitted_while_the_default_10000_clients_are_held(
    tmp_path: Path,
) -> None:
    await held_full(10_000, tmp_path)


async def test_slowloris_connections_are_closed_within_line_timeout(tmp_path: Path) -> None:
    line_timeout, count = 3, 50
    with running(Herd.create(tmp_path, ["Solo"], [], line_timeout=line_timeout)) as herd:
        herd.start("Solo")
        port = herd.ports["Solo"]
        lasted: list[float] = []

        async def slowloris() -> None:
            async with await connect(port) as stream:
                start = trio.current_time()
                with trio.move_on_after(line_timeout + 5):
                    try:
                        while True:  # one byte a second of a line that never ends
                            await stream.send_all(b"x")
                            with trio.move_on_after(1):
                                if await stream.receive_some() == b"":
                                    break
                    except trio.BrokenResourceError:
                        pass
                    lasted.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(slowloris)
            async with await connect(port) as normal:
                times = await round_trips(normal, 300)  # served meanwhile
        print(
            f"\n{count} slowloris connections closed after {min(lasted):.2f}-{max(lasted):.2f} s"
            f" (line_timeout {line_timeout} s); a normal client's p99 meanwhile"
            f" {percentile(times, 0.99) * 1000:.2f} ms"
        )
        assert len(lasted) == count  # every one was closed before the deadline
        assert max(lasted) < line_timeout + 5
        # Served meanwhile: without line_timeout the p99 here was 73 ms. Not the 5 ms target
        # of the admission test: the 50 trickling tasks share this process's loop.
        assert percentile(times, 0.99) < 0.020
        await herd.wait_logged("Solo", f"left a line unfinished for {line_timeout}")


async def test_the_reply_before_an_over_long_line_arrives_every_time(tmp_path: Path) -> None:
    runs, received = 20, 0
    with running(Herd.create(tmp_path, ["Solo"], [])) as herd:
        herd.start("Solo")
        for _ in range(runs):
            async with await connect(herd.ports["Solo"]) as stream:
                # One write: the IAMAT, then a 200,000-byte line (max_line is 4096). The
                # server closes while much of it is unread; without a lingering close the
                # kernel sent RST and this client lost the reply (or got ECONNRESET).
                await stream.send_all(IAMAT + b"x" * 200_000 + b"\n")
                reply = await read_until_close(stream, deadline=10)
            assert reply.startswith(b"AT Solo ")
            assert reply.count(b"\n") == 1  # nothing for the long line
            received += 1
        print(f"\nreply before an over-long line received in {received} of {runs} runs")
        assert received == runs
