"""The lab itself: namespaces reach one another only by their own addresses, and the
faults it makes (nft loss, cuts) do what they say. Checked before any scenario uses them."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import trio

from tests.hosts.lab import (
    DELAY_SCRIPT,
    SUBNET4,
    inside,
    lab,
    missing,
    open_stream,
    require_lab,
    sh,
    start_forwarder,
)

SO_RCVBUFFORCE = 33  # Linux <asm-generic/socket.h>; the socket module lacks the name


async def reaches(ns: str, host: str, port: int) -> bool:
    with trio.move_on_after(1.0):
        try:
            stream = await open_stream(ns, host, port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


async def test_hosts_reach_each_other_and_cuts_stop_it() -> None:
    with lab(2) as made:
        server = sh(*made.exec(2, "true"))
        assert server.returncode == 0
        with inside(made.ns(2)):
            listener = trio.socket.socket()
        await listener.bind((f"{SUBNET4}.2", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert await reaches(made.ns(1), f"{SUBNET4}.2", port)
        made.cut(2)
        assert not await reaches(made.ns(1), f"{SUBNET4}.2", port)
        made.heal(2)
        assert await reaches(made.ns(1), f"{SUBNET4}.2", port)
        listener.close()
        names = sh("ip", "netns", "list").stdout
        assert made.ns(1) in names
    assert made.ns(1) not in sh("ip", "netns", "list").stdout  # removed on exit


async def test_nft_numgen_loss_drops_the_share_it_says() -> None:
    """500 datagrams through a 50% loss rule: between 150 and 350 arrive (p < 1e-19 off)."""
    with lab(2) as made:
        with inside(made.ns(2)):
            receiver = trio.socket.socket(type=socket.SOCK_DGRAM)
        with inside(made.ns(1)):
            sender = trio.socket.socket(type=socket.SOCK_DGRAM)
        with receiver, sender:
            # room for all 500 (as root, past rmem_max): a full buffer is loss we did not make
            receiver.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
            await receiver.bind((f"{SUBNET4}.2", 0))
            target = receiver.getsockname()
            await sender.sendto(b"warm", target)  # resolves the neighbour (ARP) first
            assert await receiver.recv(16) == b"warm"
            made.loss(1, 50)
            refused = 0
            for _ in range(500):
                try:
                    await sender.sendto(b"x", target)
                except PermissionError:  # an output-hook drop says EPERM to the sender
                    refused += 1
            arrived = 0
            while True:
                with trio.move_on_after(0.5) as quiet:
                    await receiver.recv(16)
                if quiet.cancelled_caught:
                    break
                arrived += 1
        assert 150 <= arrived <= 350, arrived
        assert arrived + refused == 500


async def test_delay_forwarder_adds_its_delay_each_way() -> None:
    """delay.py in host 2 on its second address: an echo through it takes two delays."""
    delay = 0.05
    with lab(2) as made:
        with inside(made.ns(2)):
            listener = trio.socket.socket()
        await listener.bind((f"{SUBNET4}.2", 0))
        listener.listen()
        port = listener.getsockname()[1]
        argv = [sys.executable, str(DELAY_SCRIPT), f"{SUBNET4}.102", str(port)]
        argv += [f"{SUBNET4}.2", str(port), str(delay)]
        forwarder = start_forwarder(made.exec(2, *argv))  # returns once it listens
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_echo_once, listener)
                stream = await open_stream(made.ns(1), f"{SUBNET4}.102", port)
                async with stream:
                    began = trio.current_time()
                    await stream.send_all(b"ping")
                    assert await stream.receive_some(16) == b"ping"
                    rtt = trio.current_time() - began
        finally:
            forwarder.terminate()
            forwarder.wait(timeout=10)
            listener.close()
    assert 2 * delay <= rtt < 2 * delay + 0.1, rtt


async def _echo_once(listener: trio.socket.SocketType) -> None:
    conn, _ = await listener.accept()
    with conn:
        data = await conn.recv(16)
        await conn.send(data)


async def test_tbf_caps_a_hosts_bandwidth() -> None:
    """1 MB through an 8 Mbit/s token bucket takes about a second (unlimited: ms)."""
    with lab(2) as made:
        with inside(made.ns(2)):
            listener = trio.socket.socket()
        await listener.bind((f"{SUBNET4}.2", 0))
        listener.listen()
        made.limit(1, "8mbit")
        received = 0
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                nonlocal received
                conn, _ = await listener.accept()
                with conn:
                    while data := await conn.recv(65536):
                        received += len(data)

            nursery.start_soon(drain)
            stream = await open_stream(made.ns(1), f"{SUBNET4}.2", listener.getsockname()[1])
            began = trio.current_time()
            async with stream:
                await stream.send_all(b"x" * 1_000_000)
                await stream.send_eof()
        elapsed = trio.current_time() - began
        listener.close()
    assert received == 1_000_000
    assert 0.8 <= elapsed < 5.0, elapsed


def test_without_root_the_scenarios_skip_and_ci_fails_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = missing()
    assert reason is not None
    assert "needs root" in reason
    monkeypatch.delenv("HERD_REQUIRE_ALL", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        require_lab()
    monkeypatch.setenv("HERD_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception, match="HERD_REQUIRE_ALL=1 forbids skipping"):
        require_lab()
