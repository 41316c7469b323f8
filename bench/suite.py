"""The benchmark phases, in order, and the figures they produce.

One run measures the limit server (bench.limit) and the herd (real `python -m herd_trio`
processes) with the same generator (bench.loadgen, a separate process). Where a figure
has a limit-server counterpart, the two are measured back to back (limit, herd, limit,
herd ...) so that the noise of a shared machine falls on both alike.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from bench import procs
from bench.loadgen import machine_busy_ticks
from bench.procs import Herd, Proc

Result = dict[str, Any]

PARIS = b"+48.8566+2.3522"
# Dense places for WHATSAT (50 km, 20 results): the offline source's worst cases.
DENSE = {
    "paris": b"+48.8566+2.3522",
    "losangeles": b"+34.0522-118.2437",
    "hongkong": b"+22.3193+114.1694",
    "delhi": b"+28.6139+77.2090",
    "centraljava": b"-7.2500+110.4000",
}
SETTINGS: dict[str, Any] = {
    "places": "offline",
    "heartbeat_interval": 1.0,
    "max_clients": 20000,  # above the 10 000 idle clients we open
}
SETTLE = 15.0  # seconds we wait for the servers to go idle between runs, at most
SUITE_BUDGET = 540.0  # seconds: phases that would end past this are skipped (issue: < 10 min)


@dataclass(frozen=True)
class Plan:
    """How long and how often each phase runs."""

    quick: bool
    matrix: tuple[tuple[int, int], ...] = ((1, 1), (1, 16), (10, 1), (10, 16), (100, 1), (100, 16))
    tp_warmup: float = 0.5
    tp_duration: float = 2.0
    tp_reps: int = 2  # limit/herd pairs per cell; the best of each is kept
    tp_max_requests: int = 2_000_000
    seq_count: int = 3000
    seq_duration: float = 3.0
    seq_rounds: int = 2
    whatsat_count: int = 1000
    whatsat_duration: float = 4.0
    prop_trials: int = 200  # per target
    msg_updates: int = 100
    idle_counts: tuple[int, ...] = (1000, 10000)
    launches: int = 5
    profile_seconds: float = 6.0

    @classmethod
    def make(cls, quick: bool) -> Plan:
        """The full plan (~4 min) or the quick smoke plan (~1 min)."""
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            tp_warmup=0.2,
            tp_duration=0.8,
            tp_reps=1,
            seq_count=1000,
            seq_duration=1.0,
            seq_rounds=1,
            whatsat_count=300,
            whatsat_duration=1.5,
            prop_trials=40,
            msg_updates=30,
            idle_counts=(1000, 10000),
            launches=2,
            profile_seconds=3.0,
        )


class Budget:
    """Wall-clock budget of the whole suite."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        """Seconds since the suite started."""
        return time.perf_counter() - self.start

    def allows(self, needed: float) -> bool:
        """True if a phase of `needed` seconds still fits."""
        return self.elapsed() + needed <= self.seconds


def say(text: str) -> None:
    """Progress on stderr, so stdout stays the table."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# ---- readiness ----

SETTLES: list[float] = []  # seconds each wait for idle servers took (SETTLE: never idle)


def settle(pids: list[int]) -> None:
    """Wait (at most SETTLE seconds) until the servers are idle; record how long it took."""
    SETTLES.append(procs.settle(pids, timeout=SETTLE))


def wait_until(what: str, check: Callable[[], bool], deadline: float, poll: float = 0.01) -> float:
    """Poll `check` until true; seconds taken; TimeoutError naming `what` after `deadline`."""
    start = time.perf_counter()
    while time.perf_counter() - start < deadline:
        try:
            if check():
                return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(poll)
    raise TimeoutError(f"within {deadline} s: {what}")


def iamat(client: bytes, coords: bytes = PARIS) -> bytes:
    """An IAMAT line with the current time."""
    seconds, ns = divmod(time.time_ns(), 1_000_000_000)
    return b"IAMAT %s %s %d.%09d" % (client, coords, seconds, ns)


def places_ready(port: int, client: bytes) -> bool:
    """True once the server answers a WHATSAT for `client` with places."""
    reply = procs.request(port, b"WHATSAT %s 50 1" % client, whatsat=True, timeout=30)
    return b'"status": "OK"' in reply


