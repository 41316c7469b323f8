"""Fault scenarios against real server processes: crashes, partitions, pauses, floods.

Every scenario ends with the checker (tests/e2e/checker.py): every acknowledged IAMAT
must be held, or superseded by a newer record, by every live server connected to its
origin; lost must be 0. The measured figures (convergence times, memory) are printed
(`pytest -s`) and written as JSON: to `bench-results/faults.json` when
HERD_FAULTS_REPORT is set (or to the path it names, if it ends in `.json`), else to
`faults.json` in pytest's base temporary directory.

Settings are small so faults show quickly: heartbeat_interval 0.2 s (a link silent
for 0.6 s is dead), sync_interval 0.5 s, write_deadline 2 s.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from herd_trio.links import BACKOFF, HANDSHAKE_DEADLINE
from herd_trio.protocol import parse_at
from tests.e2e.checker import (
    Checker,
    Figures,
    Updater,
    Verdict,
    durable_lines,
    paced_load,
    rss_kib,
    stamp,
    start_proxied,
    wait_log_line,
)
from tests.e2e.herd import DEFAULT_NAMES, Herd, Session, poll, running
from tests.faultproxy import BLACKHOLE, PASS, FaultProxy, open_fault_proxy

SYNC_INTERVAL = 0.5
WRITE_DEADLINE = 2.0
HEARTBEAT = 0.2  # Herd.write_config sets heartbeat_interval = 0.2
SLACK = 0.25  # seconds of scheduling slack on a loaded two-core machine
REPO = Path(__file__).resolve().parents[2]


def make_herd(
    root: Path,
    names: list[str] | None = None,
    edges: list[tuple[str, str]] | None = None,
    *,
    state_dir: str | None = None,
) -> Herd:
    """A herd config with the small intervals these scenarios use."""
    if state_dir is not None:
        return Herd.create(
            root,
            names,
            edges,
            sync_interval=SYNC_INTERVAL,
            write_deadline=WRITE_DEADLINE,
            state_dir=state_dir,
        )
    return Herd.create(
        root, names, edges, sync_interval=SYNC_INTERVAL, write_deadline=WRITE_DEADLINE
    )


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Figures]:
    """The figures of this module's scenarios, written out when the module is done."""
    collected = Figures()
    yield collected
    target = os.environ.get("HERD_FAULTS_REPORT", "")
    if target.endswith(".json"):
        path = Path(target)
    elif target:
        path = REPO / "bench-results" / "faults.json"
    else:
        path = tmp_path_factory.getbasetemp() / "faults.json"
    if collected.scenarios:
        collected.write(path)
        print(f"\nFAULTS figures written to {path}")


def assert_nothing_lost(verdict: Verdict) -> None:
    """The checker's verdict after a scenario: converged, nothing lost, identical."""
    assert verdict.lost == [], f"lost {len(verdict.lost)}: {verdict.lost[:10]}"
    assert verdict.divergent == [], f"divergent: {verdict.divergent[:10]}"
    assert verdict.converged


async def test_restarted_server_answers_every_update_within_1s_of_link_up(
    tmp_path: Path, figures: Figures
) -> None:
    """(1) Kill Bona, send 200 updates to the others, restart it: within 1 s of its
    first link coming up it answers WHATSAT for all 200 (reconciliation, no state_dir)."""
    with running(make_herd(tmp_path)) as herd:
        await herd.start_all()
        checker = Checker()
        herd.kill("Bona")
        others = [name for name in DEFAULT_NAMES if name != "Bona"]
        clients = [b"restart%03d" % i for i in range(200)]
        updater = Updater(herd, checker)
        try:
            for i, name in enumerate(others):
                await updater.send(name, clients[i :: len(others)])
        finally:
            await updater.aclose()
        assert_nothing_lost(await checker.converge(herd))  # the survivors stay connected

        started = time.time()
        herd.start("Bona")
        line = await wait_log_line(herd, "Bona", r" link (to|from) \S+ up", after=started)
        seen_wall = time.time()  # the log reaches the file within 0.25 s of the event
        verdict = await checker.converge(herd, ["Bona"], deadline=1.0)
        done_wall = time.time()
        figures.add(
            "restart_catch_up",
            updates=len(clients),
            start_to_link_up_s=stamp(line) - started,
            link_up_logged_to_all_answered_s=verdict.elapsed,
            link_up_to_all_answered_s=done_wall - stamp(line),
            log_latency_s=seen_wall - stamp(line),
            probe_rounds=verdict.rounds,
            stale_probes=verdict.stale,
        )
        assert verdict.converged, f"after 1 s Bona still lacks {len(verdict.lost)} records"
        assert verdict.elapsed <= 1.0
        assert_nothing_lost(await checker.converge(herd))


