"""herd_trio against the limit herd (bench.limitherd), like for like, in one run (issue 15).

Every repetition starts, all at once and on their own ports, the limit herd, herd_trio
as configured by suite.SETTINGS (logging every line, heartbeats, digests and syncs on),
the same with a `state_dir`, the same with a secret (`secret_env`), Clark alone (no
neighbours) and the single limit server (bench.limit); measures every configuration
once, back to back, the order rotated from one repetition to the next, so the noise of
a shared machine falls on all alike; and stops them all (fresh processes every
repetition: see `run`). Each figure is the median of the repetitions, with its spread
(min-max), and each ratio the median of the per-repetition ratios.
"""

from __future__ import annotations

import itertools
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench import procs, suite
from bench.procs import Herd, Proc

Result = dict[str, Any]
SECRET_ENV = "HERD_BENCH_SECRET"
ENTRY = "Clark"
# Updates of known clients (a herd whose clients move): each of the 100 connections
# names this many clients round and round, 6,400 in all (a multiple of 16, so a batch
# never names one twice); after the first fraction of a second every IAMAT is an update.
UPDATE_POOL = 64


@dataclass(frozen=True)
class AnchorPlan:
    """Durations and counts of the comparison."""

    reps: int = 3
    warmup: float = 0.5
    duration: float = 2.0
    seq_count: int = 2000
    seq_duration: float = 2.0
    prop_trials: int = 100  # per 2-hop target

    @classmethod
    def make(cls, quick: bool) -> AnchorPlan:
        """The full plan, or a shorter one with as many repetitions."""
        if not quick:
            return cls()
        return cls(warmup=0.2, duration=0.8, seq_count=800, seq_duration=0.8, prop_trials=40)


def launch_limit_herd(herd: Herd, run_dir: Path) -> dict[str, Proc]:
    """Start every server of the limit herd; wait until each accepts and every link
    carries records."""
    env = procs.bench_env()
    servers = {
        name: procs.launch(
            name,
            herd.ports[name],
            [sys.executable, "-m", "bench.limitherd", name, str(herd.config)],
            run_dir,
            env,
        )
        for name in herd.names
    }
    try:
        for proc in servers.values():
            procs.wait_accepting(proc)
        tries = itertools.count()

        def linked(origin: str) -> bool:
            # A record sent before every link is up is lost (no anti-entropy): a new one
            # per try, until one reaches every server within a second.
            client = b"links-%s-%d" % (origin.encode(), next(tries))
            procs.request(herd.ports[origin], suite.iamat(client))
            return all(
                _arrives(partial(suite.has_record, port, client), 1.0)
                for port in herd.ports.values()
            )

        for origin in herd.names:
            suite.wait_until(f"{origin}'s links", partial(linked, origin), 20, 0.05)
    except BaseException:
        procs.stop(servers.values())
        raise
    return servers


def _arrives(check: Callable[[], bool], seconds: float) -> bool:
    """True once `check()` is true, False if it is still false after `seconds`."""
    try:
        suite.wait_until("a record", check, seconds)
    except TimeoutError:
        return False
    return True


def throughput(
    herd: Herd,
    servers: dict[str, Proc],
    conns: int,
    depth: int,
    prefix: str,
    plan: AnchorPlan,
    pool: int = 0,
) -> Result:
    """`conns` x `depth` pipelined IAMATs (new clients, or each connection's `pool` of
    clients updated round and round) to Clark, or to the only server: replies/s and
    server CPU per reply, in all and per server (cpu_us_NAME)."""
    entry = servers[ENTRY] if ENTRY in servers else next(iter(servers.values()))
    pids = [entry.pid, *(p.pid for p in servers.values() if p is not entry)]
    suite.settle(pids)
    spec = {
        "mode": "throughput",
        "ports": [entry.port],
        "conns": conns,
        "depth": depth,
        "warmup": plan.warmup,
        "duration": plan.duration,
        "max_requests": 2_000_000,
        "prefix": prefix,
        "pool": pool,
        "pids": pids,
    }
    run = procs.loadgen(spec, timeout=plan.warmup + plan.duration + 60)
    replies = max(1, run["replies"])
    return {
        "rps": run["rps"],
        "cpu_us_per_update": sum(run["server_cpu_s"].values()) / replies * 1e6,
        # and each server's share, by name (cpu_us_Clark, ...): where the CPU goes
        **{
            f"cpu_us_{name}": run["server_cpu_s"][str(proc.pid)] / replies * 1e6
            for name, proc in servers.items()
        },
        "errors": run["errors"],
        "foreign_cores": max(
            0.0,
            run["machine_busy_s"] - sum(run["server_cpu_s"].values()) - run["loadgen_cpu_s"],
        )
        / max(1e-9, run["seconds"]),
    }


