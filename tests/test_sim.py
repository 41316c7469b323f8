"""The flooding simulator (bench/sim.py) itself: its graphs, its counts, its timing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bench import sim
from bench.sim import Graph, Herd, Params, Record

# No processing, no write cost, a fixed 1 s per hop: times are exact hop counts.
HOPS = Params(latency=1.0, jitter=0, proc=0, write=0, bandwidth=float("inf"))


def star(n: int) -> Graph:
    return sim.from_edges(n, {(0, v) for v in range(1, n)})


def complete(n: int) -> Graph:
    return sim.from_edges(n, {(u, v) for u in range(n) for v in range(u + 1, n)})


def graphs() -> list[tuple[str, Graph]]:
    rng = random.Random(7)
    return [
        ("ring 5", sim.ring(5)),
        ("ring 12", sim.ring(12)),
        ("3-regular 20", sim.random_regular(20, 3, rng)),
        ("small world 30", sim.small_world(30, 4, 0.1, rng)),
        ("star 8", star(8)),
        ("complete 6", complete(6)),
    ]


GRAPHS = graphs()


def test_ring_of_five_delivers_every_update_with_six_messages() -> None:
    # Origin: 2 sends; each of the 4 others forwards once, to the neighbour it did not
    # hear from: 6 = 2E - n + 1, of which 2 are duplicates.
    graph = sim.ring(5)
    herd = Herd(graph, Params(), seed=3)
    for update in range(20):
        origin = update % 5
        herd.inject(update * 1e-4, origin, [Record(update, 1, origin, 0, update)])
    herd.run()
    assert all(len(store) == 20 for store in herd.stores)
    assert all(herd.holders[u] == 5 for u in range(20))
    assert all(herd.messages[u] == 6 for u in range(20))
    assert sum(herd.received) == 20 * 6
    assert sim.single_flood_messages(graph) == 6


@pytest.mark.parametrize(("name", "graph"), GRAPHS, ids=[name for name, _ in GRAPHS])
def test_at_most_two_messages_per_update_per_edge(name: str, graph: Graph) -> None:
    # Concurrent floods, many of them for the same clients from different servers, so
    # older versions are dropped mid-flood and outboxes coalesce.
    rng = random.Random(name)
    herd = Herd(graph, Params(proc=20e-6, write=30e-6), seed=5)
    herd.audit_edges()
    for update in range(60):
        origin = rng.randrange(len(graph))
        record = Record(rng.randrange(4), update, origin, rng.randrange(3), update)
        herd.inject(rng.uniform(0, 2e-3), origin, [record])
    herd.run()
    assert herd.per_edge is not None
    assert max(herd.per_edge.values()) <= 2
    # Every server holds the same newest record of each client.
    assert all(store == herd.stores[0] for store in herd.stores)


@pytest.mark.parametrize(("name", "graph"), GRAPHS, ids=[name for name, _ in GRAPHS])
def test_isolated_update_costs_exactly_2e_minus_n_plus_1(name: str, graph: Graph) -> None:
    steady = sim.run_steady(graph, Params(), updates=10, rate=10.0, seed=1, audit=True)
    assert steady.messages_per_update == sim.single_flood_messages(graph)
    assert steady.max_on_an_edge is not None
    assert steady.max_on_an_edge <= 2


@pytest.mark.parametrize(("name", "graph"), GRAPHS, ids=[name for name, _ in GRAPHS])
def test_convergence_is_the_distance_bound_without_processing(name: str, graph: Graph) -> None:
    for origin in range(len(graph)):
        herd = Herd(graph, HOPS)
        herd.trace_keeps()
        herd.inject(0.0, origin, [Record(0, 1, origin, 0, 0)])
        herd.run()
        assert herd.converged_at[0] == sim.eccentricity(graph, origin)
        assert herd.keeps is not None
        kept_at = {server: at for at, server, _ in herd.keeps}
        assert [kept_at[s] for s in range(len(graph))] == sim.distances(graph, origin)


def test_convergence_is_slower_than_the_bound_with_costs() -> None:
    graph = sim.ring(12)
    herd = Herd(graph, Params(latency=1e-3, jitter=0))
    herd.inject(0.0, 0, [Record(0, 1, 0, 0, 0)])
    herd.run()
    assert herd.converged_at[0] > sim.eccentricity(graph, 0) * 1e-3


def test_same_seed_same_figures_other_seed_other_figures() -> None:
    def row(seed: int) -> sim.Row:
        return sim.measure(
            "small world k=4 p=0.1", 40, Params(), updates=30, rate=1000, burst=10, seed=seed
        )

    first, again, other = row(4), row(4), row(5)
    first.seconds = again.seconds = other.seconds = 0.0
    assert first == again
    assert first != other


def test_a_burst_at_one_server_costs_two_floods_with_coalescing() -> None:
    # The batch's first record goes out at once; the other 99 wait for the writer,
    # which runs after the batch, and leave as one coalesced record: the newest.
    graph = sim.random_regular(30, 3, random.Random(2))
    burst = sim.run_burst(graph, Params(), size=100, origins="one", seed=3)
    flood = sim.single_flood_messages(graph)
    assert burst.messages == 2 * flood
    assert burst.messages_without_coalescing == burst.naive == 100 * flood
    assert burst.coalesced > 0


def test_a_burst_from_many_servers_converges_on_the_newest() -> None:
    graph = sim.small_world(40, 4, 0.1, random.Random(2))
    burst = sim.run_burst(graph, Params(), size=50, origins="many", seed=3)
    assert burst.messages < burst.naive
    assert burst.final_convergence_ms > 0


def test_links_keep_order() -> None:
    # Jitter of a few ms: without TCP's order a later record would often overtake.
    herd = Herd([[1], [0]], Params(jitter=2.0), seed=1)
    herd.trace_keeps()
    for i in range(200):
        herd.inject(i * 100e-6, 0, [Record(i, 1, 0, 0, i)])  # one client each: no dedupe
    herd.run()
    assert herd.keeps is not None
    assert [update for _, server, update in herd.keeps if server == 1] == list(range(200))


@pytest.mark.parametrize("seed", range(5))
def test_random_regular_is_simple_connected_and_regular(seed: int) -> None:
    graph = sim.random_regular(50, 3, random.Random(seed))
    assert all(len(adj) == 3 and len(set(adj)) == 3 for adj in graph)
    assert all(v not in graph[v] for v in range(50))
    assert all(u in graph[v] for u in range(50) for v in graph[u])
    assert sim.is_connected(graph)


def test_random_regular_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="no simple"):
        sim.random_regular(7, 3, random.Random(0))


@pytest.mark.parametrize("seed", range(5))
def test_small_world_keeps_its_edges_and_is_connected(seed: int) -> None:
    graph = sim.small_world(60, 4, 0.1, random.Random(seed))
    assert sim.edge_count(graph) == 120
    assert all(v not in graph[v] for v in range(60))
    assert all(u in graph[v] for u in range(60) for v in graph[u])
    assert sim.is_connected(graph)
    assert graph != sim.small_world(60, 4, 0.0, random.Random(seed))  # something rewired


def test_diameters() -> None:
    assert sim.diameter(sim.ring(11)) == (5, True)
    assert sim.diameter(sim.ring(5000)) == (2500, True)
    assert sim.diameter(star(9)) == (2, True)
    assert sim.diameter(complete(5)) == (1, True)
    path = sim.from_edges(30, {(i, i + 1) for i in range(29)})
    assert sim.diameter(path, exact_up_to=10) == (29, False)  # the double sweep finds it


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert sim.percentile(values, 50) == 50
    assert sim.percentile(values, 99) == 99
    assert sim.percentile(values, 100) == 100
    assert sim.percentile([3.0], 99) == 3.0


def test_entry_point_prints_the_tables_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sim.main(["--servers", "12", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| ring | 12 | 12 | 2 | 6 | 13 (13) | 1.08 | 2 |" in out
    assert "100 IAMATs in one batch at one server" in out
    result = json.loads((tmp_path / "sim.json").read_text(encoding="utf-8"))
    assert [row["servers"] for row in result["rows"]] == [12, 12, 12]
    assert result["rows"][0]["steady"]["max_on_an_edge"] == 2