async def start_and_fill(herd: Herd, checker: Checker, clients: list[bytes]) -> None:
    """Start the herd and give it one update per client, dealt over its servers."""
    await herd.start_all()
    updater = Updater(herd, checker)
    try:
        for i, name in enumerate(DEFAULT_NAMES):
            await updater.send(name, clients[i :: len(DEFAULT_NAMES)])
    finally:
        await updater.aclose()


async def test_whole_herd_restart_with_state_dir_loses_nothing(
    tmp_path: Path, figures: Figures
) -> None:
    """(7) With state_dir, stop the whole herd (SIGTERM) and start it again: every
    acknowledged record is back at every server, each from its own file."""
    checker = Checker()
    clients = [b"durable%03d" % i for i in range(300)]
    with running(make_herd(tmp_path, state_dir="state")) as herd:
        await start_and_fill(herd, checker, clients)
        assert_nothing_lost(await checker.converge(herd))
        herd.stop_all()
        stopped = trio.current_time()
        await herd.start_all()
        restarted = trio.current_time() - stopped
        for name in DEFAULT_NAMES:
            await herd.wait_logged(name, f"{len(clients)} records loaded from")
        verdict = await checker.converge(herd, deadline=10.0)
        figures.add(
            "whole_herd_restart_state_dir",
            records=len(clients),
            restart_to_linked_s=restarted,
            converged_after_restart_s=verdict.elapsed,
            lost=len(verdict.lost),
        )
        assert_nothing_lost(verdict)


async def test_whole_herd_crash_with_state_dir_loses_nothing_committed(
    tmp_path: Path, figures: Figures
) -> None:
    """(7) With state_dir, SIGKILL the whole herd once every record is written (the
    crash window, measured): the files bring every record back."""
    checker = Checker()
    clients = [b"crash%03d" % i for i in range(300)]
    with running(make_herd(tmp_path, state_dir="state")) as herd:
        await start_and_fill(herd, checker, clients)
        acked = trio.current_time()

        async def committed() -> bool | None:
            await trio.lowlevel.checkpoint()
            for name in DEFAULT_NAMES:
                held = durable_lines(herd.root / "state" / f"{name}.records")
                for client, record in checker.newest.items():
                    line = held.get(client)
                    if line is None or parse_at(line).rank < record.rank:
                        return None
            return True

        await poll("every record written at every server", committed, deadline=10)
        durable_after = trio.current_time() - acked
        for name in DEFAULT_NAMES:
            herd.kill(name)
        await herd.start_all()
        verdict = await checker.converge(herd, deadline=10.0)
        figures.add(
            "whole_herd_crash_state_dir",
            records=len(clients),
            last_ack_to_committed_everywhere_s=durable_after,
            converged_after_restart_s=verdict.elapsed,
            lost=len(verdict.lost),
        )
        assert_nothing_lost(verdict)