def _sequential(proc: Proc, pids: list[int], prefix: str, plan: AnchorPlan) -> Result:
    suite.settle(pids)
    spec = {
        "mode": "sequential",
        "port": proc.port,
        "kind": "iamat",
        "count": plan.seq_count,
        "duration": plan.seq_duration,
        "warmup": 50,
        "prefix": prefix,
        "pids": pids,
    }
    lat = procs.loadgen(spec, timeout=plan.seq_duration + 30)["latency"]
    return {"p50_us": lat.get("p50_us"), "p99_us": lat.get("p99_us"), "n": lat["n"]}


def _two_hops(herd: Herd, pids: list[int], prefix: str, plan: AnchorPlan) -> Result:
    """IAMAT at Clark, WHATSAT polls at the servers 2 hops away until they answer."""
    hops = herd.hops(ENTRY)
    targets = {name: herd.ports[name] for name in herd.names if hops[name] == 2}
    suite.settle(pids)
    spec = {
        "mode": "propagate",
        "origin": herd.ports[ENTRY],
        "targets": targets,
        "trials": plan.prop_trials * len(targets),
        "duration": 30.0,
        "prefix": prefix,
    }
    run = procs.loadgen(spec, timeout=60)
    # Pool the samples' percentiles of the targets: report the worst target's.
    figures = [t["latency"] for t in run["targets"].values() if t["latency"]["n"]]
    lost = sum(t["lost"] for t in run["targets"].values())
    return {
        "p50_us": max((f["p50_us"] for f in figures), default=None),
        "p99_us": max((f["p99_us"] for f in figures), default=None),
        "lost": lost,
    }


def run(quick: bool, out_dir: Path, *, profile: bool, keep_logs: bool = False) -> Result:
    """`reps` repetitions, each with every configuration started afresh and measured
    once; with `profile`, py-spy on the last repetition's herd_trio Clark and Bona
    under 100 x 16 before it stops.

    Fresh processes every repetition, as in bench.sidebyside: a herd kept up for a
    whole run keeps the luck its processes drew (hash seeds, memory layout, placement
    on the cores), and two herds of the very same code then differ by 10-20%.
    """
    budget = suite.Budget(suite.SUITE_BUDGET)
    run_dir = out_dir / "run" / "anchor"
    shutil.rmtree(run_dir, ignore_errors=True)
    plan = AnchorPlan.make(quick)
    reps: list[Result] = []
    result: Result = {"reps": reps, "plan": plan.__dict__}
    try:
        for r in range(plan.reps):
            if not budget.allows(80 if plan.duration > 1 else 35):
                suite.say("anchor: out of time budget, skipping the remaining repetitions")
                break
            rep_dir = run_dir / f"rep{r + 1}"
            configs = _configs(rep_dir)
            up: dict[str, dict[str, Proc]] = {}
            try:
                _start(configs, rep_dir, up)
                reps.append(_measure(plan, r, configs, up))
                if profile and r == plan.reps - 1:
                    quick_plan = suite.Plan.make(quick)
                    result["profile"] = suite.phase_profile(quick_plan, up["herd"], out_dir)
            finally:
                for group in up.values():
                    procs.stop(group.values())
        result["elapsed_s"] = budget.elapsed()
        return result
    finally:
        if not keep_logs:
            shutil.rmtree(run_dir, ignore_errors=True)


def _configs(run_dir: Path) -> dict[str, Herd]:
    """The four herds' configurations and Clark alone's, on ports of their own."""
    names, edges = procs.DEFAULT_NAMES, procs.DEFAULT_EDGES
    base = dict(suite.SETTINGS)
    return {
        "anchor": procs.write_herd(run_dir / "anchor" / "herd.toml", names, edges, base),
        "herd": procs.write_herd(run_dir / "plain" / "herd.toml", names, edges, base),
        "state": procs.write_herd(
            run_dir / "state" / "herd.toml", names, edges, {**base, "state_dir": "state"}
        ),
        "secret": procs.write_herd(
            run_dir / "secret" / "herd.toml", names, edges, {**base, "secret_env": SECRET_ENV}
        ),
        "alone": procs.write_herd(run_dir / "alone" / "herd.toml", [ENTRY], [], base),
    }


