"""The benchmark's limit herd (bench/limitherd.py): real processes, real TCP."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from bench import anchor, procs, suite


def answers(port: int, expected: bytes) -> bool:
    """True if the server's WHATSAT for kiwi is `expected`."""
    return procs.request(port, b"WHATSAT kiwi 50 0", whatsat=True) == expected


def test_the_limit_herd_floods_keeps_the_newest_and_answers_whatsat(tmp_path: Path) -> None:
    herd = procs.write_herd(
        tmp_path / "herd.toml", procs.DEFAULT_NAMES, procs.DEFAULT_EDGES, dict(suite.SETTINGS)
    )
    servers = anchor.launch_limit_herd(herd, tmp_path)  # returns once every link carries
    try:
        clark, bailey = herd.ports["Clark"], herd.ports["Bailey"]  # 2 hops apart
        newer = procs.request(clark, b"IAMAT kiwi +34.068930-118.445127 1700000002.5")
        assert newer.startswith(b"AT Clark ")
        assert newer.endswith(b" kiwi +34.068930-118.445127 1700000002.5\n")
        older = procs.request(bailey, b"IAMAT kiwi +1+1 1700000001")
        assert older.startswith(b"AT Bailey ")  # answered, but not newer: not stored
        for name, port in herd.ports.items():
            suite.wait_until(f"kiwi at {name}", partial(answers, port, newer + b"\n"), 5)
        assert procs.request(clark, b"WHATSAT nobody 50 0", whatsat=True) == (
            b"? WHATSAT nobody 50 0\n"
        )
        assert procs.request(clark, b"HELLO") == b"? HELLO\n"
    finally:
        procs.stop(servers.values())
