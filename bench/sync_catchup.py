"""Reconciliation between two real servers: `python -m bench.sync_catchup [--records N]`.

Two scenarios on 127.0.0.1, each with real `python -m herd_trio` processes and state
files written beforehand (so no time goes into feeding the records through IAMATs):

* catch-up: Alpha and Beta hold the same N records except for D (default 2,000)
  that Alpha holds in a newer version (Beta missed them while it was down).
* join: Alpha holds N records; Beta starts empty.

Each starts Alpha, waits until it answers, measures a client's IAMAT round trips to
Alpha (one request at a time) for BASELINE seconds, starts Beta, and measures the
seconds from the link coming up until both report the same store digest on their
admin ports, the records Alpha sent by reconciliation, and the same client's round
trips while Beta loads its state (before the link is up) and while the two
reconcile. Prints one JSON object; compare each phase's latencies with the baseline
of the same run (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from herd_trio.statefile import sorted_lines, write_file
from tests.e2e.herd import Herd, connect, poll, running

NAMES = ["Alpha", "Beta"]
BASELINE = 5.0  # seconds of IAMATs to an idle Alpha


def line_of(number: int, version: int) -> tuple[bytes, bytes]:
    client = b"client-%08d.cs.ucla.edu" % number
    at = b"AT Alpha +0.%09d %s +34.%06d-118.%06d %d.%09d" % (
        number % 1_000_000_000,
        client,
        number % 1_000_000,
        (number * 7) % 1_000_000,
        1_700_000_000 + version,
        number,
    )
    return client, at


def write_state(path: Path, records: int, newer: set[int]) -> None:
    """A state file (herd_trio/statefile.py's format) with `records` records."""
    lines = (line_of(n, 1 if n in newer else 0)[1] for n in range(records))
    write_file(path, sorted_lines(lines))


async def state(client: httpx.AsyncClient, herd: Herd, name: str) -> dict[str, Any] | None:
    try:
        reply = await client.get(f"{herd.admin_url(name)}/state", timeout=5)
    except httpx.HTTPError:
        return None
    result: dict[str, Any] = reply.json()
    return result


async def probe(herd: Herd, done: trio.Event, out: list[tuple[float, float]]) -> None:
    """IAMATs to Alpha, one at a time, until `done`; (when it ended, seconds) of each."""
    session = await herd.session("Alpha")
    async with session.stream:
        number = 0
        while not done.is_set():
            number += 1
            start = time.perf_counter()
            reply = await session.line(b"IAMAT probe +2+2 %d" % (1_800_000_000 + number))
            out.append((time.perf_counter(), time.perf_counter() - start))
            assert reply.startswith(b"AT Alpha "), reply


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def phase(samples: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    """Round-trip figures (ms) of the IAMATs that ended between `start` and `end`."""
    values = [took for at, took in samples if start <= at < end]
    return {
        "count": len(values),
        "p50_ms": round(percentile(values, 0.5) * 1000, 2),
        "p99_ms": round(percentile(values, 0.99) * 1000, 2),
        "max_ms": round(max(values, default=0) * 1000, 2),
    }


async def scenario(root: Path, records: int, differing: int, join: bool) -> dict[str, Any]:
    state_dir = root / "state"
    state_dir.mkdir()
    newer = set(range(0, records, max(1, records // max(1, differing)))) if differing else set()
    write_state(state_dir / "Alpha.records", records, newer)
    if not join:
        write_state(state_dir / "Beta.records", records, set())
    herd = Herd.create(root, NAMES, [("Alpha", "Beta")], state_dir=str(state_dir))
    herd.with_admin()
    with running(herd):
        herd.start("Alpha")
        started = time.perf_counter()
        await (await connect(herd.ports["Alpha"], deadline=120)).aclose()
        alpha_ready = time.perf_counter() - started
        latencies: list[tuple[float, float]] = []
        done = trio.Event()
        async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
            await poll("Alpha's admin port", lambda: state(client, herd, "Alpha"), deadline=60)
            nursery.start_soon(probe, herd, done, latencies)
            baseline_start = time.perf_counter()
            await trio.sleep(BASELINE)  # the baseline phase: measure, not synchronise
            herd.start("Beta")
            beta_started = time.perf_counter()

            async def linked() -> bool | None:
                one = await state(client, herd, "Alpha")
                return any(link["up"] for link in one["links"]) or None if one else None

            await poll("Alpha linked to Beta", linked, deadline=300)
            link_up = time.perf_counter()

            async def converged() -> bool | None:
                one, two = await state(client, herd, "Alpha"), await state(client, herd, "Beta")
                if one is None or two is None:
                    return None
                return (one["digest"] == two["digest"] and two["records"] >= records) or None

            await poll("Alpha and Beta agree", converged, deadline=600)
            converged_at = time.perf_counter()
            done.set()
            metrics = (await client.get(f"{herd.admin_url('Alpha')}/metrics")).text
    sent = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("herd_sync_records_sent_total{")
    ]
    return {
        "records": records,
        "differing": records if join else len(newer),
        "alpha_ready_s": round(alpha_ready, 2),
        "beta_linked_after_start_s": round(link_up - beta_started, 2),
        "converged_after_link_up_s": round(converged_at - link_up, 2),
        "alpha_sync_records_sent": int(sum(sent)),
        "iamat_baseline": phase(latencies, baseline_start, beta_started),
        "iamat_beta_loading": phase(latencies, beta_started, link_up),
        "iamat_reconciling": phase(latencies, link_up, converged_at),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--differing", type=int, default=2000)
    parser.add_argument("--only", choices=["catch-up", "join"])
    args = parser.parse_args()
    out: dict[str, Any] = {}
    for name, join in (("catch-up", False), ("join", True)):
        if args.only not in (None, name):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = trio.run(scenario, Path(tmp), args.records, args.differing, join)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
