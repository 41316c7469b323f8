"""The two hot paths of a loaded herd, in one process: `python -m bench.paths PATH`.

* `client`: Clark alone, its client handler (client.handle_client, logging on) over
  loopback TCP, 8 connections each sending batches of 16 pipelined IAMATs for new
  clients and reading the 16 replies: what the herd's entry server does per update.
* `relay`: Jaquez's two peer links (links.carry, logging on) over socket pairs: Clark
  sends new records, Jaquez keeps each and forwards it to Campbell, which sends it
  back (a flood's echo, settled as a duplicate): what a relay does per update.
* `limit-client` and `limit-relay`: the same feeders, with the limit server's client
  handler (bench.limit) and the limit herd's peer links (bench.limitherd) in place of
  herd_trio's: the floor each path is compared with.
* `--updates`: each path's clients are a pool of UPDATE_CLIENTS (an equal share per
  connection on the client path), each sent again and again with a later time, so
  after the first round every line is an update of a known client: what a herd whose
  clients move does, where the default (every line a new client) is what the anchor
  benchmark floods. bench.icount's smaller run is past the first round already.

Prints one JSON object: the path, how many lines (updates) it ran, and the process's
CPU microseconds per line, feeders included. CPU time on a shared machine moves by
10-20% from run to run; `python -m bench.icount` counts instructions instead, which
do not move, to size a change of a few percent.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench import limit, limitherd
from herd_trio.__main__ import collect_less
from herd_trio.client import Admission, handle_client
from herd_trio.lines import LineReader
from herd_trio.links import carry
from tests.helpers import Places, herd_config, make_node

CONNECTIONS, DEPTH = 8, 16  # client: connections, and IAMATs per batch on each
RELAY_BATCH = 32  # relay: records per write from Clark
RELAY_AHEAD = 8  # relay: batches Clark may be ahead of what Campbell got back
# Ports are only named in the config; the relay's links run over socket pairs.
RELAY_SERVERS: dict[str, dict[str, object]] = {
    "Campbell": {"port": 1, "peer_port": 2, "neighbours": ["Jaquez"]},
    "Clark": {"port": 3, "peer_port": 4, "neighbours": ["Jaquez"]},
    "Jaquez": {"port": 5, "peer_port": 6},
}
AT = b"AT Clark +0.018393080 r-%d +34.068930-118.445127 1796291240.923466616\n"
# --updates: client r-(n % pool), one second later each time round the pool
AT_UPDATE = b"AT Clark +0.018393080 r-%d +34.068930-118.445127 %d.923466616\n"
UPDATE_CLIENTS = 2048
SECONDS = 1796291240  # AT_UPDATE's first time
Runner = Callable[[], Awaitable[object]]  # a link's task, ready to start


async def client_path(lines: int, log_dir: Path, pool: int | None) -> int:
    """IAMATs through Clark's client handler (see the module doc): `lines`, rounded
    down to whole batches; how many."""
    node = make_node("Clark", herd_config(), log=log_dir / "Clark.log")
    handler = partial(handle_client, node, Places(), Admission(max_clients=CONNECTIONS))
    sent = await feed_clients(handler, lines, pool)
    node.log.close()
    clients = sent if pool is None else min(sent, pool)
    assert len(node.store) == clients, "every IAMAT is kept: a new client or a later time"
    return sent


async def limit_client_path(lines: int, log_dir: Path, pool: int | None) -> int:
    """client_path with the limit server's handler (no store, no log)."""
    return await feed_clients(limit.handle, lines, pool)


