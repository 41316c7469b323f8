"""Per-call cost of herd_trio's hot functions, in isolation: `python -m bench.micro`.

The profile says where a loaded server spends its time; this says what one call costs,
so a suggested change can be sized (a function called 8 times per update at 3 us is
24 us of the herd's CPU per update). Prints one JSON object: microseconds per call.
Each case is independent: one that no longer matches herd_trio's API is reported as an
error, not a crash (the product changes under the benchmark).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

IAMAT = b"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503"
AT = b"AT Clark +0.263873386 kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503"


def per_call_us(fn: Callable[[], object], budget: float = 0.05) -> float:
    """Best of 3 runs, each about `budget` seconds of CPU, in CPU microseconds per call.

    CPU time (not wall time), so other processes on a shared machine inflate it little.
    """
    timer = timeit.Timer(fn, timer=time.process_time)
    calibrate = 1000
    taken = timer.timeit(calibrate)
    number = max(1, int(calibrate * budget / max(taken, 1e-6)))
    return min(timer.repeat(3, number)) / number * 1e6


def each_us(fn: Callable[[Any], object], items: list[Any]) -> float:
    """CPU microseconds per call of `fn` over `items`, each item used once."""
    start = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - start) / max(1, len(items)) * 1e6


def persister_us(tmp: Path, records: int = 300_000, batch: int = 1200) -> float:
    """CPU microseconds (every thread) that a Persister adds per record a store keeps:
    `records` new clients in batches of `batch`, a checkpoint between, the appends and
    the compactions they bring (compact_min as configured), less the same run without."""
    import trio

    from herd_trio import protocol, store
    from herd_trio.persist import open_persister

    lines = [
        b"AT Clark +0.263873386 c%d +34.068930-118.445127 1621464827.%09d" % (n, n)
        for n in range(records)
    ]
    rows = [(n, protocol.parse_at(line)) for n, line in enumerate(lines)]

    async def feed(held: store.Store) -> None:
        for start in range(0, records, batch):
            for _, record in rows[start : start + batch]:
                held.offer(record)
            await trio.sleep(0.001)

    async def run(persist: bool) -> float:
        held = store.Store()
        began = time.process_time()
        if persist:
            async with open_persister(tmp / "micro.records", held) as persister:
                persister.allow_compaction()
                await feed(held)
        else:
            await feed(held)
        return time.process_time() - began

    without = trio.run(run, False)
    with_file = trio.run(run, True)
    return (with_file - without) / records * 1e6


def cases(tmp: Path) -> dict[str, Callable[[], float]]:
    """The calls to time, built against the installed herd_trio."""
    import trio
    import trio.testing

    from herd_trio import protocol, store
    from herd_trio.bus import Bus
    from herd_trio.linkwriter import LinkWriter
    from herd_trio.log import ServerLog

    record = protocol.parse_at(AT)
    iamat = protocol.parse_command(IAMAT)
    assert isinstance(iamat, protocol.Iamat)
    counter = iter(range(10**9))

    def fresh_record() -> protocol.Record:
        n = next(counter)
        line = b"AT Clark +0.263873386 c%d +34.068930-118.445127 1621464827.959498503" % n
        return protocol.parse_at(line)

    held = store.Store()
    held.offer(record)
    log = ServerLog(tmp / "micro.log", "Clark")
    bus = Bus()
    writers = [
        LinkWriter(trio.testing.memory_stream_pair()[0], 10.0, bus.progress) for _ in range(2)
    ]  # no task runs them: every record is queued on their outboxes, as under load
    subscriptions = [bus.subscribe(n, w) for n, w in zip(("Bona", "Jaquez"), writers, strict=True)]
    for subscription in subscriptions:
        subscription.__enter__()
    fresh = [fresh_record() for _ in range(50_000)]
    newer = [
        protocol.parse_at(AT.replace(b"1621464827.959498503", b"1721464827.%09d" % n))
        for n in range(1, 50_001)
    ]  # the same client, each newer than the last
    known = store.Store([record])
    replaced = store.Store([record])
    newer_packed = [(r.client, store.pack(r.at_line, r.client), r.at_line) for r in newer]
    fresh_rows = [(r.client, r.at_line) for r in fresh]
    fresh_packed = [(r.client, store.pack(r.at_line, r.client), r.at_line) for r in fresh]
    peer_batch = [r.at_line for r in fresh[:32]]

    def add_new(row: tuple[bytes, bytes, bytes]) -> None:
        new_clients.add_new(*row)

    new_clients = store.Store()

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        return lambda: per_call_us(fn)

    return {
        "parse_command(IAMAT)": timed(lambda: protocol.parse_command(IAMAT)),
        "parse_coords": timed(lambda: protocol.parse_coords(b"+34.068930-118.445127")),
        "parse_time": timed(lambda: protocol.parse_time(b"1621464827.959498503")),
        "time_ns": timed(lambda: protocol.time_ns(b"1621464827.959498503")),
        "make_record": timed(lambda: protocol.make_record(b"Clark", time.time_ns(), iamat)),
        "format_at (a new client's AT line)": timed(
            lambda: protocol.format_at(b"Clark", time.time_ns(), iamat)
        ),
        "canonical_at (a new peer line's check)": timed(lambda: protocol.canonical_at(AT)),
        "store.split_client (every peer line)": timed(lambda: store.split_client(AT)),
        "Store.add_new (a new client)": lambda: each_us(add_new, fresh_packed),
        "parse_at (peer line)": timed(lambda: protocol.parse_at(AT)),
        "Record.rank": timed(lambda: record.rank),
        "store.fingerprint": timed(lambda: store.fingerprint(record)),
        "store.key_of": timed(lambda: store.key_of(record.client)),
        "Store.offer, newer (kept)": lambda: each_us(store.Store().offer, fresh),
        "Store.offer, known client, newer (kept)": lambda: each_us(known.offer, newer),
        "Store.replace, known client, newer (kept)": lambda: each_us(
            lambda row: replaced.replace(*row), newer_packed
        ),
        "protocol.later (an update's client time)": timed(
            lambda: protocol.later(b"1721464827.000000001", b"1621464827.959498503")
        ),
        "Store.offer, not newer (dropped)": timed(lambda: held.offer(record)),
        "Store.offer, repeat IAMAT (dropped)": timed(lambda: held.offer(record, repeat=True)),
        "Store.get, known client": timed(lambda: held.get(record.client)),
        "Bus.publish to 2 links, one record": lambda: each_us(
            lambda row: bus.publish([row]), fresh_rows
        ),
        "ServerLog.received": timed(lambda: log.events([log.received_text("peer Bona", AT)])),
        "ServerLog.peer_lines, a batch of 32 (per call)": timed(
            lambda: log.peer_lines("Bona", list(peer_batch), [b"' kept\n"] * len(peer_batch))
        ),
        "ServerLog.write (plain text)": timed(lambda: log.write("link to Bona up")),
        "bytes.split + join (baseline)": timed(lambda: b" ".join(AT.split())),
        "Persister, per record kept (append, compaction; 300,000 new clients)": lambda: (
            persister_us(tmp)
        ),
    }


def main() -> None:
    """Time every case; print {name: us per call or error text} as JSON."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            timed = cases(Path(tmp))
        except Exception as exc:  # any API drift is reported, not raised
            json.dump({"error": repr(exc)}, sys.stdout)
            return
        for name, measure in timed.items():
            try:
                out[name] = round(measure(), 3)
            except Exception as exc:
                out[name] = f"error: {exc!r}"
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
