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