@asynccontextmanager
async def proxied_herd(
    root: Path, names: list[str], edges: list[tuple[str, str]], cut: list[tuple[str, str]]
) -> AsyncIterator[tuple[Herd, dict[tuple[str, str], FaultProxy]]]:
    """A started, linked herd whose `cut` edges run through fault proxies.

    Of each pair the name that sorts first dials (links.py), so the dialler gets its
    own config in which the other's peer_port is the proxy's port; every other process
    uses the real config. Servers stop before the proxies do.
    """
    async with AsyncExitStack() as stack:
        herd = stack.enter_context(running(make_herd(root, names, edges)))
        proxies: dict[tuple[str, str], FaultProxy] = {}
        redirect: dict[str, dict[str, int]] = {}
        for a, b in cut:
            dialler, target = sorted((a, b))
            proxy = await stack.enter_async_context(open_fault_proxy(herd.peer_ports[target]))
            proxies[a, b] = proxy
            redirect.setdefault(dialler, {})[target] = proxy.port
        for name in names:
            if name in redirect:
                start_proxied(herd, name, redirect[name])
            else:
                herd.start(name)
        await herd.wait_linked()
        yield herd, proxies


async def updates_across(updater: Updater, names: list[str], clients: list[bytes]) -> None:
    """One update per client, the clients dealt round-robin over `names`."""
    for i, name in enumerate(names):
        await updater.send(name, clients[i :: len(names)])


class SlowHeal(AssertionError):
    """Converged, nothing lost, but later than the scenario's bound."""


@pytest.mark.slow
async def test_partition_heals_to_identical_stores_within_2s(
    tmp_path: Path, figures: Figures
) -> None:
    """(2) Partition {A,B} from {C,D,E} through the proxy on their one cross link, update
    on both sides, heal: all five hold identical stores within 2 s.

    The heal is timed at the worst moment the product allows: just after the dialler's
    retry entered the blackhole (the proxy accepted it, the handshake will never answer).
    """
    names = ["A", "B", "C", "D", "E"]
    edges = [("A", "B"), ("B", "C"), ("C", "D"), ("D", "E"), ("C", "E")]
    left, right = ["A", "B"], ["C", "D", "E"]
    async with proxied_herd(tmp_path, names, edges, [("B", "C")]) as (herd, proxies):
        proxy = proxies["B", "C"]
        checker = Checker()
        clients = [b"part%03d" % i for i in range(200)]
        updater = Updater(herd, checker)
        try:
            await updates_across(updater, names, clients)
        finally:
            await updater.aclose()
        assert_nothing_lost(await checker.converge(herd))
        before = {client: record.at_line for client, record in checker.newest.items()}

        cut_at = time.time()
        proxy.mode = BLACKHOLE
        dropped = [
            stamp(await wait_log_line(herd, "B", " link to C dropped", after=cut_at)) - cut_at,
            stamp(await wait_log_line(herd, "C", " link from B dropped", after=cut_at)) - cut_at,
        ]
        # Both sides write. 0-49: left only; 50-99: right last; 100-149: left last;
        # 150-199: right only. Neither side simply wins.
        sides = {"left": Checker(), "right": Checker()}
        plan = [("left", clients[:150]), ("right", clients[50:]), ("left", clients[100:150])]
        for side, share in plan:
            side_updater = Updater(herd, sides[side])
            try:
                await updates_across(side_updater, left if side == "left" else right, share)
            finally:
                await side_updater.aclose()
        for side, members in (("left", left), ("right", right)):
            assert_nothing_lost(await sides[side].converge(herd, members, alive=members))
        # The partition held: each side still has the other side's clients as they were.
        held = await checker.probe_all(herd, names, [clients[0], clients[-1]])
        for name in left:
            assert held[name][clients[-1]] == before[clients[-1]], name
        for name in right:
            assert held[name][clients[0]] == before[clients[0]], name
        for side_checker in sides.values():
            checker.merge(side_checker)

        accepted = proxy.statistics().accepted
        with trio.fail_after(10):  # B redials every HANDSHAKE_DEADLINE + backoff
            await proxy.wait_for(lambda stats: stats.accepted > accepted)
        healed_at = time.time()
        proxy.mode = PASS
        verdict = await checker.converge(herd, deadline=10.0)
        relinked = stamp(await wait_log_line(herd, "B", " link to C up", after=healed_at))
        figures.add(
            "partition_heal",
            clients=len(clients),
            acknowledged=checker.acks,
            dead_link_logged_after_s=max(dropped),
            heal_to_relinked_s=relinked - healed_at,
            heal_to_identical_s=verdict.elapsed,
            probe_rounds=verdict.rounds,
            stale_probes=verdict.stale,
            lost=len(verdict.lost),
        )
        assert_nothing_lost(verdict)
        assert max(dropped) <= 3 * HEARTBEAT + SLACK
    if verdict.elapsed > 2.0:  # outside the proxy's nursery: not wrapped in a group
        raise SlowHeal(f"identical only {verdict.elapsed:.2f} s after the heal")


