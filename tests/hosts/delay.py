"""A delaying TCP forwarder for the multi-host tests (the kernel here has no netem).

    python tests/hosts/delay.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT SECONDS

Run inside a network namespace (`ip netns exec NS ...`): it accepts on LISTEN, dials
TARGET for each connection and forwards both ways, each chunk `SECONDS` after it
arrived, in order (latency, not a bandwidth cap). EOF is forwarded; a reset or an
error on either side closes both. It prints READY on stdout once it accepts, and
runs until killed. Buffering is bounded (QUEUE chunks a direction) so TCP pushes back.
"""

from __future__ import annotations

import sys

import trio

READY = b"READY"  # the line printed once the forwarder accepts

CHUNK = 65536
QUEUE = 64


async def pump(source: trio.SocketStream, sink: trio.SocketStream, delay: float) -> None:
    """Forward `source` to `sink`, each chunk `delay` seconds late; EOF at the end."""
    send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUE)

    async def read() -> None:
        with send:
            while data := await source.receive_some(CHUNK):
                await send.send((trio.current_time() + delay, data))

    async def write() -> None:
        with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                await sink.send_all(data)
        await sink.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)


async def forward(target: tuple[str, int], delay: float, client: trio.SocketStream) -> None:
    """Carry one connection to `target`; any error closes both ends."""
    try:
        server = await trio.open_tcp_stream(*target)
    except OSError:
        await client.aclose()
        return
    try:
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server, delay)
            nursery.start_soon(pump, server, client, delay)
    except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # one side went away: both are closed


async def main(argv: list[str]) -> None:
    """Listen, say READY, forward until killed."""
    host, port, target_host, target_port, seconds = argv
    listeners = await trio.open_tcp_listeners(int(port), host=host)
    print(READY.decode(), flush=True)  # the starter waits for this line

    async def handle(stream: trio.SocketStream) -> None:
        await forward((target_host, int(target_port)), float(seconds), stream)

    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
