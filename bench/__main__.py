"""`python -m bench [--quick] [--profile] [--anchor-only] [--out DIR] [--keep-logs]`.

`nox -s bench` runs it: first herd_trio against the limit herd (bench.anchor: the
figures of issue 15, medians of interleaved repetitions), then the rest of the suite
against the single limit server (bench.suite).

Writes DIR/results.json, DIR/summary.md and DIR/latency.svg (DIR defaults to
bench-results/ at the top of the repo) and prints the ratio table with PASS/FAIL per
target. The exit status is 0 when the suite ran, whatever the verdicts (a benchmark
reports; it does not gate), and 1 when it could not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from bench import anchor, procs, report, suite
from bench.procs import ROOT


def main(argv: list[str] | None = None) -> int:
    """Run the suite and write its results."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also record the entry server with py-spy under 100 x 16",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench-results",
        help="output directory (default: bench-results/)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the servers' configs and logs under OUT/run/"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run servers and generator at this niceness (negative needs root): on a"
        " shared machine it makes the figures depend less on other users, and slows them",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [herd] setting of the benchmark herds (TOML value), e.g."
        " --set sync_interval=86400 to see the herd without periodic anti-entropy",
    )
    parser.add_argument(
        "--anchor-only",
        action="store_true",
        help="only herd_trio against the limit herd (bench.anchor), about 3 minutes",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite summary.md and latency.svg from OUT/results.json",
    )
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
    else:
        plan = suite.Plan.make(args.quick)
        procs.NICE = args.nice
        try:
            overrides = tomllib.loads("\n".join(args.set))
        except tomllib.TOMLDecodeError as exc:
            parser.error(f"--set wants KEY=VALUE with a TOML value: {exc}")
        suite.SETTINGS.update(overrides)
        try:
            compared = anchor.run(args.quick, out, profile=args.profile, keep_logs=args.keep_logs)
            if args.anchor_only:
                results = {"meta": {**suite.machine(), "quick": args.quick}}
            else:
                results = suite.run(plan, out, profile=args.profile, keep_logs=args.keep_logs)
            results["anchor"] = compared
            results["meta"]["nice"] = args.nice
            results["meta"]["settings"] = dict(suite.SETTINGS)
        except (OSError, RuntimeError, TimeoutError) as exc:
            print(f"bench: could not run: {exc}", file=sys.stderr)
            return 1
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    compared = results.get("anchor") or {}
    summary = ["## herd_trio vs the limit herd (issue 15)", "", *anchor.markdown(compared)]
    summary += report.profile_markdown(compared.get("profile") or {})
    if "throughput" in results:
        summary[:0] = [report.markdown(results), ""]
        (out / "latency.svg").write_text(report.svg(results))
        print(report.text_table(results) + "\n")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print(anchor.text(compared))
    svg = f", {out / 'latency.svg'}" if "throughput" in results else ""
    print(f"\nwritten: {out / 'results.json'}, {out / 'summary.md'}{svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
