"""End to end: connection limits and hostile clients against a real server process."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.e2e.herd import Herd, connect, exchange, poll, read_until_close, running


async def test_connections_over_max_clients_are_closed_at_once(tmp_path: Path) -> None:
    with running(Herd.create(tmp_path, ["Solo"], [], max_clients=3)) as herd:
        herd.start("Solo")
        port = herd.ports["Solo"]
        held = [await connect(port) for _ in range(3)]
        try:
            for stream in held:  # each of the three is served
                await stream.send_all(b"IAMAT a +1+1 1\n")
                assert (await stream.receive_some()).startswith(b"AT Solo ")
            async with await connect(port) as refused:
                assert await read_until_close(refused, deadline=5) == b""
            await held.pop().aclose()

            async def admitted() -> bytes | None:
                reply = await exchange(port, b"IAMAT a +1+1 1\n")
                return reply or None

            reply = await poll("a fourth client admitted after one left", admitted)
            assert reply.startswith(b"AT Solo ")
        finally:
            for stream in held:
                await stream.aclose()
        await herd.wait_logged("Solo", "refused: 3 clients already connected")


async def test_per_address_cap_refuses_the_extra_connection(tmp_path: Path) -> None:
    with running(Herd.create(tmp_path, ["Solo"], [], max_clients_per_address=2)) as herd:
        herd.start("Solo")
        port = herd.ports["Solo"]
        async with await connect(port) as one, await connect(port) as two:
            await one.send_all(b"x\n")
            await two.send_all(b"y\n")
            assert await one.receive_some() == b"? x\n"
            assert await two.receive_some() == b"? y\n"
            async with await connect(port) as three:
                assert await read_until_close(three, deadline=5) == b""


async def test_an_http_request_gets_its_question_mark_and_is_closed(tmp_path: Path) -> None:
    with running(Herd.create(tmp_path, ["Solo"], [])) as herd:
        herd.start("Solo")
        async with await connect(herd.ports["Solo"]) as stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: y\r\n")
            # No half-close: the server ends the connection by itself.
            assert await read_until_close(stream, deadline=5) == b"? GET / HTTP/1.1\n"


async def test_telnet_interrupt_bytes_and_invalid_utf8_get_question_marks(tmp_path: Path) -> None:
    with running(Herd.create(tmp_path, ["Solo"], [])) as herd:
        herd.start("Solo")
        hostile = [
            b"\xff\xf4\xff\xfd\x06",  # what telnet sends for Ctrl-C (IAC IP IAC DO TM)
            b"IAMAT \xc3\x28\xa0 +1+1 1",  # invalid UTF-8 in a client id is a valid id
            b"\x1b[2J\x1b[31mWHATSAT x 1 1",
            b"IAMAT a\xc2\xa0b +1+1 1",  # U+00A0 is not a separator: one client id
        ]
        reply = await exchange(herd.ports["Solo"], b"\r\n".join(hostile) + b"\r\n")
        lines = reply.split(b"\n")
        assert lines[0] == b"? " + hostile[0]
        assert lines[1].startswith(b"AT Solo +")
        assert lines[1].endswith(b" \xc3\x28\xa0 +1+1 1")
        assert lines[2] == b"? " + hostile[2]
        assert lines[3].endswith(b" a\xc2\xa0b +1+1 1")
        assert lines[4:] == [b""]
        # ...and the server still answers normally afterwards.
        assert (await exchange(herd.ports["Solo"], b"IAMAT ok +1+1 2\n")).startswith(b"AT Solo ")


async def test_an_endless_line_closes_the_connection_with_bounded_memory(tmp_path: Path) -> None:
    with running(Herd.create(tmp_path, ["Solo"], [])) as herd:
        herd.start("Solo")
        async with await connect(herd.ports["Solo"]) as stream:
            await stream.send_all(b"IAMAT a +1+1 1\n")
            sent = 0
            with trio.move_on_after(10):
                try:
                    while sent < 50_000_000:  # bounded: the server must give up long before
                        await stream.send_all(b"x" * 65536)
                        sent += 65536
                except trio.BrokenResourceError:
                    pass
            assert sent < 50_000_000
            reply = await read_until_close(stream)
        assert reply.startswith(b"AT Solo ")
        assert reply.count(b"\n") == 1
        await herd.wait_logged("Solo", "longer than 4096 bytes")
