"""The counters' histogram: runs of work counted at their mean."""

from __future__ import annotations

import time
from bisect import bisect_left

from herd_trio.stats import Histogram


def test_a_run_counts_each_of_its_items_at_the_mean_and_keeps_the_sum() -> None:
    histogram = Histogram()
    assert histogram.observe_run(time.perf_counter() - 0.04, 4) == 0
    assert histogram.count == 4
    assert histogram.total >= 0.04  # the whole run, not its mean
    (bucket,) = [index for index, count in enumerate(histogram.counts) if count]
    assert histogram.counts[bucket] == 4  # all four in the bucket of the mean (>= 10 ms)
    assert bucket >= bisect_left(histogram.bounds, 0.01)


def test_an_empty_run_counts_nothing() -> None:
    histogram = Histogram()
    assert histogram.observe_run(time.perf_counter() - 1.0, 0) == 0
    assert (histogram.count, histogram.total, sum(histogram.counts)) == (0, 0.0, 0)
