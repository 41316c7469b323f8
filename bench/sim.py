"""The herd's flooding in one process, in memory: `python -m bench.sim [--out DIR] [--quick]`.

A discrete-event simulation (a priority queue of timed events; no trio, no sockets) of
what docs/design.md describes, with the same rules as the product:

* keep/forward: a server keeps a record only if it supersedes the one it holds (rank:
  client time, then origin, then coords; herd_trio/store.py) and forwards only what it
  kept, to every neighbour but the one it came from (herd_trio/bus.py);
* one link per edge, FIFO in each direction (TCP): a record's arrival is never before
  the previous record's on the same directed link;
* the link writer (herd_trio/linkwriter.py): an idle link sends a published record at
  once; while it is busy, records wait in its outbox, which keeps one pending record per
  client (a newer one replaces the older and goes to the back); when the send is done the
  writer takes the whole outbox as one write;
* one CPU per server: records that arrive together (one read, one client batch) are
  handled one after the other, `proc` seconds each, and a link's writer runs again only
  once the batch in hand is done (trio's single thread), so the records of a batch
  published behind a direct send leave together, coalesced, in the writer's next write.

Not modelled: anti-entropy (with no loss there is nothing to repair), PINGs,
link failures, the client's reply and its flood-first wait, the AT-line tie-break for
equal ranks (the simulated ranks are distinct), TCP congestion.

Prints the tables docs/scale.md shows and writes them to DIR/sim.json (DIR defaults to
bench-results/). Seeded: the same arguments give the same figures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

Graph = list[list[int]]  # sorted adjacency lists, one per server
ROOT = Path(__file__).resolve().parents[1]

# --- graphs ---------------------------------------------------------------------------


def from_edges(n: int, edges: set[tuple[int, int]]) -> Graph:
    """Adjacency lists of an undirected graph given as (u, v) pairs."""
    adj: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        adj[u].append(v)
        adj[v].append(u)
    return [sorted(a) for a in adj]


def edge_count(graph: Graph) -> int:
    """The number of undirected edges."""
    return sum(len(a) for a in graph) // 2


def ring(n: int) -> Graph:
    """A cycle of n servers (the diameter grows as n/2)."""
    return from_edges(n, {(min(u, (u + 1) % n), max(u, (u + 1) % n)) for u in range(n)})


def random_regular(n: int, d: int, rng: random.Random) -> Graph:
    """A uniformly random connected simple d-regular graph, by the pairing model.

    n*d points (d per server) are paired at random; a pairing with a self-loop or a double
    edge, or a graph that is not connected, is rejected and drawn again (for d = 3 about
    e^2 ~ 7 draws on average; the accepted graphs are uniform among simple ones).
    """
    if n * d % 2 or not 0 < d < n:
        raise ValueError(f"no simple {d}-regular graph on {n} vertices")
    while True:
        points = [v for v in range(n) for _ in range(d)]
        rng.shuffle(points)
        edges: set[tuple[int, int]] = set()
        for i in range(0, len(points), 2):
            u, v = sorted((points[i], points[i + 1]))
            if u == v or (u, v) in edges:
                break
            edges.add((u, v))
        else:
            graph = from_edges(n, edges)
            if is_connected(graph):
                return graph


def small_world(n: int, k: int, p: float, rng: random.Random) -> Graph:
    """A connected Watts-Strogatz graph: a ring lattice (k/2 neighbours each side) whose
    edges are each rewired with probability p to a uniform random server (no self-loops,
    no double edges; the same procedure as networkx's watts_strogatz_graph)."""
    if k % 2 or not 0 < k < n:
        raise ValueError(f"k must be even and below n, got k={k}, n={n}")
    while True:
        adj = [set[int]() for _ in range(n)]
        for u in range(n):
            for j in range(1, k // 2 + 1):
                v = (u + j) % n
                adj[u].add(v)
                adj[v].add(u)
        for j in range(1, k // 2 + 1):
            for u in range(n):
                if rng.random() >= p or len(adj[u]) >= n - 1:
                    continue
                w = rng.randrange(n)
                while w == u or w in adj[u]:
                    w = rng.randrange(n)
                v = (u + j) % n
                adj[u].discard(v)
                adj[v].discard(u)
                adj[u].add(w)
                adj[w].add(u)
        graph = [sorted(a) for a in adj]
        if is_connected(graph):
            return graph


def distances(graph: Graph, source: int) -> list[int]:
    """Hop counts from `source` (BFS); -1 where unreachable."""
    dist = [-1] * len(graph)
    dist[source] = 0
    frontier = [source]
    while frontier:
        nxt = []
        for u in frontier:
            du = dist[u] + 1
            for v in graph[u]:
                if dist[v] < 0:
                    dist[v] = du
                    nxt.append(v)
        frontier = nxt
    return dist


def is_connected(graph: Graph) -> bool:
    """True if every server reaches every other."""
    return min(distances(graph, 0)) >= 0


def eccentricity(graph: Graph, source: int) -> int:
    """The hop count from `source` to the server farthest from it."""
    return max(distances(graph, source))


def diameter(graph: Graph, exact_up_to: int = 1000) -> tuple[int, bool]:
    """The diameter and whether it is exact.

    Exact (a BFS from every server) up to `exact_up_to` servers; above, a lower bound by
    repeated double sweeps (BFS from a server, then from the farthest one found), which
    on these graphs is usually the diameter or one short of it.
    """
    n = len(graph)
    if all(len(a) == 2 for a in graph) and is_connected(graph):
        return n // 2, True  # a cycle
    if n <= exact_up_to:
        return max(eccentricity(graph, s) for s in range(n)), True
    best, start = 0, 0
    for _ in range(4):
        dist = distances(graph, start)
        far = max(range(n), key=dist.__getitem__)
        dist = distances(graph, far)
        best = max(best, max(dist))
        start = (far * 7919 + 1) % n  # another start, deterministic
    return best, False


# --- the simulated herd -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One client location; `update` only identifies it for the figures (not in the rank)."""

    client: int
    sent: int  # client time
    origin: int
    coords: int
    update: int

    def supersedes(self, other: Record) -> bool:
        """herd_trio.protocol.Record.supersedes: a higher (client time, origin, coords)."""
        return (self.sent, self.origin, self.coords) > (other.sent, other.origin, other.coords)


@dataclass(frozen=True)
class Params:
    """Costs of the model; the defaults are read off this machine (docs/scale.md)."""

    latency: float = 1e-3  # median one-way delay of a link, seconds
    jitter: float = 0.5  # sigma of the lognormal delay around the median; 0: fixed delay
    proc: float = 10e-6  # CPU per record a server handles (parse, offer, log, publish)
    write: float = 10e-6  # one write on a link: its writer is busy that long plus transfer
    line_bytes: int = 120  # one AT line with its LF
    bandwidth: float = 1e9  # bits per second per link
    coalesce: bool = True  # False: an outbox keeps every record (for comparison)
    take_limit: int = 4096  # records per write (Outbox.take_nowait's default)


@dataclass(slots=True)
class Link:
    """One direction of one edge: its writer and its outbox."""

    src: int
    dst: int
    busy: bool = False  # a write is in progress, or the writer has not run since
    pending: dict[int, Record] = field(default_factory=dict)
    last_arrival: float = 0.0  # TCP keeps order


# What an event does: a batch of records reaches a server's CPU (server, source or -1
# for a client, records), a server decides on one record (server, source, record), or a
# link's writer task runs (the link).
Event = tuple[int, int, tuple[Record, ...]] | tuple[int, int, Record] | Link


class Herd:
    """Servers, links and the event queue: `inject` client batches, then `run`."""

    def __init__(self, graph: Graph, params: Params, seed: int = 0) -> None:
        n = len(graph)
        self.graph = graph
        self.params = params
        self.rng = random.Random(seed)
        self.now = 0.0
        self.stores: list[dict[int, Record]] = [{} for _ in range(n)]
        self.links = {(u, v): Link(u, v) for u in range(n) for v in graph[u]}
        self._events: list[tuple[float, int, Event]] = []
        self._seq = 0
        # Per server, the (start, end) of each batch its CPU has taken on, oldest first.
        self._batches: list[deque[tuple[float, float]]] = [deque() for _ in range(n)]
        self._cpu_free = [0.0] * n
        self._tx = params.line_bytes * 8 / params.bandwidth
        self._unkeyed = 0  # outbox keys when coalescing is off
        # Figures.
        self.injected_at: dict[int, float] = {}
        self.holders: Counter[int] = Counter()  # update -> servers that kept it
        self.converged_at: dict[int, float] = {}  # update -> when the last server kept it
        self.messages: Counter[int] = Counter()  # update -> records sent on links
        self.received = [0] * n  # records that arrived at each server
        self.writes = 0  # link writes (each carries a batch)
        self.coalesced = 0  # records replaced in an outbox before they were sent
        self.per_edge: Counter[tuple[int, int, int]] | None = None  # (update, u, v), u < v
        self.keeps: list[tuple[float, int, int]] | None = None  # (time, server, update)

    def audit_edges(self) -> None:
        """Count every update's records on every edge (memory grows with the run)."""
        self.per_edge = Counter()

    def trace_keeps(self) -> None:
        """Note when each server keeps each record, in order (memory grows with the run)."""
        self.keeps = []

    def _push(self, at: float, event: Event) -> None:
        self._seq += 1  # equal times: first pushed, first run
        heapq.heappush(self._events, (at, self._seq, event))

    def inject(self, at: float, server: int, records: Sequence[Record]) -> None:
        """Client IAMATs that `server` reads together at time `at` (one batch)."""
        for record in records:
            self.injected_at.setdefault(record.update, at)
        self._push(at, (server, -1, tuple(records)))

    def run(self) -> None:
        """Process events until the herd is quiet."""
        events = self._events
        while events:
            self.now, _, event = heapq.heappop(events)
            if isinstance(event, Link):
                self._writer_runs(event)
                continue
            server, source, what = event
            if isinstance(what, Record):
                self._decide(server, source, what)
            else:
                self._batch(server, source, what)

    # A server.

    def _batch(self, server: int, source: int, records: tuple[Record, ...]) -> None:
        """Records read together: the CPU handles them in turn, `proc` seconds each."""
        if source >= 0:
            self.received[server] += len(records)
        proc = self.params.proc
        if proc == 0:
            for record in records:
                self._decide(server, source, record)
            return
        start = max(self.now, self._cpu_free[server])
        end = start + proc * len(records)
        self._cpu_free[server] = end
        self._batches[server].append((start, end))
        for i, record in enumerate(records, 1):
            self._push(start + proc * i, (server, source, record))

    def _decide(self, server: int, source: int, record: Record) -> None:
        """Store.offer then Bus.publish: keep if newer, flood to all but the source."""
        store = self.stores[server]
        held = store.get(record.client)
        if held is not None and not record.supersedes(held):
            return  # duplicate or stale: dropped, never forwarded
        store[record.client] = record
        if self.keeps is not None:
            self.keeps.append((self.now, server, record.update))
        self.holders[record.update] += 1
        if self.holders[record.update] == len(self.graph):
            self.converged_at[record.update] = self.now
        for neighbour in self.graph[server]:
            if neighbour != source:
                self._deliver(self.links[server, neighbour], record)

    # A link.

    def _deliver(self, link: Link, record: Record) -> None:
        """LinkWriter.deliver: straight out if the writer is idle, else into the outbox."""
        if not link.busy and not link.pending:
            self._send(link, [record])
        elif not self.params.coalesce:
            self._unkeyed -= 1
            link.pending[self._unkeyed] = record
        else:  # Outbox.put: one per client, the newer one, at the back
            held = link.pending.pop(record.client, None)
            if held is not None and not record.supersedes(held):
                link.pending[record.client] = held
                return
            if held is not None:
                self.coalesced += 1
            link.pending[record.client] = record

    def _send(self, link: Link, batch: list[Record]) -> None:
        p = self.params
        done = self.now + p.write + self._tx * len(batch)
        if p.jitter == 0:
            delay = p.latency
        else:
            delay = self.rng.lognormvariate(math.log(p.latency), p.jitter)
        arrival = max(done + delay, link.last_arrival)
        link.last_arrival = arrival
        link.busy = True
        self.writes += 1
        u, v = min(link.src, link.dst), max(link.src, link.dst)
        for record in batch:
            self.messages[record.update] += 1
            if self.per_edge is not None:
                self.per_edge[record.update, u, v] += 1
        self._push(arrival, (link.dst, link.src, tuple(batch)))
        self._push(done, link)

    def _writer_runs(self, link: Link) -> None:
        """The write is done; the writer task runs once the CPU is done with its batch."""
        batches = self._batches[link.src]
        while batches and batches[0][1] <= self.now:
            batches.popleft()
        if batches and batches[0][0] <= self.now:
            self._push(batches[0][1], link)  # the event loop is in a batch
            return
        link.busy = False
        if link.pending:  # Outbox.take_nowait: oldest first, up to the limit, one write
            keys = list(link.pending)[: self.params.take_limit]
            self._send(link, [link.pending.pop(k) for k in keys])


# --- workloads and figures --------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def single_flood_messages(graph: Graph) -> int:
    """Records one isolated update costs: the origin sends deg, every other server deg - 1."""
    return 2 * edge_count(graph) - len(graph) + 1


@dataclass
class Steady:
    """Independent updates (one per client) at random origins, Poisson arrivals."""

    updates: int
    rate: float  # updates per second, herd-wide
    messages_per_update: float
    per_edge: float  # messages per update per edge
    max_on_an_edge: int | None  # most records of one update on one edge (audited runs)
    single_flood: int  # 2E - n + 1: the exact count for an isolated update
    convergence_ms: dict[str, float]  # p50, p99, max: injection to the last server keeping it
    origin_eccentricity: float  # mean hops from the origin to the farthest server
    received_per_update: dict[str, float]  # per server: mean and max
    writes_per_update: float


def run_steady(
    graph: Graph, params: Params, updates: int, rate: float, seed: int, *, audit: bool = False
) -> Steady:
    """Inject `updates` updates of distinct clients and measure them."""
    rng = random.Random(seed)
    herd = Herd(graph, params, seed + 1)
    if audit:
        herd.audit_edges()
    n, at = len(graph), 0.0
    origins = []
    for update in range(updates):
        at += rng.expovariate(rate)
        origin = rng.randrange(n)
        origins.append(origin)
        herd.inject(at, origin, [Record(update, 1, origin, 0, update)])
    herd.run()
    if len(herd.converged_at) != updates:
        raise AssertionError("an update did not reach every server")
    times = [(herd.converged_at[u] - herd.injected_at[u]) * 1e3 for u in range(updates)]
    total = sum(herd.messages.values())
    eccentricities = {o: eccentricity(graph, o) for o in set(origins)}
    return Steady(
        updates=updates,
        rate=rate,
        messages_per_update=total / updates,
        per_edge=total / updates / edge_count(graph),
        max_on_an_edge=max(herd.per_edge.values()) if herd.per_edge is not None else None,
        single_flood=single_flood_messages(graph),
        convergence_ms={
            "p50": percentile(times, 50),
            "p99": percentile(times, 99),
            "max": max(times),
        },
        origin_eccentricity=sum(eccentricities[o] for o in origins) / updates,
        received_per_update={
            "mean": sum(herd.received) / n / updates,
            "max": max(herd.received) / updates,
        },
        writes_per_update=herd.writes / updates,
    )


@dataclass
class Burst:
    """`size` updates of one client at once; what the flood costs with and without coalescing."""

    size: int
    origins: str  # "one": one pipelined batch at one server; "many": a server each
    messages: int
    messages_without_coalescing: int
    naive: int  # size x single_flood: as many floods as updates
    coalesced: int  # records replaced in outboxes
    final_convergence_ms: float  # until every server holds the newest update


def run_burst(graph: Graph, params: Params, size: int, origins: str, seed: int) -> Burst:
    """A burst of `size` updates for client 0, from one server or from random ones."""

    def one_run(coalesce: bool) -> Herd:
        rng = random.Random(seed)
        herd = Herd(graph, Params(**{**asdict(params), "coalesce": coalesce}), seed + 1)
        if origins == "one":
            origin = rng.randrange(len(graph))
            herd.inject(0.0, origin, [Record(0, i, origin, 0, i) for i in range(1, size + 1)])
        else:  # one update every 10 us, each at a random server, newer client times later
            for i in range(1, size + 1):
                origin = rng.randrange(len(graph))
                herd.inject(i * 10e-6, origin, [Record(0, i, origin, 0, i)])
        herd.run()
        if any(store[0].update != size for store in herd.stores):
            raise AssertionError("the servers did not converge on the newest update")
        return herd

    herd, plain = one_run(True), one_run(False)
    return Burst(
        size=size,
        origins=origins,
        messages=sum(herd.messages.values()),
        messages_without_coalescing=sum(plain.messages.values()),
        naive=size * single_flood_messages(graph),
        coalesced=herd.coalesced,
        final_convergence_ms=(herd.converged_at[size] - herd.injected_at[size]) * 1e3,
    )


SHAPES: dict[str, Callable[[int, random.Random], Graph]] = {
    "ring": lambda n, rng: ring(n),
    "random 3-regular": lambda n, rng: random_regular(n, 3, rng),
    "small world k=4 p=0.1": lambda n, rng: small_world(n, 4, 0.1, rng),
}


@dataclass
class Row:
    """One graph: its shape and figures."""

    shape: str
    servers: int
    edges: int
    degree: dict[str, float]  # mean, max
    diameter: int
    diameter_exact: bool
    steady: Steady
    bursts: list[Burst]
    seconds: float  # wall time of this row's simulation

    def at_rate(self, rate: float, params: Params) -> dict[str, float]:
        """Per-server cost of a herd-wide update rate: bytes/s in (mean, max) and CPU share."""
        received = self.steady.received_per_update
        return {
            "in_bytes_per_s_mean": received["mean"] * rate * params.line_bytes,
            "in_bytes_per_s_max": received["max"] * rate * params.line_bytes,
            "cpu_share_mean": received["mean"] * rate * params.proc,
            "cpu_share_max": received["max"] * rate * params.proc,
        }


def measure(
    shape: str,
    servers: int,
    params: Params,
    *,
    updates: int,
    rate: float,
    burst: int,
    seed: int,
) -> Row:
    """Build one graph and run its workloads (bursts only if `burst` > 0)."""
    started = time.perf_counter()
    graph = SHAPES[shape](servers, random.Random(seed))
    steady = run_steady(graph, params, updates, rate, seed, audit=servers <= 200)
    bursts = [run_burst(graph, params, burst, o, seed) for o in ("one", "many") if burst > 0]
    dia, exact = diameter(graph)
    degrees = [len(a) for a in graph]
    return Row(
        shape=shape,
        servers=servers,
        edges=edge_count(graph),
        degree={"mean": sum(degrees) / servers, "max": max(degrees)},
        diameter=dia,
        diameter_exact=exact,
        steady=steady,
        bursts=bursts,
        seconds=time.perf_counter() - started,
    )


# --- the report -------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def tables(rows: list[Row], params: Params, rate: float) -> str:
    """The Markdown tables docs/scale.md shows."""
    lat = params.latency * 1e3
    out = [
        "| graph | servers | edges | degree max | diameter | msgs/update (2E-n+1) | per edge |"
        " max on one edge | convergence p50 / p99 / max (ms) | diameter x latency (ms) |"
        " origin eccentricity, mean | received per server per update, mean / max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.steady
        c = s.convergence_ms
        dia = f"{r.diameter}" if r.diameter_exact else f">= {r.diameter}"
        out.append(
            f"| {r.shape} | {r.servers:,} | {r.edges:,} | {r.degree['max']:.0f} | {dia} |"
            f" {_num(s.messages_per_update)} ({s.single_flood:,}) | {s.per_edge:.2f} |"
            f" {s.max_on_an_edge or '-'} | {c['p50']:.1f} / {c['p99']:.1f} / {c['max']:.1f} |"
            f" {r.diameter * lat:.0f} | {s.origin_eccentricity:.1f} |"
            f" {s.received_per_update['mean']:.2f} / {s.received_per_update['max']:.2f} |"
        )
    bursts = [(r, b) for r in rows for b in r.bursts]
    if bursts:
        out += [
            "",
            "| graph | servers | burst of one client | messages | without coalescing |"
            " as separate floods | newest everywhere after (ms) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r, b in bursts:
            what = (
                f"{b.size} IAMATs in one batch at one server"
                if b.origins == "one"
                else f"{b.size} IAMATs at random servers, 10 us apart"
            )
            out.append(
                f"| {r.shape} | {r.servers:,} | {what} | {b.messages:,} |"
                f" {b.messages_without_coalescing:,} | {b.naive:,} |"
                f" {b.final_convergence_ms:.1f} |"
            )
    out += [
        "",
        f"| graph | servers | at {rate:,.0f} updates/s of {params.line_bytes}-byte lines:"
        " bytes/s into a server, mean / max | CPU of a server at"
        f" {params.proc * 1e6:g} us per record, mean / max |",
        "|---|---|---|---|",
    ]
    for r in rows:
        a = r.at_rate(rate, params)
        out.append(
            f"| {r.shape} | {r.servers:,} | {a['in_bytes_per_s_mean'] / 1e6:.2f} /"
            f" {a['in_bytes_per_s_max'] / 1e6:.2f} MB/s | {a['cpu_share_mean']:.0%} /"
            f" {a['cpu_share_max']:.0%} of a core |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the simulations, print the tables, write DIR/sim.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--servers",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[50, 200, 1000, 5000],
        help="herd sizes, comma-separated (default: 50,200,1000,5000)",
    )
    parser.add_argument("--quick", action="store_true", help="50 and 200 servers only")
    parser.add_argument("--rate", type=float, default=10_000, help="updates/s for the cost table")
    args = parser.parse_args(argv)
    params = Params()
    rows = []
    for servers in [50, 200] if args.quick else args.servers:
        # Fewer updates on the big graphs and bursts only on the small ones: a few
        # seconds in all on one core.
        updates, burst = (200, 100) if servers <= 200 else (50, 0) if servers <= 1000 else (10, 0)
        for shape in SHAPES:
            row = measure(
                shape, servers, params, updates=updates, rate=1000, burst=burst, seed=args.seed
            )
            print(f"{shape}, {servers} servers: {row.seconds:.1f} s", file=sys.stderr)
            rows.append(row)
    text = tables(rows, params, args.rate)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "params": asdict(params),
        "seed": args.seed,
        "cost_rate": args.rate,
        "rows": [{**asdict(r), "at_rate": r.at_rate(args.rate, params)} for r in rows],
    }
    (args.out / "sim.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