async def test_blackholed_link_is_declared_dead_within_3_heartbeats_and_resyncs(
    tmp_path: Path, figures: Figures
) -> None:
    """(3) Blackhole the A-B link while updates stream over it: both ends declare it
    dead within 3 heartbeats of silence, and after the heal B and C resync."""
    names, edges = ["A", "B", "C"], [("A", "B"), ("B", "C")]
    async with proxied_herd(tmp_path, names, edges, [("A", "B")]) as (herd, proxies):
        proxy = proxies["A", "B"]
        checker = Checker()
        clients = [b"stream%03d" % i for i in range(200)]
        updater = Updater(herd, checker)
        stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(paced_load, updater, ["A"], clients, rate=500, seconds=8, stop=stop)
                )
                with trio.fail_after(10):  # the stream is flowing through the proxy
                    await proxy.wait_for(lambda stats: stats.bytes_to_target > 20_000)
                cut_at = time.time()
                proxy.mode = BLACKHOLE
                dropped = {
                    "A": await wait_log_line(herd, "A", " link to B dropped", after=cut_at),
                    "B": await wait_log_line(herd, "B", " link from A dropped", after=cut_at),
                }
                sent = updater.sent

                async def more_sent() -> bool | None:
                    await trio.lowlevel.checkpoint()
                    return True if updater.sent >= sent + 250 else None

                await poll("the stream carries on into the blackhole", more_sent)
                stop.set()
        finally:
            await updater.aclose()
        assert proxy.statistics().bytes_dropped > 0  # the blackhole ate the stream
        healed_at = time.time()
        proxy.mode = PASS
        verdict = await checker.converge(herd, deadline=10.0)
        relinked = stamp(await wait_log_line(herd, "A", " link to B up", after=healed_at))
        detected = {name: stamp(line) - cut_at for name, line in dropped.items()}
        figures.add(
            "blackhole_mid_stream",
            updates=checker.acks,
            update_rate=500,
            dead_declared_by_A_s=detected["A"],
            dead_declared_by_B_s=detected["B"],
            heal_to_relinked_s=relinked - healed_at,
            heal_to_resynced_s=verdict.elapsed,
            stale_probes=verdict.stale,
            lost=len(verdict.lost),
        )
        assert_nothing_lost(verdict)
        for name, seconds in detected.items():
            assert seconds <= 3 * HEARTBEAT + SLACK, f"{name} took {seconds:.3f} s"
        # A dial made into the blackhole waits out the handshake deadline first.
        assert verdict.elapsed <= HANDSHAKE_DEADLINE + BACKOFF.cap + 1.0


