"""Jepsen-style bookkeeping for the fault scenarios: what was acknowledged, what is held.

The `Checker` records every acknowledged IAMAT (the AT line the server replied with)
and probes servers with pipelined `WHATSAT <client> 1 0` lines (bound 0: no places
call, just the stored AT line). After a fault heals it polls every live server until
each one connected to a record's origin holds that client's newest acknowledged
record, or a newer one by the protocol's key (client time, origin, coords), and all
of them hold the same line. What is still missing at the deadline is *lost*; probes
that returned an older record before convergence are *stale* (informational: that is
what a partition looks like from outside).

Also here: a load generator that keeps one pipelined session per server, the per-process
config variants that point one server at a fault proxy instead of a neighbour's peer
port, log-timestamp readers, /proc memory readings, and the collected figures.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import trio

from herd_trio.protocol import Record, parse_at
from herd_trio.statefile import PersistError, read_all
from tests.e2e.herd import Herd, reachable

PROBE_CONNECT_DEADLINE = 2.0  # seconds to reach a live server's client port
PROBE_DEADLINE = 10.0  # seconds one probe round may take at one server
ROUND_PAUSE = 0.02  # seconds between probe rounds (polling, not synchronisation)
BASE_TIME = 1_700_000_000  # client clock of the generated updates, in whole seconds
_SEQUENCE = itertools.count(1)  # shared by every checker: later updates are newer
_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})(?:Z|[+-]\d\d:\d\d)? ")
JSON_BOUND_0 = b'{\n   "html_attributions": [],\n   "results": [],\n   "status": "OK"\n}\n\n'


def rank_of(line: bytes | None) -> tuple[object, ...] | None:
    """The protocol's ordering key of a stored AT line; None for an unknown client."""
    return None if line is None else parse_at(line).rank


def client_time(seq: int) -> bytes:
    """A client clock value that grows with `seq` (nanosecond steps)."""
    whole, ns = divmod(seq, 1_000_000_000)
    return b"%d.%09d" % (BASE_TIME + whole, ns)


def coords(seq: int) -> bytes:
    """Valid, varied coordinates for update number `seq`."""
    return b"+%02d.%06d-%03d.%06d" % (seq % 90, seq % 999_983, seq % 180, seq % 999_979)


@attrs.frozen
class Verdict:
    """What one `Checker.converge` found."""

    converged: bool
    elapsed: float  # seconds from the call to the end of the first converged round
    rounds: int
    clients: int  # clients checked
    lost: list[tuple[str, bytes]]  # (server, client): behind the newest acknowledged record
    divergent: list[bytes]  # clients whose servers disagree although none is behind
    stale: int  # probes that returned an older record (or none) before convergence
    probes: int  # WHATSAT lines sent by this call


class Checker:
    """Every acknowledged IAMAT and every probe; lost and stale counts."""

    def __init__(self) -> None:
        self.newest: dict[bytes, Record] = {}  # per client, the highest-ranked acked record
        self.acks = 0
        self.probes = 0
        self.stale = 0

    @staticmethod
    def next_update(client: bytes) -> bytes:
        """An IAMAT line for `client`, newer than every update made so far (no LF)."""
        seq = next(_SEQUENCE)
        return b"IAMAT %s %s %s" % (client, coords(seq), client_time(seq))

    def merge(self, other: Checker) -> None:
        """Take in what `other` recorded (a partition side's own checker)."""
        for record in other.newest.values():
            held = self.newest.get(record.client)
            if held is None or record.rank > held.rank:
                self.newest[record.client] = record
        self.acks += other.acks
        self.probes += other.probes
        self.stale += other.stale

    def ack(self, reply: bytes) -> Record:
        """Record an IAMAT's reply (one AT line, with or without its LF)."""
        record = parse_at(reply.removesuffix(b"\n"))
        held = self.newest.get(record.client)
        if held is None or record.rank > held.rank:
            self.newest[record.client] = record
        self.acks += 1
        return record

    def required(self, client: bytes, alive: set[str], herd: Herd) -> set[str]:
        """The live servers that must hold `client`'s newest record: those connected to
        its origin through live servers (the origin counts as a relay even if it is down
        now: it flooded the record before acknowledging it)."""
        origin = self.newest[client].origin.decode()
        return reachable(herd.edges, origin, alive | {origin}) & alive

    async def probe_all(
        self, herd: Herd, names: Iterable[str], clients: Sequence[bytes]
    ) -> dict[str, dict[bytes, bytes | None]]:
        """Every client's stored line at every named server, probed concurrently."""
        results: dict[str, dict[bytes, bytes | None]] = {}

        async def one(name: str) -> None:
            results[name] = await probe(herd.ports[name], clients)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)
        self.probes += len(results) * len(clients)
        return results

    async def converge(
        self,
        herd: Herd,
        names: Iterable[str] | None = None,
        *,
        alive: Iterable[str] | None = None,
        deadline: float = 15.0,
        clients: Iterable[bytes] | None = None,
    ) -> Verdict:
        """Probe `names` (default: all of `alive`) until they hold the newest acknowledged
        record of every client (default: every acknowledged client) that they must hold,
        and agree with each other, or until `deadline`; what is missing then is lost.

        `alive` (default: every running server) decides who is connected to whom.
        """
        live = set(alive if alive is not None else [n for n in herd.names if herd.running(n)])
        probed = set(names) if names is not None else live
        wanted = sorted(self.newest if clients is None else clients)
        need = {c: self.required(c, live, herd) & probed for c in wanted}
        start = trio.current_time()
        stale = probes = rounds = 0
        while True:
            rounds += 1
            held = await self.probe_all(herd, sorted(probed), wanted)
            probes += len(probed) * len(wanted)
            behind: list[tuple[str, bytes]] = []
            divergent: list[bytes] = []
            for client in wanted:
                newest = self.newest[client].rank
                lines = {held[name][client] for name in need[client]}
                for name in sorted(need[client]):
                    line = held[name][client]
                    if line is None or parse_at(line).rank < newest:
                        behind.append((name, client))
                if len(lines) > 1:
                    divergent.append(client)
            now = trio.current_time()
            if not behind and not divergent:
                self.stale += stale
                return Verdict(True, now - start, rounds, len(wanted), [], [], stale, probes)
            stale += len(behind)
            if now - start >= deadline:
                self.stale += stale
                return Verdict(
                    False, now - start, rounds, len(wanted), behind, divergent, stale, probes
                )
            await trio.sleep(ROUND_PAUSE)


