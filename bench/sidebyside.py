"""Several herd_trio checkouts side by side: `python -m bench.sidebyside NAME=PATH ...`.

    python -m bench.sidebyside before=/tmp/old after=. [--reps 10] [--set KEY=VALUE]
                               [--updates]

Every repetition starts one five-server herd per checkout (PATH goes first on the
servers' PYTHONPATH; the bench code is this checkout's), all at once on their own
ports, runs 100 connections x 16 pipelined IAMATs to Clark against each herd in turn
(the order rotated from one repetition to the next), exactly as bench.anchor measures
a herd, and stops them. With --updates each connection names anchor.UPDATE_POOL clients
round and round, so after the first fraction of a second every IAMAT updates a known
client (a herd whose clients move) where bench.anchor's are all new clients.

Prints, per herd after the first, the median of the per-repetition ratios to the
first herd, how many repetitions came out below 1, and the middle half of the
ratios. Two runs of the same 10-repetition comparison differed
by 7%: a median of 10 ratios tells the direction of a cut and roughly its size.

A change that saves 5-15% of the CPU is lost in the 20-30% that a shared machine moves
the anchor's figures from run to run; side by side, both herds meet the same
neighbours in the same seconds. It also measures what a feature costs: a checkout
with the feature cut out (docs/performance.md has such a table).
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import anchor, procs, suite

Result = dict[str, Any]
FIGURES = ["cpu_us_per_update", "rps", *(f"cpu_us_{name}" for name in procs.DEFAULT_NAMES)]


def parse_checkouts(specs: Sequence[str]) -> dict[str, Path]:
    """`NAME=PATH` pairs, in order; each PATH must hold a herd_trio package."""
    checkouts: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or name in checkouts:
            raise SystemExit(f"bench.sidebyside: want distinct NAME=PATH, got {spec!r}")
        root = Path(path).resolve()
        if not (root / "herd_trio" / "__init__.py").is_file():
            raise SystemExit(f"bench.sidebyside: no herd_trio package in {root}")
        checkouts[name] = root
    if len(checkouts) < 2:
        raise SystemExit("bench.sidebyside: give at least two NAME=PATH checkouts")
    return checkouts


def compare(runs: dict[str, list[Result]], figure: str) -> dict[str, Result]:
    """Each herd's median of `figure`, and (after the first) the median, the list and
    the middle half (first to third quartile) of its per-repetition ratios to the
    first herd."""
    first = next(iter(runs))
    out: dict[str, Result] = {}
    for name, results in runs.items():
        row: Result = {"median": statistics.median(r[figure] for r in results)}
        if name != first:
            ratios = sorted(
                mine[figure] / base[figure]
                for base, mine in zip(runs[first], results, strict=True)
                if base[figure]
            )
            row["ratio"] = statistics.median(ratios) if ratios else float("nan")
            row["ratios"] = ratios
            # The middle half of the ratios: how far one repetition is to be trusted.
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            row["middle"] = (quartiles[0], quartiles[-1]) if quartiles else (math.nan,) * 2
        out[name] = row
    return out


def table(runs: dict[str, list[Result]]) -> str:
    """One line per figure: each herd's median, and its ratio to the first herd."""
    first = next(iter(runs))
    lines = []
    for figure in FIGURES:
        rows = compare(runs, figure)
        cells = [f"{first} {rows[first]['median']:,.1f}"]
        for name, row in list(rows.items())[1:]:
            below = sum(1 for ratio in row["ratios"] if ratio < 1)
            low, high = row["middle"]
            cells.append(
                f"{name} {row['median']:,.1f} = {row['ratio']:.3f}x"
                f" ({below} of {len(row['ratios'])} below 1, middle half {low:.2f}-{high:.2f})"
            )
        lines.append(f"{figure:20s} " + "   ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bench.sidebyside NAME=PATH NAME=PATH ... [--reps N]`."""
    parser = argparse.ArgumentParser(prog="python -m bench.sidebyside", description=__doc__)
    parser.add_argument("checkouts", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--reps", type=int, default=10, help="repetitions (default 10)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per window")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [herd] setting of every herd (TOML value), e.g. --set 'state_dir=\"state\"'",
    )
    parser.add_argument("--updates", action="store_true", help="updates of known clients")
    args = parser.parse_args(argv)
    try:
        settings = {**suite.SETTINGS, **tomllib.loads("\n".join(args.set))}
    except tomllib.TOMLDecodeError as exc:
        parser.error(f"--set wants KEY=VALUE with a TOML value: {exc}")
    checkouts = parse_checkouts(args.checkouts)
    plan = anchor.AnchorPlan(warmup=0.5, duration=args.duration)
    run_dir = procs.ROOT / "bench-results" / "sidebyside"
    runs: dict[str, list[Result]] = {name: [] for name in checkouts}
    names = list(checkouts)
    try:
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            pool = anchor.UPDATE_POOL if args.updates else 0
            for name, result in measure_once(checkouts, order, settings, plan, run_dir, rep, pool):
                runs[name].append(result)
                suite.say(
                    f"sidebyside rep {rep + 1}: {name} {result['rps']:,.0f} replies/s,"
                    f" {result['cpu_us_per_update']:.1f} us CPU per update"
                )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(table(runs))


def measure_once(
    checkouts: dict[str, Path],
    order: list[str],
    settings: dict[str, Any],
    plan: anchor.AnchorPlan,
    run_dir: Path,
    rep: int,
    pool: int = 0,
) -> list[tuple[str, Result]]:
    """Start a fresh herd per checkout, measure each once in `order`, stop them all.

    Fresh processes every repetition: a herd kept up for the whole comparison keeps
    whatever luck its processes drew (hash seeds, memory layout, placement on the
    cores), and two herds of the very same code then differed by 9%, on the same side
    in 5 of 6 repetitions; restarted, that luck is drawn again and averages out.
    """
    shutil.rmtree(run_dir, ignore_errors=True)
    up: dict[str, dict[str, procs.Proc]] = {}
    herds: dict[str, procs.Herd] = {}
    try:
        for name in order:
            herds[name] = procs.write_herd(
                run_dir / name / "herd.toml", procs.DEFAULT_NAMES, procs.DEFAULT_EDGES, settings
            )
            root = str(checkouts[name])
            up[name] = suite.start_herd(herds[name], run_dir / name, env={"PYTHONPATH": root})
        return [
            (name, anchor.throughput(herds[name], up[name], 100, 16, f"x{name}{rep}-", plan, pool))
            for name in order
        ]
    finally:
        for servers in up.values():
            procs.stop(servers.values())


if __name__ == "__main__":
    main(sys.argv[1:])