def _start(configs: dict[str, Herd], run_dir: Path, up: dict[str, dict[str, Proc]]) -> None:
    """Start the limit server, Clark alone and the four herds into `up` (which the
    caller stops, also if a start fails)."""
    suite.say("anchor: starting the limit server, Clark alone and four herds (21 processes)")
    limit = procs.launch_limit(procs.free_ports(1)[0], run_dir / "limit")
    up["limit"] = {"limit": limit}
    procs.wait_accepting(limit)
    solo = procs.launch_server(configs["alone"], ENTRY, run_dir / "alone")
    up["solo"] = {ENTRY: solo}
    procs.wait_accepting(solo)
    up["anchor"] = launch_limit_herd(configs["anchor"], run_dir / "anchor")
    for kind in ("herd", "state", "secret"):
        env = {SECRET_ENV: "bench-secret-of-issue-15"} if kind == "secret" else None
        up[kind] = suite.start_herd(configs[kind], run_dir / kind, env=env)


def _measure(
    plan: AnchorPlan, r: int, configs: dict[str, Herd], up: dict[str, dict[str, Proc]]
) -> Result:
    """One repetition: every configuration measured once, in an order rotated by `r`."""
    limit, solo = up["limit"]["limit"], up["solo"][ENTRY]
    herds = ["anchor", "herd", "state", "secret"]
    rep: Result = {}
    order = herds[r % 4 :] + herds[: r % 4]
    for kind in order:
        suite.say(f"anchor rep {r + 1}: {kind} 100 x 16 to Clark, whole herd up")
        rep[f"tp_{kind}"] = throughput(configs[kind], up[kind], 100, 16, f"a{kind[:2]}{r}-", plan)
    for kind in ("anchor", "herd") if r % 2 == 0 else ("herd", "anchor"):
        suite.say(f"anchor rep {r + 1}: {kind} 100 x 16 updates of known clients")
        rep[f"upd_{kind}"] = throughput(
            configs[kind], up[kind], 100, 16, f"u{kind[0]}{r}-", plan, UPDATE_POOL
        )
    for conns, depth in ((100, 1), (100, 16)):
        pair = [("limit", limit), ("solo", solo)]
        for kind, proc in pair if r % 2 == 0 else pair[::-1]:
            suite.say(f"anchor rep {r + 1}: {kind} {conns} x {depth}")
            rep[f"{kind}_{conns}x{depth}"] = throughput(
                configs["herd"], {ENTRY: proc}, conns, depth, f"s{kind[0]}{depth}r{r}-", plan
            )
    herd_pids = [p.pid for p in up["herd"].values()]
    anchor_pids = [p.pid for p in up["anchor"].values()]
    # Sequential IAMATs like for like: one server against one (Clark alone, the limit
    # server), and a herd against a herd (Clark with its neighbours flooded before each
    # reply, the limit herd's Clark).
    singles_and_herds = [
        ("limit", limit, [limit.pid]),
        ("solo", solo, [solo.pid]),
        ("herd", up["herd"][ENTRY], herd_pids),
        ("anchor", up["anchor"][ENTRY], anchor_pids),
    ]
    for kind, proc, pids in singles_and_herds if r % 2 == 0 else singles_and_herds[::-1]:
        suite.say(f"anchor rep {r + 1}: sequential IAMAT, {kind}")
        rep[f"seq_{kind}"] = _sequential(proc, pids, f"q{kind[0]}{r}-", plan)
    for kind in ("anchor", "herd") if r % 2 == 0 else ("herd", "anchor"):
        suite.say(f"anchor rep {r + 1}: 2-hop propagation, {kind}")
        pids = [p.pid for p in up[kind].values()]
        rep[f"prop_{kind}"] = _two_hops(configs[kind], pids, f"p{kind[0]}{r}-", plan)
    return rep


# ---- the table ----