async def feed_clients(
    handler: Callable[[trio.SocketStream], Awaitable[None]], lines: int, pool: int | None
) -> int:
    """Serve `handler` on loopback and send it `lines` IAMATs, rounded down to whole
    batches (see the module doc); how many. Their time is the time of their batch, in
    nanoseconds, as bench.loadgen and a client whose clock is in sync send. Each
    connection's clients are new, or its share of a `pool` sent round and round."""
    batches = lines // CONNECTIONS // DEPTH
    share = None if pool is None else pool // CONNECTIONS
    assert share is None or share % DEPTH == 0, "a batch never names a client twice"

    async def connection(number: int, port: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        for batch in range(batches):
            stamp = b"%d.%09d" % divmod(time.time_ns(), 1_000_000_000)
            await stream.send_all(
                b"".join(
                    b"IAMAT c%d-%d +34.068930-118.445127 %s\n"
                    % (number, client if share is None else client % share, stamp)
                    for client in range(batch * DEPTH, (batch + 1) * DEPTH)
                )
            )
            replies = 0
            while replies < DEPTH:
                replies += (await stream.receive_some(1 << 16)).count(b"\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as clients:
            for number in range(CONNECTIONS):
                clients.start_soon(connection, number, port)
        nursery.cancel_scope.cancel()
    return batches * CONNECTIONS * DEPTH


async def relay_path(lines: int, log_dir: Path, pool: int | None) -> int:
    """`lines` records through Jaquez's links, each echoed back (see the module doc)."""
    herd = herd_config(RELAY_SERVERS, sync_interval=3600.0, heartbeat_interval=30.0)
    node = make_node("Jaquez", herd, log=log_dir / "Jaquez.log")

    def links(from_clark: trio.SocketStream, from_campbell: trio.SocketStream) -> list[Runner]:
        return [
            partial(carry, node, "Clark", from_clark, LineReader(from_clark, 8192)),
            partial(carry, node, "Campbell", from_campbell, LineReader(from_campbell, 8192)),
        ]

    await feed_relay(links, lines, pool)
    node.log.close()
    assert len(node.store) == (lines if pool is None else min(lines, pool)), "each kept once"
    assert node.stats.peer("Clark").kept == lines, "every record from Clark is new or later"
    return lines


async def limit_relay_path(lines: int, log_dir: Path, pool: int | None) -> int:
    """relay_path with the limit herd's peer links (no log, no sync, no checks)."""
    server = limitherd.Server("Jaquez", {"servers": RELAY_SERVERS})

    def links(from_clark: trio.SocketStream, from_campbell: trio.SocketStream) -> list[Runner]:
        return [
            partial(server.peer, b"Clark", from_clark, b""),
            partial(server.peer, b"Campbell", from_campbell, b""),
        ]

    await feed_relay(links, lines, pool)
    assert len(server.store) == (lines if pool is None else min(lines, pool)), "each kept once"
    return lines


async def feed_relay(
    links: Callable[[trio.SocketStream, trio.SocketStream], list[Runner]],
    lines: int,
    pool: int | None,
) -> None:
    """Run the relay's two links, as `links(from_clark, from_campbell)` gives them,
    and feed them `lines` records (see the module doc): new clients, or a `pool` of
    them sent round and round, later each time."""
    clark_end, from_clark = map(trio.SocketStream, trio.socket.socketpair())
    campbell_end, from_campbell = map(trio.SocketStream, trio.socket.socketpair())
    echoed = 0
    echo = trio.Event()  # set when Campbell got records back
    done = trio.Event()

    async def clark() -> None:
        nonlocal echo
        for start in range(0, lines, RELAY_BATCH):
            end = min(lines, start + RELAY_BATCH)
            if pool is None:
                batch = b"".join(AT % n for n in range(start, end))
            else:
                batch = b"".join(
                    AT_UPDATE % (n % pool, SECONDS + n // pool) for n in range(start, end)
                )
            await clark_end.send_all(batch)
            while end - echoed > RELAY_AHEAD * RELAY_BATCH:
                echo = trio.Event()
                await echo.wait()

    async def campbell() -> None:
        nonlocal echoed
        pending = b""
        while echoed < lines:
            pending += await campbell_end.receive_some(1 << 16)
            *received, pending = pending.split(b"\n")
            records = [line for line in received if line.startswith(b"AT ")]
            if records:
                echoed += len(records)
                echo.set()
                await campbell_end.send_all(b"\n".join(records) + b"\n")
        done.set()

    async with clark_end, from_clark, campbell_end, from_campbell, trio.open_nursery() as nursery:
        for link in links(from_clark, from_campbell):
            nursery.start_soon(link)
        nursery.start_soon(campbell)
        nursery.start_soon(clark)
        await done.wait()
        nursery.cancel_scope.cancel()


PATHS: dict[str, Callable[[int, Path, int | None], Awaitable[int]]] = {
    "client": client_path,
    "relay": relay_path,
    "limit-client": limit_client_path,
    "limit-relay": limit_relay_path,
}


def measure(path: str, lines: int, updates: bool = False) -> dict[str, Any]:
    """Run one path for `lines` lines (updates of known clients if `updates`); its
    CPU per line."""
    collect_less()  # as a server does (herd_trio.__main__)
    with tempfile.TemporaryDirectory() as log_dir:
        began = time.process_time()
        ran = trio.run(PATHS[path], lines, Path(log_dir), UPDATE_CLIENTS if updates else None)
        cpu = time.process_time() - began
    return {
        "path": path + (" --updates" if updates else ""),
        "lines": ran,
        "cpu_us_per_line": round(cpu / ran * 1e6, 3),
    }


def main() -> None:
    """`python -m bench.paths client|relay [--lines N] [--updates]`."""
    parser = argparse.ArgumentParser(prog="python -m bench.paths", description=__doc__)
    parser.add_argument("path", choices=sorted(PATHS))
    parser.add_argument("--lines", type=int, default=int(os.environ.get("LINES", "64000")))
    parser.add_argument("--updates", action="store_true", help="updates of known clients")
    args = parser.parse_args()
    print(json.dumps(measure(args.path, args.lines, args.updates)))


if __name__ == "__main__":
    main()
