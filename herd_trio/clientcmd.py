"""`python -m herd_trio iamat ID [LAT LON]` and `whatsat ID RADIUS BOUND`: tiny clients.

They talk to one server of the config (the first, or `--server NAME`) over a plain
blocking socket, like telnet or nc would, and print the reply (WHATSAT's JSON
re-indented). IAMAT's time is now; its position is LAT LON in decimal degrees, or the
server's own `location` when none is given. Exit status: 0 for an AT reply, 1 for `?`
or no answer, 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from herd_trio import config
from herd_trio.config import ConfigError, HerdConfig
from herd_trio.net import hostport

CLIENT_DEADLINE = 10.0  # seconds for the whole exchange (a WHATSAT waits for places)
_DEGREES = re.compile(r"[+-]?[0-9]{1,3}(?:\.[0-9]+)?")


def coords(lat: str, lon: str) -> str:
    """ISO 6709 `+DD.D-DDD.D` from two decimal degree strings; ValueError if they aren't."""
    if not (_DEGREES.fullmatch(lat) and _DEGREES.fullmatch(lon)):
        raise ValueError(f"expected decimal degrees, not {lat!r} {lon!r}")
    if abs(float(lat)) > 90 or abs(float(lon)) > 180:
        raise ValueError(f"out of range: {lat} {lon}")
    return "".join(v if v[0] in "+-" else "+" + v for v in (lat, lon))


def now_text(ns: int) -> str:
    """POSIX seconds with nanoseconds, exactly."""
    return f"{ns // 10**9}.{ns % 10**9:09d}"


def exchange(host: str, port: int, line: bytes) -> bytes:
    """Send one line, half-close, and read everything until the server closes."""
    with socket.create_connection((host, port), timeout=CLIENT_DEADLINE) as sock:
        sock.sendall(line + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def build_line(args: argparse.Namespace, herd: HerdConfig, server: str) -> bytes:
    """The IAMAT or WHATSAT line the arguments ask for; ValueError if they can't."""
    if args.command == "whatsat":
        return f"WHATSAT {args.id} {args.radius} {args.bound}".encode()
    if args.position:
        if len(args.position) != 2:
            raise ValueError("give both LAT and LON, or neither")
        where = coords(*args.position)
    elif (where := herd.servers[server].location or "") == "":
        raise ValueError(f"no LAT LON given and {server} has no location configured")
    return f"IAMAT {args.id} {where} {now_text(time.time_ns())}".encode()


def show(reply: bytes) -> str:
    """The reply for a terminal: the AT line, then any JSON re-indented."""
    head, _, body = reply.decode("utf-8", "backslashreplace").partition("\n")
    if body.strip():
        try:
            return head + "\n" + json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            return reply.decode("utf-8", "backslashreplace").rstrip("\n")
    return head


def main(command: str, argv: Sequence[str]) -> int:
    """Run `iamat` or `whatsat`; the exit status."""
    parser = argparse.ArgumentParser(prog=f"herd_trio {command}")
    parser.add_argument("id", help="the client id")
    if command == "iamat":
        parser.add_argument("position", nargs="*", metavar="LAT LON", help="decimal degrees")
    else:
        parser.add_argument("radius", type=int, help="km")
        parser.add_argument("bound", type=int, help="at most this many places")
    parser.add_argument("--config", type=Path, help="herd config file; default: built in")
    parser.add_argument("--server", help="the server to ask; default: the config's first")
    args = parser.parse_args(argv)
    args.command = command
    try:
        herd = config.load(args.config)
        server = args.server or next(iter(herd.servers))
        if server not in herd.servers:
            raise ValueError(f"unknown server {server!r}")
        line = build_line(args, herd, server)
    except (ConfigError, ValueError) as exc:
        print(f"herd_trio {command}: {exc}", file=sys.stderr)
        return 2
    cfg = herd.servers[server]
    try:
        reply = exchange(cfg.host, cfg.port, line)
    except OSError as exc:
        where = hostport(cfg.host, cfg.port)
        print(f"herd_trio {command}: {server} at {where}: {exc}", file=sys.stderr)
        return 1
    print(show(reply))
    return 0 if reply.startswith(b"AT ") else 1