async def probe(
    port: int, clients: Sequence[bytes], *, deadline: float = PROBE_DEADLINE
) -> dict[bytes, bytes | None]:
    """Pipeline `WHATSAT <client> 1 0` for every client on one connection; the stored
    AT line of each (without LF), or None where the server answered `?`."""
    request = b"".join(b"WHATSAT %s 1 0\n" % client for client in clients)
    result: dict[bytes, bytes | None] = {}
    with trio.fail_after(deadline):
        with trio.fail_after(PROBE_CONNECT_DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(request)
                await stream.send_eof()

            nursery.start_soon(send)
            replies = _Replies(stream)
            for client in clients:
                first = await replies.until(b"\n")
                if first.startswith(b"? "):
                    result[client] = None
                    continue
                body = await replies.until(b"\n\n")
                assert body == JSON_BOUND_0, (client, body)
                line = first.removesuffix(b"\n")
                assert parse_at(line).client == client, (client, line)
                result[client] = line
    return result


class _Replies:
    """Buffered reading of pipelined replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.position = 0

    async def until(self, terminator: bytes) -> bytes:
        """The bytes up to and including the next `terminator`."""
        while (end := self.buffer.find(terminator, self.position)) < 0:
            del self.buffer[: self.position]
            self.position = 0
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                raise AssertionError(f"server closed early: {bytes(self.buffer[:200])!r}")
            self.buffer += chunk
        start, self.position = self.position, end + len(terminator)
        return bytes(self.buffer[start : self.position])


class Updater:
    """One persistent client session per server for a load generator: each `send` pipelines
    a batch of IAMATs, reads the replies and gives them to the checker."""

    def __init__(self, herd: Herd, checker: Checker) -> None:
        self.herd = herd
        self.checker = checker
        self.streams: dict[str, trio.SocketStream] = {}
        self.sent = 0

    async def send(self, name: str, clients: Sequence[bytes], *, deadline: float = 10.0) -> None:
        """One fresh update per client at server `name`; wait for every reply."""
        await trio.lowlevel.checkpoint()
        if not clients:
            return
        if name not in self.streams:
            with trio.fail_after(PROBE_CONNECT_DEADLINE):
                self.streams[name] = await trio.open_tcp_stream("127.0.0.1", self.herd.ports[name])
        stream = self.streams[name]
        lines = [self.checker.next_update(client) for client in clients]
        with trio.fail_after(deadline):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, b"".join(line + b"\n" for line in lines))
                buffer = bytearray()
                while buffer.count(b"\n") < len(lines):
                    chunk = await stream.receive_some(1 << 16)
                    if not chunk:
                        raise AssertionError(f"{name} closed the update session")
                    buffer += chunk
        replies = bytes(buffer).split(b"\n")
        assert len(replies) == len(lines) + 1, (name, len(replies), len(lines))
        for line, reply in zip(lines, replies, strict=False):
            record = self.checker.ack(reply)
            assert record.client == line.split()[1], (line, reply)
        self.sent += len(lines)

    async def aclose(self) -> None:
        """Close every session."""
        for stream in self.streams.values():
            await stream.aclose()
        self.streams.clear()


async def paced_load(
    updater: Updater,
    names: Sequence[str],
    clients: Sequence[bytes],
    *,
    rate: float,
    seconds: float,
    stop: trio.Event | None = None,
    tick: float = 0.1,
) -> int:
    """Send `rate` updates a second for `seconds` (at most rate * seconds updates, and
    for at most `seconds` + 10 s), cycling over `clients`, dealt over `names` and sent
    to them concurrently every `tick`; stop early once `stop` is set. How many were sent."""
    total = int(rate * seconds)
    per_tick = max(1, int(rate * tick))
    start = trio.current_time()
    sent = 0
    with trio.move_on_after(seconds + 10):
        while sent < total and (stop is None or not stop.is_set()):
            count = min(per_tick, total - sent, len(clients))
            batch = [clients[(sent + k) % len(clients)] for k in range(count)]
            async with trio.open_nursery() as nursery:
                for i, name in enumerate(names):
                    nursery.start_soon(updater.send, name, batch[i :: len(names)])
            sent += count
            await trio.sleep_until(start + sent / rate)  # pacing, not synchronisation
    return sent


def start_proxied(herd: Herd, name: str, peer_ports: dict[str, int]) -> None:
    """Start server `name` with its own config: the same herd, except that the peer
    ports of the servers in `peer_ports` are replaced (by fault proxies' ports), so
    `name` dials the proxy instead. Its log still goes to the herd's `logs` folder."""
    variant = attrs.evolve(
        herd, root=herd.root / f"{name}-config", peer_ports={**herd.peer_ports, **peer_ports}
    )
    variant.write_config()
    # `variant` shares `processes` with `herd`, so herd.running() and stop_all() see it.
    variant.start(name, "--log-dir", str(herd.log(name).parent))
    assert herd.processes[name] is variant.processes[name]


def log_since_start(herd: Herd, name: str) -> list[str]:
    """Server `name`'s log lines since its latest start."""
    log = herd.log(name)
    lines = log.read_text().splitlines() if log.exists() else []
    starts = [i for i, line in enumerate(lines) if " listening for clients on " in line]
    return lines[starts[-1] :] if starts else []


def stamp(line: str) -> float:
    """The wall-clock time (time.time() scale) of a log line."""
    match = _STAMP.match(line)
    assert match is not None, line
    whole = time.mktime(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    return whole + int(match.group(2)) / 1000


async def wait_log_line(
    herd: Herd, name: str, pattern: str, *, after: float = 0.0, deadline: float = 10.0
) -> str:
    """The first line of `name`'s log since its latest start that matches `pattern`
    (a regular expression) and is stamped at or after wall-clock `after`."""
    regex = re.compile(pattern)
    with trio.move_on_after(deadline):
        while True:
            for line in log_since_start(herd, name):
                # Stamps have millisecond resolution: allow the millisecond of `after`.
                if regex.search(line) and stamp(line) >= after - 0.001:
                    return line
            await trio.sleep(0.02)
    raise AssertionError(f"within {deadline} s: {name} logs /{pattern}/ after {after}")


def rss_kib(pid: int) -> int:
    """Resident memory of process `pid` in KiB (/proc/<pid>/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


class Figures:
    """Measured figures per scenario: printed as they come, written as JSON at the end."""

    def __init__(self) -> None:
        self.scenarios: dict[str, dict[str, object]] = {}

    def add(self, scenario: str, **figures: object) -> None:
        """Record (and print) figures of `scenario`; rounded for reading."""
        tidy = {key: _rounded(value) for key, value in figures.items()}
        self.scenarios.setdefault(scenario, {}).update(tidy)
        print(f"\nFAULTS {scenario}: {json.dumps(tidy)}", flush=True)

    def write(self, path: Path) -> None:
        """Merge into the JSON file at `path` (runs of fast and slow tests add up)."""
        old: dict[str, object] = {}
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = {}
        scenarios = old.get("scenarios")
        merged = dict(scenarios) if isinstance(scenarios, dict) else {}
        merged.update(self.scenarios)
        document = {
            "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "scenarios": dict(sorted(merged.items())),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n")


def durable_lines(path: Path) -> dict[bytes, bytes]:
    """The AT lines a server's state file holds now, per client (read-only; {} if the
    file is not there yet). Lines the server has written count: a killed process's
    writes are the kernel's to finish."""
    try:
        return read_all(path)
    except PersistError:
        return {}
