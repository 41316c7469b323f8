"""Memory per stored record: `python -m bench.store_memory [--records N]`.

Fills a fresh Store with N records (default 1,000,000) whose AT lines look like a
real herd's (a 26-byte client id, ISO 6709 coordinates, nanosecond times), one at a
time as a server would take them, and prints one JSON object: RSS growth and
tracemalloc's count of live bytes, each per record, and the time taken per record.
Run it with PYTHONPATH pointing at another checkout to measure that one's store in
the same way (docs/scale.md compares the two).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import tracemalloc

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def line_of(number: int) -> bytes:
    """A plausible AT line for client `number` (distinct clients, varied fields)."""
    return b"AT Clark +0.%09d client-%08d.cs.ucla.edu +34.%06d-118.%06d 1700000000.%09d" % (
        number % 1_000_000_000,
        number,
        number % 1_000_000,
        (number * 7) % 1_000_000,
        number,
    )


def fill(records: int, *, traced: bool) -> dict[str, float]:
    """Fill a Store with `records` records; the figures per record."""
    from herd_trio.protocol import parse_at
    from herd_trio.store import Store

    gc.collect()
    if traced:
        tracemalloc.start()
    before = rss_bytes()
    traced_before = tracemalloc.get_traced_memory()[0] if traced else 0
    started = time.process_time()
    store = Store()
    for number in range(records):
        store.offer(parse_at(line_of(number)))
    elapsed = time.process_time() - started
    gc.collect()
    after = rss_bytes()
    traced_after = tracemalloc.get_traced_memory()[0] if traced else 0
    assert len(store) == records
    out = {
        "records": records,
        "rss_bytes_per_record": round((after - before) / records, 1),
        "offer_and_parse_us_per_record": round(elapsed / records * 1e6, 2),
    }
    if traced:
        out["traced_bytes_per_record"] = round((traced_after - traced_before) / records, 1)
    return out


def main() -> None:
    """Parse the arguments, fill a store, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument(
        "--traced", action="store_true", help="also count bytes with tracemalloc (slow)"
    )
    args = parser.parse_args()
    import herd_trio.store

    result = fill(args.records, traced=args.traced)
    result["store_module"] = herd_trio.store.__file__
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