@pytest.mark.slow
async def test_sigstopped_neighbour_under_load_hurts_no_one(
    tmp_path: Path, figures: Figures
) -> None:
    """(4) SIGSTOP Bona (three neighbours) for 10 s under 500 updates/s to the others:
    propagation among the others is unaffected, the neighbours' memory stays flat, and
    the herd converges within 2 s of SIGCONT."""
    with running(make_herd(tmp_path)) as herd:
        await herd.start_all()
        checker = Checker()
        clients = [b"load%03d" % i for i in range(500)]  # a bounded client set: flat memory
        others = [name for name in DEFAULT_NAMES if name != "Bona"]
        neighbours = ["Bailey", "Campbell", "Clark"]
        pids = {name: herd.processes[name].pid for name in neighbours}
        bona = herd.processes["Bona"]
        updater, marker = Updater(herd, checker), Updater(herd, checker)
        watcher = await herd.session("Bailey")
        latencies: dict[str, list[float]] = {"before": [], "during": []}
        rss: dict[str, dict[str, list[int]]] = {phase: {n: [] for n in pids} for phase in latencies}
        phase = "before"

        async def propagation() -> None:
            """Every 0.2 s, an update at Clark, timed until Bailey (far side) has it;
            and the neighbours' resident memory."""
            for _ in range(200):
                await marker.send("Clark", [b"marker"])
                line = checker.newest[b"marker"].at_line
                sent = trio.current_time()
                with trio.fail_after(5):
                    for _ in range(2000):  # bounded in count and time
                        reply = await watcher.whatsat(b"WHATSAT marker 1 0")
                        if reply.split(b"\n", 1)[0] == line:
                            break
                        await trio.sleep(0.002)
                    else:
                        raise AssertionError(f"Bailey never got {line!r}")
                latencies[phase].append(trio.current_time() - sent)
                for name, pid in pids.items():
                    rss[phase][name].append(rss_kib(pid))
                await trio.sleep(0.2)

        async with watcher.stream:
            try:
                # Warm up to the load's steady state (stores full, buffers grown).
                await paced_load(updater, others, clients, rate=500, seconds=2)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(propagation)
                    await paced_load(updater, others, clients, rate=500, seconds=2)
                    phase = "during"
                    stopped_wall, stopped = time.time(), trio.current_time()
                    bona.send_signal(signal.SIGSTOP)
                    try:
                        sent = await paced_load(updater, others, clients, rate=500, seconds=10)
                        loaded_for = trio.current_time() - stopped
                        # Propagation among the others went on: they agree already.
                        others_verdict = await checker.converge(
                            herd, others, alive=others, deadline=5
                        )
                        dropped = [
                            await wait_log_line(herd, name, " link (to|from) Bona dropped")
                            for name in neighbours
                        ]
                    finally:
                        resumed, resumed_wall = trio.current_time(), time.time()
                        bona.send_signal(signal.SIGCONT)
                    nursery.cancel_scope.cancel()
            finally:
                bona.send_signal(signal.SIGCONT)  # whatever happened above
                await updater.aclose()
                await marker.aclose()
        verdict = await checker.converge(herd, deadline=15.0)
        sigcont_to_converged = trio.current_time() - resumed
        relinked = await wait_log_line(herd, "Bona", r" link (to|from) \S+ up", after=resumed_wall)
        after = {name: rss_kib(pid) for name, pid in pids.items()}
        before_peak = {name: max(samples) for name, samples in rss["before"].items()}
        during_peak = {name: max(samples) for name, samples in rss["during"].items()}
        growth = {name: (during_peak[name] - before_peak[name]) / 1024 for name in pids}
        before_s, during_s = sorted(latencies["before"]), sorted(latencies["during"])

        def mib(values: dict[str, int]) -> dict[str, float]:
            return {name: round(value / 1024, 1) for name, value in values.items()}

        figures.add(
            "sigstop_neighbour",
            stopped_s=resumed - stopped,
            updates_during_stop=sent,
            achieved_rate=sent / loaded_for,
            neighbours_dropped_bona_after_s=max(stamp(line) for line in dropped) - stopped_wall,
            propagation_samples_before=len(before_s),
            propagation_before_median_s=before_s[len(before_s) // 2],
            propagation_before_max_s=before_s[-1],
            propagation_samples_during=len(during_s),
            propagation_during_median_s=during_s[len(during_s) // 2],
            propagation_during_max_s=during_s[-1],
            others_identical_after_load_s=others_verdict.elapsed,
            rss_before_mib=mib(before_peak),
            rss_peak_during_mib=mib(during_peak),
            rss_after_mib=mib(after),
            rss_growth_mib={name: round(value, 2) for name, value in growth.items()},
            sigcont_to_bona_relinked_s=stamp(relinked) - resumed_wall,
            sigcont_to_converged_s=sigcont_to_converged,
            stale_probes=verdict.stale,
            lost=len(verdict.lost),
        )
        assert_nothing_lost(others_verdict)
        assert_nothing_lost(verdict)
        assert during_s[-1] <= 0.5, during_s  # a few ms normally; no 0.6 s silence, no 2 s stall
        assert max(growth.values()) <= 16, growth  # MiB
        assert sigcont_to_converged <= 2.0


def latency_figures(samples: list[float]) -> dict[str, float]:
    """Median, 99th percentile and maximum of `samples` (seconds)."""
    ordered = sorted(samples)
    return {
        "median_s": ordered[len(ordered) // 2],
        "p99_s": ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)],
        "max_s": ordered[-1],
    }


async def timed_whatsats(
    session: Session, request: bytes, until: trio.Event, *, limit: int = 5000
) -> list[float]:
    """Send `request` again and again (at most `limit` times) until `until` is set; the
    latency of each reply."""
    latencies: list[float] = []
    while not until.is_set() and len(latencies) < limit:
        asked = trio.current_time()
        reply = await session.whatsat(request)
        assert reply.startswith(b"AT "), reply
        latencies.append(trio.current_time() - asked)
    return latencies


async def test_one_client_flooding_10000_iamats_does_not_starve_another(
    tmp_path: Path, figures: Figures
) -> None:
    """(5) One connection sends 10 000 IAMATs as fast as it can (pipelined); meanwhile
    another client's WHATSATs at the same server keep being answered quickly."""
    names, edges = ["A", "B", "C"], [("A", "B"), ("B", "C")]
    with running(make_herd(tmp_path, names, edges)) as herd:
        await herd.start_all()
        checker = Checker()
        updater = Updater(herd, checker)
        flood = [b"flood%03d" % (i % 1000) for i in range(10_000)]
        done = trio.Event()
        timing: dict[str, float] = {}
        session = await herd.session("A")
        async with session.stream:
            try:
                await updater.send("A", [b"quiet"])
                request = b"WHATSAT quiet 10 5"
                await session.whatsat(request)  # the first one may wait for the places index
                idle = await timed_whatsats(session, request, trio.Event(), limit=20)
                async with trio.open_nursery() as nursery:

                    async def flooder() -> None:
                        started = trio.current_time()
                        await updater.send("A", flood, deadline=60)
                        timing["flood"] = trio.current_time() - started
                        done.set()

                    nursery.start_soon(flooder)
                    busy = await timed_whatsats(session, request, done)
            finally:
                await updater.aclose()
        verdict = await checker.converge(herd)
        figures.add(
            "single_client_flood",
            iamats=len(flood),
            flood_seconds=timing["flood"],
            iamats_per_s=len(flood) / timing["flood"],
            whatsats_during_flood=len(busy),
            whatsat_idle=latency_figures(idle),
            whatsat_during_flood=latency_figures(busy),
            converged_after_flood_s=verdict.elapsed,
            lost=len(verdict.lost),
        )
        assert_nothing_lost(verdict)
        assert len(busy) >= 2  # at least one answered while the flood was still going
        assert max(busy) <= 1.0, latency_figures(busy)


@contextmanager
def fd_limit_raised() -> Iterator[int]:
    """This process's soft RLIMIT_NOFILE raised to the hard limit; restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_2000_idle_connections_beside_normal_traffic(
    tmp_path: Path, figures: Figures
) -> None:
    """(6) 2 000 idle client connections held open at one server while normal traffic
    flows: updates and WHATSATs stay quick, and every idle connection is still served."""
    idle_count = 2000
    names, edges = ["A", "B", "C"], [("A", "B"), ("B", "C")]
    with (
        fd_limit_raised() as limit,
        running(make_herd(tmp_path, names, edges)) as herd,
    ):
        assert limit >= idle_count + 200, f"hard RLIMIT_NOFILE {limit} is too low"
        await herd.start_all()
        checker = Checker()
        pid = herd.processes["A"].pid
        rss_before = rss_kib(pid)
        streams: list[trio.SocketStream] = []
        limiter = trio.CapacityLimiter(64)

        async def open_one() -> None:
            async with limiter:
                with trio.fail_after(10):
                    streams.append(await trio.open_tcp_stream("127.0.0.1", herd.ports["A"]))

        updater = Updater(herd, checker)
        mark = len(herd.log("A").read_text())
        try:
            opened = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(idle_count):
                    nursery.start_soon(open_one)
            open_seconds = trio.current_time() - opened

            async def all_admitted() -> bool | None:
                await trio.lowlevel.checkpoint()
                admitted = herd.log("A").read_text()[mark:].count(" connected\n")
                return True if admitted >= idle_count else None

            await poll(f"A admitted all {idle_count} connections", all_admitted)
            rss_held = rss_kib(pid)

            # Normal traffic beside them.
            clients = [b"normal%03d" % i for i in range(300)]
            sent = trio.current_time()
            for round_ in range(3):
                await updates_across(updater, names[round_:] + names[:round_], clients)
            update_seconds = trio.current_time() - sent
            session = await herd.session("A")
            async with session.stream:
                await session.whatsat(b"WHATSAT normal000 10 5")  # may load the places index
                busy = await timed_whatsats(
                    session, b"WHATSAT normal000 10 5", trio.Event(), limit=50
                )

            # Every idle connection is still open and served.
            replies: list[bytes] = []

            async def use_one(index: int, stream: trio.SocketStream) -> None:
                async with limiter:
                    with trio.fail_after(10):
                        await stream.send_all(Checker.next_update(b"idle%04d" % index) + b"\n")
                        data = b""
                        while not data.endswith(b"\n"):
                            chunk = await stream.receive_some()
                            assert chunk, f"idle connection {index} was closed"
                            data += chunk
                        replies.append(data)

            async with trio.open_nursery() as nursery:
                for index, stream in enumerate(streams):
                    nursery.start_soon(use_one, index, stream)
            for reply in replies:
                checker.ack(reply)
        finally:
            await updater.aclose()
            for stream in streams:
                await stream.aclose()
        verdict = await checker.converge(herd)
        figures.add(
            "idle_connections",
            idle=idle_count,
            open_seconds=open_seconds,
            rss_before_mib=round(rss_before / 1024, 1),
            rss_with_idle_mib=round(rss_held / 1024, 1),
            kib_per_idle_connection=round((rss_held - rss_before) / idle_count, 1),
            updates=len(clients) * 3,
            updates_per_s=len(clients) * 3 / update_seconds,
            whatsat_with_idle=latency_figures(busy),
            idle_connections_served=len(replies),
            converged_s=verdict.elapsed,
            lost=len(verdict.lost),
        )
        assert len(replies) == idle_count
        assert " refused: " not in herd.log("A").read_text()
        assert_nothing_lost(verdict)
        assert max(busy) <= 1.0, latency_figures(busy)


async def test_the_checker_reports_real_loss(tmp_path: Path, figures: Figures) -> None:
    """(8) The checker has teeth: a herd without state_dir that restarts whole has lost
    every record, and an acknowledgement no server holds is lost too; both are reported
    (with their stale probes), not passed."""
    names, edges = ["A", "B"], [("A", "B")]
    with running(make_herd(tmp_path, names, edges)) as herd:
        await herd.start_all()
        checker = Checker()
        clients = [b"gone%02d" % i for i in range(20)]
        updater = Updater(herd, checker)
        try:
            await updates_across(updater, names, clients)
        finally:
            await updater.aclose()
        assert_nothing_lost(await checker.converge(herd))
        # An acknowledgement that no server ever gave (newer than anything held).
        checker.ack(b"AT A +0.000000000 %s +1+1 1800000000" % clients[0])
        verdict = await checker.converge(herd, deadline=0.5)
        assert not verdict.converged
        assert sorted(verdict.lost) == [(name, clients[0]) for name in names]
        assert verdict.stale >= 2 * verdict.rounds
        for name in names:
            herd.kill(name)
        await herd.start_all()
        restarted = await checker.converge(herd, deadline=0.5)
        figures.add(
            "checker_self_test",
            lost_forged=len(verdict.lost),
            lost_after_whole_restart_without_state=len(restarted.lost),
        )
        assert sorted(restarted.lost) == sorted((n, c) for n in names for c in clients)
