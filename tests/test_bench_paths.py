"""bench.paths, the in-process hot paths that bench.icount counts instructions of."""

from __future__ import annotations

import pytest

from bench import paths


@pytest.mark.parametrize(
    ("path", "lines", "ran"),
    [
        ("client", 300, 256),
        ("relay", 300, 300),
        ("limit-client", 300, 256),
        ("limit-relay", 300, 300),
    ],
)
def test_each_path_runs_its_lines_through_the_real_handlers(
    path: str, lines: int, ran: int
) -> None:
    result = paths.measure(path, lines)  # asserts that every line was answered or kept
    assert result["path"] == path
    assert result["lines"] == ran  # the client path sends whole batches of 8 x 16
    assert result["cpu_us_per_line"] > 0


@pytest.mark.parametrize(
    ("path", "ran"), [("client", 4096), ("relay", 4096), ("limit-relay", 4096)]
)
def test_with_updates_each_path_sends_its_pool_round_and_round(path: str, ran: int) -> None:
    # Twice the pool of clients (bench.paths.UPDATE_CLIENTS): the second round is all
    # updates of known clients. The paths assert that the store holds the pool, and
    # the relay that Jaquez kept every record from Clark (new or later).
    result = paths.measure(path, 2 * paths.UPDATE_CLIENTS, updates=True)
    assert result["path"] == f"{path} --updates"
    assert result["lines"] == ran
    assert result["cpu_us_per_line"] > 0