def has_record(port: int, client: bytes) -> bool:
    """True once the server holds a record for `client` (WHATSAT with bound 0)."""
    reply = procs.request(port, b"WHATSAT %s 50 0" % client, whatsat=True)
    return reply.startswith(b"AT ")


def start_herd(
    herd: Herd,
    run_dir: Path,
    names: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Proc]:
    """Start the servers `names` (default: all) of `herd` (`env`: variables to add),
    wait until all accept, hold places and are linked."""
    names = herd.names if names is None else names
    servers = {name: procs.launch_server(herd, name, run_dir, env) for name in names}
    try:
        for proc in servers.values():
            procs.wait_accepting(proc)
        for name in names:  # each process loads the places index itself
            client = b"ready-%s" % name.encode()
            procs.request(herd.ports[name], iamat(client))
            wait_until(f"places at {name}", partial(places_ready, herd.ports[name], client), 120)
        for k, origin in enumerate(names):  # every link carries records
            client = b"links-%d" % k
            procs.request(herd.ports[origin], iamat(client))
            for name in names:
                check = partial(has_record, herd.ports[name], client)
                wait_until(f"{origin}'s record at {name}", check, 20)
    except BaseException:
        procs.stop(servers.values())
        raise
    return servers


# ---- phases ----


def phase_launch(plan: Plan, run_dir: Path, herd: Herd) -> Result:
    """Places warm-up, then launch-to-accepting for a herd server and the limit server."""
    out: Result = {}
    say("warm-up: one herd server until its offline places answer (builds the index cache)")
    proc = procs.launch_server(herd, "Clark", run_dir / "warmup")
    try:
        procs.wait_accepting(proc)
        port = herd.ports["Clark"]
        procs.request(port, iamat(b"warm"))
        wait_until("places at Clark", lambda: places_ready(port, b"warm"), 180)
        out["places_ready_s"] = time.perf_counter() - proc.started
    finally:
        procs.stop([proc])
    for kind in ("herd", "limit"):
        accept, serve, stop_codes = [], [], []
        for i in range(plan.launches):
            say(f"launch-to-accepting: {kind} #{i + 1}")
            if kind == "herd":
                proc = procs.launch_server(herd, "Clark", run_dir / "launch")
            else:
                proc = procs.launch_limit(procs.free_ports(1)[0], run_dir / "launch")
            try:
                accept.append(procs.wait_accepting(proc))
                procs.request(proc.port, iamat(b"launch-%d" % i))
                serve.append(time.perf_counter() - proc.started)
            finally:
                stop_codes.append(procs.stop([proc])[proc.name])
        out[kind] = {
            "accept_s": accept,
            "first_reply_s": serve,
            "p50_s": sorted(accept)[len(accept) // 2],
            "max_s": max(accept),
            "exit_codes": stop_codes,
        }
    return out


def phase_idle(plan: Plan, limit: Proc, entry: Proc) -> Result:
    """RSS per idle connection at each count, limit server first."""
    out: Result = {}
    for kind, proc in (("limit", limit), ("herd", entry)):
        say(f"idle connections: {kind}, {'/'.join(map(str, plan.idle_counts))}")
        spec = {
            "mode": "idle",
            "port": proc.port,
            "pid": proc.pid,
            "counts": list(plan.idle_counts),
            "timeout": 60.0,
        }
        out[kind] = procs.loadgen(spec, timeout=90)
        settle([proc.pid])
    return out


def _throughput(
    ports: list[int], pids: list[int], conns: int, depth: int, prefix: str, plan: Plan
) -> Result:
    spec = {
        "mode": "throughput",
        "ports": ports,
        "conns": conns,
        "depth": depth,
        "warmup": plan.tp_warmup,
        "duration": plan.tp_duration,
        "max_requests": plan.tp_max_requests,
        "prefix": prefix,
        "pids": pids,
    }
    run = procs.loadgen(spec, timeout=plan.tp_warmup + plan.tp_duration + 60)
    replies = max(1, run["replies"])
    cpu = run["server_cpu_s"]
    run["cpu_us_per_reply"] = sum(cpu.values()) / replies * 1e6
    run["entry_cpu_us_per_reply"] = cpu[str(pids[0])] / replies * 1e6
    seconds = max(1e-9, run["seconds"])
    run["loadgen_cpu_share"] = run["loadgen_cpu_s"] / seconds
    # Cores kept busy by processes that are not ours (other users of a shared machine).
    ours = sum(cpu.values()) + run["loadgen_cpu_s"]
    run["foreign_cores"] = max(0.0, run["machine_busy_s"] - ours) / seconds
    return run


def _best(runs: list[Result]) -> Result:
    """The run with the highest throughput (noise on a shared machine only slows down)."""
    best = dict(max(runs, key=lambda r: r["rps"]))
    best["all_rps"] = [r["rps"] for r in runs]
    return best


def phase_throughput(
    plan: Plan, budget: Budget, limit: Proc, entry: Proc, herd_pids: list[int]
) -> list[Result]:
    """Every cell of the matrix: limit, then herd (entry server, whole herd's CPU)."""
    cells: list[Result] = []
    every = [limit.pid, *herd_pids]
    for conns, depth in plan.matrix:
        cell: Result = {"conns": conns, "depth": depth}
        runs: dict[str, list[Result]] = {"limit": [], "herd": []}
        for rep in range(plan.tp_reps):
            if not budget.allows(2 * (plan.tp_warmup + plan.tp_duration + 2)):
                say("throughput: out of time budget, skipping the rest")
                break
            for kind in ("limit", "herd"):
                say(f"throughput: {kind} {conns} conns x {depth} pipelined (rep {rep + 1})")
                settle(every)
                if kind == "limit":
                    ports, pids = [limit.port], [limit.pid]
                else:
                    ports, pids = (
                        [entry.port],
                        [entry.pid, *(p for p in herd_pids if p != entry.pid)],
                    )
                prefix = f"tp{kind[0]}{conns}x{depth}r{rep}-"
                runs[kind].append(_throughput(ports, pids, conns, depth, prefix, plan))
        if runs["limit"] and runs["herd"]:
            cell["limit"], cell["herd"] = _best(runs["limit"]), _best(runs["herd"])
            cell["ratio"] = cell["herd"]["rps"] / max(1e-9, cell["limit"]["rps"])
            cells.append(cell)
    return cells


def phase_converge(plan: Plan, herd: Herd, origin: str, client: bytes) -> Result:
    """After the load: how long until `client` (an update of the load) is at every server."""
    limit = 10.0 if plan.quick else 30.0
    say(f"convergence: {client.decode()} at every server (at most {limit:.0f} s)")
    start = time.perf_counter()
    seen: dict[str, float | None] = {}
    others = [name for name in herd.names if name != origin]
    while time.perf_counter() - start < limit and len(seen) < len(others):
        for name in others:
            if name not in seen and has_record(herd.ports[name], client):
                seen[name] = time.perf_counter() - start
        time.sleep(0.05)
    return {
        "client": client.decode(),
        "limit_s": limit,
        "seconds": {name: seen.get(name) for name in others},
    }


def phase_spread(plan: Plan, herd: Herd, servers: dict[str, Proc]) -> Result:
    """100 connections x 16 spread over every server of the herd (no limit counterpart)."""
    say("throughput: herd, 100 conns x 16 spread over all five servers")
    pids = [p.pid for p in servers.values()]
    settle(pids)
    ports = [herd.ports[name] for name in herd.names]
    return _throughput(ports, pids, 100, 16, "tpspread-", plan)


def phase_solo(plan: Plan, solo: Herd, run_dir: Path, limit: Proc) -> Result:
    """One herd server with no neighbours: what a server costs without the flood."""
    proc = procs.launch_server(solo, "Clark", run_dir)
    out: Result = {}
    try:
        procs.wait_accepting(proc)
        for conns, depth in ((100, 16), (100, 1)):
            for kind, target in (("limit", limit), ("solo", proc)):
                say(f"throughput: {kind} {conns} conns x {depth} pipelined (no neighbours)")
                settle([proc.pid, limit.pid])
                prefix = f"solo{kind[0]}{conns}x{depth}-"
                out[f"{kind}_{conns}x{depth}"] = _throughput(
                    [target.port], [target.pid], conns, depth, prefix, plan
                )
    finally:
        procs.stop([proc])
    return out


def phase_sequential(plan: Plan, limit: Proc, entry: Proc, pids: list[int]) -> Result:
    """One IAMAT at a time (new client each, so the herd floods each), limit then herd."""
    runs: dict[str, list[Result]] = {"limit": [], "herd": []}
    for rnd in range(plan.seq_rounds):
        for kind, proc in (("limit", limit), ("herd", entry)):
            say(f"sequential latency: {kind} (round {rnd + 1})")
            settle(pids)
            spec = {
                "mode": "sequential",
                "port": proc.port,
                "kind": "iamat",
                "count": plan.seq_count,
                "duration": plan.seq_duration,
                "warmup": 50,
                "prefix": f"seq{kind[0]}{rnd}-",
                "pids": [proc.pid] if kind == "limit" else pids[1:],  # pids[0] is the limit
            }
            runs[kind].append(procs.loadgen(spec, timeout=plan.seq_duration + 30))
    out: Result = {}
    for kind, kind_runs in runs.items():
        measured = [r for r in kind_runs if r["latency"]["n"]] or kind_runs
        best = dict(min(measured, key=lambda r: r["latency"].get("p50_us", math.inf)))
        best["all_p50_us"] = [r["latency"].get("p50_us") for r in kind_runs]
        out[kind] = best
    herd_lat, limit_lat = out["herd"]["latency"], out["limit"]["latency"]
    if herd_lat["n"] and limit_lat["n"]:
        out["p50_ratio"] = herd_lat["p50_us"] / limit_lat["p50_us"]
        out["p99_ratio"] = herd_lat["p99_us"] / limit_lat["p99_us"]
    return out


def phase_whatsat(plan: Plan, entry: Proc, pids: list[int]) -> Result:
    """Sequential WHATSAT 50 km / 20 results from the offline source: Paris, then a mix."""
    for name, coords in DENSE.items():
        procs.request(entry.port, iamat(b"wc-" + name.encode(), coords))
    wait_until("places at the entry server", lambda: places_ready(entry.port, b"wc-paris"), 60)
    out: Result = {}
    for label, names in (("paris", ["paris"]), ("dense_mix", list(DENSE))):
        say(f"WHATSAT latency: {label}")
        settle(pids)
        spec = {
            "mode": "sequential",
            "port": entry.port,
            "kind": "whatsat",
            "lines": [f"WHATSAT wc-{name} 50 20" for name in names],
            "count": plan.whatsat_count,
            "duration": plan.whatsat_duration,
            "warmup": 20,
            "pids": [entry.pid],
        }
        out[label] = procs.loadgen(spec, timeout=plan.whatsat_duration + 30)
    return out


def phase_messages(plan: Plan, herd: Herd, prefix: str, pids: list[int]) -> Result:
    """Sequential updates, round robin over the servers, counted from the logs right after.

    (The final count, after the whole run, also includes anti-entropy resends of these
    records that later syncs made.)
    """
    say(f"messages per update: {plan.msg_updates} updates, origins round robin")
    settle(pids)
    for k in range(plan.msg_updates):
        origin = herd.names[k % len(herd.names)]
        procs.request(herd.ports[origin], iamat(b"%s-%d" % (prefix.encode(), k)))
        time.sleep(0.002)
    settle(pids)
    time.sleep(0.6)  # every server flushes its log within 0.25 s
    counts = count_log_lines(herd.config.parent / "logs", time.time())
    return {"prefix": prefix, **messages_per_update(counts, herd, [prefix])}


def phase_propagation(plan: Plan, herd: Herd, origin: str, prefix: str, pids: list[int]) -> Result:
    """IAMAT at `origin`, first WHATSAT answer at each other server; by hop count."""
    hops = herd.hops(origin)
    targets = {name: herd.ports[name] for name in herd.names if name not in (origin, "Z")}
    say(f"propagation: {origin} -> {', '.join(f'{n} ({hops[n]} hops)' for n in targets)}")
    settle(pids)
    spec = {
        "mode": "propagate",
        "origin": herd.ports[origin],
        "targets": targets,
        "trials": plan.prop_trials * len(targets),
        "duration": 30.0,
        "prefix": f"{prefix}-",
    }
    run = procs.loadgen(spec, timeout=60)
    by_hops: dict[str, list[Result]] = {}
    for name, figures in run["targets"].items():
        figures["hops"] = hops[name]
        by_hops.setdefault(str(hops[name]), []).append({"server": name, **figures})
    return {"origin": origin, "targets": run["targets"], "by_hops": by_hops}


def phase_observe(plan: Plan, herd: Herd, origin: str, observer: str, pids: list[int]) -> Result:
    """IAMAT at `origin`; arrival of its AT line at a silent observer peer of the others."""
    hops = herd.hops(origin)
    expect = [name for name in herd.names if name not in (origin, observer)]
    say(
        f"propagation (observer peer): {origin} -> "
        + ", ".join(f"{n} ({hops[n]} hops)" for n in expect)
    )
    settle(pids)
    spec = {
        "mode": "observe",
        "name": observer,
        "peer_port": herd.peer_ports[observer],
        "origin": herd.ports[origin],
        "expect": expect,
        "trials": plan.prop_trials,
        "duration": 40.0,
        "prefix": "obs-",
    }
    run = procs.loadgen(spec, timeout=60)
    by_hops: dict[str, list[Result]] = {}
    for name, figures in run["targets"].items():
        by_hops.setdefault(str(hops[name]), []).append({"server": name, **figures})
    return {"origin": origin, "method": "observer peer", "by_hops": by_hops}


def phase_profile(plan: Plan, servers: dict[str, Proc], out_dir: Path) -> Result:
    """py-spy on Clark (entry) and Bona (a peer) during an extra 100 x 16 run.

    `--gil` keeps only samples where the thread holds the GIL, i.e. runs Python code:
    without it, a server that is runnable but waiting for a core (a loaded 2-core
    machine) shows up as time spent in whatever syscall woke another process.
    """
    spy = shutil.which("py-spy")
    if spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    entry = servers["Clark"]
    herd_pids = [p.pid for p in servers.values()]
    say("profile: py-spy --gil on Clark and Bona during 100 conns x 16 pipelined")
    settle(herd_pids)
    seconds = plan.profile_seconds
    recorders = {}
    for name in ("Clark", "Bona"):
        raw = out_dir / f"profile-{name}.txt"
        raw.unlink(missing_ok=True)
        recorders[name] = (
            raw,
            subprocess.Popen(
                [
                    *(spy, "record", "--pid", str(servers[name].pid), "--gil", "--nonblocking"),
                    *("--duration", str(int(seconds)), "--rate", "200", "--format", "raw"),
                    *("--output", str(raw)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            ),
        )
    pids = [entry.pid, *(p for p in herd_pids if p != entry.pid)]
    longer = Plan(quick=plan.quick, tp_warmup=0.3, tp_duration=seconds)
    run = _throughput([entry.port], pids, 100, 16, "tpprof-", longer)
    out: Result = {"run_rps": run["rps"], "cpu_s": run["server_cpu_s"]}
    for name, (raw, recorder) in recorders.items():
        try:
            _, err = recorder.communicate(timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            recorder.kill()
            _, err = recorder.communicate()
        if raw.exists():
            out[name] = {"file": raw.name, **top_frames(raw)}
        else:
            out[name] = {"skipped": f"py-spy failed: {err.decode(errors='replace')[-300:]}"}
    return out


def phase_micro() -> Result:
    """Per-call CPU cost of herd_trio's hot functions (bench.micro, its own process)."""
    say("micro: per-call cost of the hot functions")
    done = subprocess.run(
        [sys.executable, "-m", "bench.micro"],
        cwd=procs.ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        return {"error": done.stderr.decode(errors="replace")[-300:]}
    result: Result = json.loads(done.stdout)
    return result


def top_frames(raw: Path, count: int = 15) -> Result:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        samples = int(n)
        total += samples
        frames = [_short(frame) for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    share = 100.0 / max(1, total)
    return {
        "samples": total,
        "self": [(f, round(n * share, 1)) for f, n in own.most_common(count)],
        "inclusive": [(f, round(n * share, 1)) for f, n in inclusive.most_common(count + 10)],
    }


def _short(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py:123)`."""
    name, _, where = frame.partition(" (")
    return f"{name} ({os.path.basename(where.rstrip(')'))})" if where else name


# ---- logs ----


def count_log_lines(log_dir: Path, stopped_at: float) -> Result:
    """Peer AT lines and client IAMATs per client-id prefix, link drops and anti-entropy
    resends (before `stopped_at`, a time.time(): a stopping herd drops its links), from
    the logs."""
    peer_at: Counter[str] = Counter()
    client_iamat: Counter[str] = Counter()
    drops, syncs, resent = [], 0, 0
    cutoff = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(stopped_at))
    for path in sorted(log_dir.glob("*.log")):
        with path.open(errors="replace") as f:
            for line in f:
                at = line.find(" < b'")
                if at < 0:
                    observer = "link to Z " in line or "link from Z " in line  # ours
                    if (
                        " dropped: " in line
                        and "link " in line
                        and line[:19] < cutoff
                        and not observer
                    ):
                        drops.append(line.strip()[:200])
                    elif (sync := line.find(": sending ")) > 0 and " sync with " in line:
                        syncs += 1
                        resent += int(line[sync + 10 :].split()[0])
                    continue
                fields = line[at + 5 :].split(" ", 4)
                if fields[0] == "AT" and " peer " in line[:at] and len(fields) > 3:
                    peer_at[fields[3].partition("-")[0]] += 1
                elif fields[0] == "IAMAT" and len(fields) > 1:
                    client_iamat[fields[1].partition("-")[0]] += 1
    return {
        "peer_at": dict(peer_at),
        "client_iamat": dict(client_iamat),
        "link_drops": drops,
        "sync_resends": {"syncs_that_sent": syncs, "records_sent": resent},
    }


def messages_per_update(counts: Result, herd: Herd, prefixes: list[str]) -> Result:
    """AT lines that crossed peer links per update, in total and per undirected edge."""
    out: Result = {"edges": len(herd.edges), "servers": len(herd.names)}
    for prefix in prefixes:
        updates = counts["client_iamat"].get(prefix, 0)
        lines = counts["peer_at"].get(prefix, 0)
        if updates:
            per_update = lines / updates
            out[prefix] = {
                "updates": updates,
                "peer_lines": lines,
                "per_update": per_update,
                "per_edge": per_update / len(herd.edges),
            }
    out["flood_minimum"] = 2 * len(herd.edges) - (len(herd.names) - 1)  # each server sends once
    return out


# ---- the whole suite ----


def machine() -> Result:
    """What the figures were measured on."""
    import trio

    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=procs.ROOT,
            capture_output=True,
            check=False,
        )
        .stdout.decode()
        .strip()
    )
    dirty = (
        subprocess.run(
            ["git", "status", "--porcelain", "herd_trio"],
            cwd=procs.ROOT,
            capture_output=True,
            check=False,
        )
        .stdout.decode()
        .splitlines()
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "trio": trio.__version__,
        "kernel": platform.release(),
        "commit": commit or "?",
        "herd_trio_uncommitted_files": len(dirty),
        "load_average_at_start": os.getloadavg(),
    }


def foreign_load(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes while we run nothing (a shared machine's noise)."""
    before = machine_busy_ticks()
    time.sleep(seconds)
    return (machine_busy_ticks() - before) / os.sysconf("SC_CLK_TCK") / seconds


def attempt(results: Result, name: str, phase: Callable[[], Result | list[Result]]) -> None:
    """Run one phase into results[name]; a failure is recorded and the suite goes on."""
    try:
        results[name] = phase()
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError, KeyError) as exc:
        say(f"{name}: failed: {exc!r}")
        results["errors"].append(f"{name}: {exc!r}")


def run(plan: Plan, out_dir: Path, *, profile: bool, keep_logs: bool) -> Result:
    """Every phase, in order; the result dict written as results.json.

    Latency phases run before the throughput matrix, while the herd's store is small
    and no backlog is left over; the throughput phases, which can leave the herd busy
    for a long time (anti-entropy resends), come last on each herd.
    """
    budget = Budget(SUITE_BUDGET)
    SETTLES.clear()
    run_dir = out_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    results: Result = {"meta": {**machine(), "quick": plan.quick}, "skipped": [], "errors": []}
    results["meta"]["foreign_cores_at_start"] = foreign_load()

    def herd_config(name: str, names: list[str], edges: list[tuple[str, str]]) -> Herd:
        return procs.write_herd(run_dir / name / "herd.toml", names, edges, SETTINGS)

    default = herd_config("herd", procs.DEFAULT_NAMES, procs.DEFAULT_EDGES)
    solo = herd_config("solo", procs.DEFAULT_NAMES, procs.DEFAULT_EDGES)
    # The chain, plus a silent observer Z (the generator) that B, C and D dial.
    chain = herd_config(
        "chain", [*procs.CHAIN_NAMES, "Z"], [*procs.CHAIN_EDGES, ("B", "Z"), ("C", "Z"), ("D", "Z")]
    )
    alone = herd_config("alone", ["Clark"], [])
    results["launch"] = phase_launch(plan, run_dir / "solo", solo)
    attempt(results, "micro", phase_micro)

    say("starting the limit server and the default herd (5 processes)")
    limit = procs.launch_limit(procs.free_ports(1)[0], run_dir / "limit")
    running: list[Proc] = []
    results["exit_codes"] = {}
    try:
        procs.wait_accepting(limit)
        servers = start_herd(default, run_dir / "herd")
        running += servers.values()
        entry = servers["Clark"]
        herd_pids = [p.pid for p in servers.values()]
        every = [limit.pid, *herd_pids]
        results["herd_ready_s"] = time.perf_counter() - min(p.started for p in servers.values())
        attempt(results, "idle", lambda: phase_idle(plan, limit, entry))
        attempt(results, "sequential", lambda: phase_sequential(plan, limit, entry, every))
        attempt(results, "whatsat", lambda: phase_whatsat(plan, entry, every))
        msg = phase_messages(plan, default, "msg", every)
        results["messages_quiet"] = {"default": msg}
        prop: Result = {}
        results["propagation"] = prop
        attempt(prop, "default", lambda: phase_propagation(plan, default, "Clark", "propd", every))
        attempt(
            results, "throughput", lambda: phase_throughput(plan, budget, limit, entry, herd_pids)
        )
        last = f"tph100x16r{plan.tp_reps - 1}-99-0".encode()
        attempt(results, "converge", lambda: phase_converge(plan, default, "Clark", last))
        if budget.allows(10):
            attempt(results, "spread", lambda: phase_spread(plan, default, servers))
        if profile and budget.allows(plan.profile_seconds + 15):
            attempt(results, "profile", lambda: phase_profile(plan, servers, out_dir))
        say("stopping the default herd (and reading its logs)")
        stopped_at = time.time() - 1  # log stamps have 1 s granularity in the cutoff
        results["exit_codes"].update(procs.stop(running))
        running = []
        counts = count_log_lines(default.config.parent / "logs", stopped_at)
        prefixes = [msg["prefix"], "propd", *(f"tph100x16r{r}" for r in range(plan.tp_reps))]
        results["messages"] = {"default": messages_per_update(counts, default, prefixes)}
        results["link_drops"] = {"default": counts["link_drops"]}
        results["sync_resends"] = {"default": counts["sync_resends"]}

        if budget.allows(30):
            attempt(results, "solo", lambda: phase_solo(plan, alone, run_dir / "alone", limit))
        else:
            results["skipped"].append("solo")

        say("starting the chain herd A-B-C-D (4 processes)")
        # What the flood counts see: the chain without the observer (it logs nothing).
        chain_core = replace(chain, names=procs.CHAIN_NAMES, edges=procs.CHAIN_EDGES)
        chain_servers = start_herd(chain, run_dir / "chain", procs.CHAIN_NAMES)
        running += chain_servers.values()
        chain_pids = [p.pid for p in chain_servers.values()]
        attempt(prop, "chain_observed", lambda: phase_observe(plan, chain, "A", "Z", chain_pids))
        attempt(prop, "chain", lambda: phase_propagation(plan, chain, "A", "propc", chain_pids))
        results["messages_quiet"]["chain"] = phase_messages(plan, chain_core, "cmsg", chain_pids)
        stopped_at = time.time() - 1
        results["exit_codes"].update({f"chain {k}": v for k, v in procs.stop(running).items()})
        running = []
        counts = count_log_lines(chain.config.parent / "logs", stopped_at)
        results["messages"]["chain"] = messages_per_update(counts, chain_core, ["cmsg", "propc"])
        results["link_drops"]["chain"] = counts["link_drops"]
        results["sync_resends"]["chain"] = counts["sync_resends"]
    finally:
        procs.stop([*running, limit])
    results["settle"] = {
        "waits": len(SETTLES),
        "never_idle": sum(1 for t in SETTLES if t >= SETTLE),
        "longest_s": max(SETTLES, default=0.0),
    }
    results["meta"]["elapsed_s"] = budget.elapsed()
    if not keep_logs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return results
