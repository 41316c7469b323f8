"""bench.sidebyside's arguments and its comparison of repetitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import procs
from bench.sidebyside import compare, parse_checkouts, table

HERE = procs.ROOT


def test_checkouts_are_named_pairs_in_order() -> None:
    checkouts = parse_checkouts([f"before={HERE}", f"after={HERE}"])
    assert list(checkouts) == ["before", "after"]
    assert checkouts["after"] == HERE


@pytest.mark.parametrize(
    "specs",
    [
        [f"only={HERE}"],  # nothing to compare with
        [f"a={HERE}", f"a={HERE}"],  # one name twice
        [f"a={HERE}", str(HERE)],  # no name
    ],
)
def test_bad_checkouts_are_refused_with_a_reason(specs: list[str]) -> None:
    with pytest.raises(SystemExit, match=r"bench\.sidebyside"):
        parse_checkouts(specs)


def test_a_path_without_the_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no herd_trio package"):
        parse_checkouts([f"a={HERE}", f"b={tmp_path}"])


def run(cpu: float, rps: float) -> dict[str, float]:
    return {"cpu_us_per_update": cpu, "rps": rps} | {
        f"cpu_us_{name}": cpu / 5 for name in procs.DEFAULT_NAMES
    }


def test_ratios_are_taken_per_repetition_then_the_median() -> None:
    # The machine slows down in the third repetition; both herds see it, and the
    # per-repetition ratio stays what it is.
    runs = {
        "base": [run(100, 10_000), run(100, 10_000), run(200, 5_000)],
        "cut": [run(90, 11_000), run(80, 12_500), run(180, 5_500)],
    }
    rows = compare(runs, "cpu_us_per_update")
    assert rows["base"] == {"median": 100}
    assert rows["cut"]["median"] == 90
    assert rows["cut"]["ratios"] == [0.8, 0.9, 0.9]
    assert rows["cut"]["ratio"] == 0.9
    assert rows["cut"]["middle"] == pytest.approx((0.8, 0.9))
    text = table(runs)
    assert "cut 90.0 = 0.900x (3 of 3 below 1, middle half 0.80-0.90)" in text
    assert "cut 11,000.0 = 1.100x (0 of 3 below 1, middle half 1.10-1.25)" in text