# figure, herd_trio path, baseline path, baseline name, target, "higher" is better?
ROWS: list[tuple[str, tuple[str, str], tuple[str, str], str, str, bool]] = [
    (
        "replies/s, whole herd up, 100 x 16",
        ("tp_herd", "rps"),
        ("tp_anchor", "rps"),
        "limit herd",
        ">= 0.7",
        True,
    ),
    (
        "server CPU per replicated update (us)",
        ("tp_herd", "cpu_us_per_update"),
        ("tp_anchor", "cpu_us_per_update"),
        "limit herd",
        "<= 1.5",
        False,
    ),
    (
        "(context) updates of known clients: replies/s, whole herd up, 100 x 16",
        ("upd_herd", "rps"),
        ("upd_anchor", "rps"),
        "limit herd",
        "-",
        True,
    ),
    (
        "(context) updates of known clients: CPU per update (us)",
        ("upd_herd", "cpu_us_per_update"),
        ("upd_anchor", "cpu_us_per_update"),
        "limit herd",
        "-",
        False,
    ),
    *(
        (
            f"(context) CPU per update at {name} (us)",
            ("tp_herd", f"cpu_us_{name}"),
            ("tp_anchor", f"cpu_us_{name}"),
            "limit herd",
            "-",
            False,
        )
        for name in procs.DEFAULT_NAMES
    ),
    (
        "Clark alone, 100 x 1 (replies/s)",
        ("solo_100x1", "rps"),
        ("limit_100x1", "rps"),
        "limit server",
        ">= 0.7",
        True,
    ),
    (
        "Clark alone, 100 x 16 (replies/s)",
        ("solo_100x16", "rps"),
        ("limit_100x16", "rps"),
        "limit server",
        ">= 0.6",
        True,
    ),
    (
        "sequential IAMAT p50, Clark alone (us)",
        ("seq_solo", "p50_us"),
        ("seq_limit", "p50_us"),
        "limit server",
        "<= 1.1",
        False,
    ),
    (
        "sequential IAMAT p99, Clark alone (us)",
        ("seq_solo", "p99_us"),
        ("seq_limit", "p99_us"),
        "limit server",
        "<= 1.3",
        False,
    ),
    (
        "sequential IAMAT p50, whole herd up (us)",
        ("seq_herd", "p50_us"),
        ("seq_anchor", "p50_us"),
        "limit herd",
        "<= 1.1",
        False,
    ),
    (
        "sequential IAMAT p99, whole herd up (us)",
        ("seq_herd", "p99_us"),
        ("seq_anchor", "p99_us"),
        "limit herd",
        "<= 1.3",
        False,
    ),
    (
        "(context) sequential IAMAT p50, limit herd (us)",
        ("seq_anchor", "p50_us"),
        ("seq_limit", "p50_us"),
        "limit server",
        "-",
        False,
    ),
    (
        "2-hop propagation, client view, p50 (us)",
        ("prop_herd", "p50_us"),
        ("prop_anchor", "p50_us"),
        "limit herd",
        "<= 1.0",
        False,
    ),
    (
        "2-hop propagation, client view, p99 (us)",
        ("prop_herd", "p99_us"),
        ("prop_anchor", "p99_us"),
        "limit herd",
        "<= 1.2",
        False,
    ),
    (
        "with state_dir: replies/s 100 x 16",
        ("tp_state", "rps"),
        ("tp_herd", "rps"),
        "herd_trio without",
        ">= 0.85",
        True,
    ),
    (
        "with state_dir: CPU per update (us)",
        ("tp_state", "cpu_us_per_update"),
        ("tp_herd", "cpu_us_per_update"),
        "herd_trio without",
        "-",
        False,
    ),
    (
        "with a secret: replies/s 100 x 16",
        ("tp_secret", "rps"),
        ("tp_herd", "rps"),
        "herd_trio without",
        ">= 0.95",
        True,
    ),
    (
        "with a secret: CPU per update (us)",
        ("tp_secret", "cpu_us_per_update"),
        ("tp_herd", "cpu_us_per_update"),
        "herd_trio without",
        "-",
        False,
    ),
]


def _values(reps: list[Result], path: tuple[str, str]) -> list[float]:
    return [rep[path[0]][path[1]] for rep in reps if rep.get(path[0], {}).get(path[1]) is not None]


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def rows(result: Result) -> list[tuple[str, str, str, str, str, str]]:
    """figure, herd_trio median (spread), baseline median (spread), baseline, ratio
    median (spread), target and verdict."""
    reps = result.get("reps", [])
    out = []
    for figure, mine, theirs, baseline, target, higher in ROWS:
        a, b = _values(reps, mine), _values(reps, theirs)
        ratios = [x / y for x, y in zip(a, b, strict=False) if y]
        digits = 1 if "(us)" in figure and max(a + b, default=0) < 100 else 0
        verdict = ""
        if ratios and target != "-":
            limit = float(target.split()[1])
            med = statistics.median(ratios)
            verdict = " PASS" if (med >= limit if higher else med <= limit) else " FAIL"
        out.append(
            (
                figure,
                _spread(a, digits),
                _spread(b, digits),
                baseline,
                _spread(ratios, 2).replace(" (", "x (", 1) if ratios else "n/a",
                f"{target}{verdict}",
            )
        )
    return out


HEADER = ("figure", "herd_trio", "baseline", "baseline is", "ratio", "target")


def markdown(result: Result) -> list[str]:
    """The comparison as a markdown table (medians, spread in brackets)."""
    reps = len(result.get("reps", []))
    lines = [
        f"Medians of {reps} interleaved repetitions, (min-max) in brackets; the ratio is"
        " the median of the per-repetition ratios.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    return lines


def text(result: Result) -> str:
    """The comparison for the terminal."""
    table = [HEADER, *rows(result)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table
    )
