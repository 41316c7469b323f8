"""The admin port and the status command against real server processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from herd_trio.lines import LineReader
from tests.e2e.herd import DEFAULT_EDGES, Herd, connect, poll, running

PLACES_LOAD = 60.0  # seconds: /readyz waits for the offline places index (built on first use)


@pytest.fixture
async def admin_herd(tmp_path: Path) -> AsyncIterator[Herd]:
    """The default herd's five servers with admin ports, all linked."""
    with running(Herd.create(tmp_path).with_admin()) as started:
        await started.start_all()
        yield started


def status(herd: Herd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "herd_trio", "status", "--config", str(herd.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_status_reports_every_server_ready_then_a_stopped_one(admin_herd: Herd) -> None:
    at_line = await admin_herd.iamat("Clark", b"kiwi", b"+34.068930-118.445127", b"1700000000.5")
    for name in admin_herd.names:
        await admin_herd.wait_for(name, b"kiwi", at_line)

    async def all_ready() -> subprocess.CompletedProcess[str] | None:
        done = await trio.to_thread.run_sync(status, admin_herd)
        return done if done.returncode == 0 else None  # the places index may be loading

    result = await poll("every server ready", all_ready, deadline=PLACES_LOAD)
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["SERVER", "UP", "READY", "LINKS", "RECORDS", "CLIENTS", "DIGEST"]
    degree = {n: sum(n in edge for edge in DEFAULT_EDGES) for n in admin_herd.names}
    assert {row[0]: row[1:6] for row in rows[1:]} == {
        n: ["up", "ready", f"{degree[n]}/{degree[n]}", "1", "0"] for n in admin_herd.names
    }
    assert {row[6] for row in rows[1:]} == {"agrees"}
    admin_herd.kill("Jaquez")
    result = await trio.to_thread.run_sync(status, admin_herd)
    assert result.returncode == 1
    jaquez = next(line for line in result.stdout.splitlines() if line.startswith("Jaquez "))
    assert jaquez.split()[1:3] == ["DOWN", "NO"]


async def test_metrics_and_state_of_a_running_server(admin_herd: Herd) -> None:
    await admin_herd.iamat("Bona", b"kiwi", b"+34.068930-118.445127", b"1700000000.5")
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:

        async def clark_has_it() -> dict[str, float] | None:
            text = (await client.get(f"{admin_herd.admin_url('Clark')}/metrics")).text
            samples = {
                f"{s.name}{sorted(s.labels.items())}": s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            return samples if samples["herd_store_records[]"] == 1 else None

        samples = await poll("Clark holds the record", clark_has_it)
        kept = [
            v
            for k, v in samples.items()
            if k.startswith("herd_records_received_total") and "'kept'" in k
        ]
        assert sum(kept) == 1  # from Bona, or (under load) around the ring first
        assert samples["herd_link_up[('peer', 'Jaquez')]"] == 1
        state = (await client.get(f"{admin_herd.admin_url('Clark')}/state")).json()
        assert {link["peer"]: link["up"] for link in state["links"]} == {
            "Bona": True,
            "Jaquez": True,
        }
        assert [s["name"] for s in state["herd"]] == admin_herd.names

        async def ready() -> bool | None:  # the offline places index may still be loading
            answer = await client.get(f"{admin_herd.admin_url('Clark')}/readyz?links=all")
            return True if answer.status_code == 200 else None

        await poll("Clark ready with every link up", ready, deadline=PLACES_LOAD)


def test_a_server_named_status_runs_after_a_double_dash(tmp_path: Path) -> None:
    herd = Herd.create(tmp_path, names=["status", "other"], edges=[("status", "other")])
    command = [sys.executable, "-m", "herd_trio", "status", "--config", str(herd.config)]
    asked = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert "to run the server named 'status', use: python -m herd_trio -- status" in asked.stderr
    assert asked.returncode == 1  # no admin ports: the status command reports, not runs
    server = subprocess.Popen(
        [sys.executable, "-m", "herd_trio", "--config", str(herd.config), "--", "status"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        lines = iter(server.stdout.readline, "")
        assert any(line.startswith("status: clients on 127.0.0.1:") for line in lines)
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=10)
    assert server.returncode == 0, stderr


def cli(herd: Herd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "herd_trio", *args, "--config", str(herd.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_iamat_and_whatsat_commands(herd: Herd) -> None:
    told = await trio.to_thread.run_sync(cli, herd, "iamat", "kiwi", "34.068930", "-118.445127")
    assert told.returncode == 0, told.stderr
    assert told.stdout.startswith("AT Bailey ")  # the config's first server
    assert " kiwi +34.068930-118.445127 " in told.stdout
    asked = await trio.to_thread.run_sync(
        cli, herd, "whatsat", "kiwi", "10", "2", "--server", "Clark"
    )
    assert asked.returncode == 0, asked.stderr
    head, _, body = asked.stdout.partition("\n")
    assert head == told.stdout.strip()
    assert json.loads(body)["status"] in ("OK", "ZERO_RESULTS")
    unknown = await trio.to_thread.run_sync(cli, herd, "whatsat", "nobody", "10", "2")
    assert (unknown.returncode, unknown.stdout.startswith("? WHATSAT nobody")) == (1, True)
    bad = await trio.to_thread.run_sync(cli, herd, "iamat", "kiwi", "north", "west")
    assert bad.returncode == 2
    assert "expected decimal degrees" in bad.stderr


async def test_an_events_reader_that_never_reads_does_not_delay_the_stop(tmp_path: Path) -> None:
    """SIGTERM stops the server within PROTOCOL.md's 3 s though an /events write waits.

    hypercorn's writes have no deadline; the admin listener shuts its connections down
    when it stops, so a reader with a full socket cannot hold the process.
    """
    herd = Herd.create(tmp_path, names=["Solo"], edges=[]).with_admin()
    with running(herd):
        herd.start("Solo")
        await (await connect(herd.ports["Solo"])).aclose()
        port = herd.admin_ports["Solo"]
        # The admin port opens after the client port: wait until it accepts too.
        await (await connect(port)).aclose()
        with trio.socket.socket() as reader:  # closed also if a step fails
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up sooner
            await reader.connect(("127.0.0.1", port))
            await reader.send(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
            # Records with 250-byte client ids: each kept one is a ~330-byte event, and
            # 30,000 of them (10 MB) are more than loopback's socket buffers hold.
            stream = await connect(herd.ports["Solo"])
            pad, count = b"x" * 245, 30_000
            batch = b"".join(b"IAMAT %s%d +1+1 1700000000\n" % (pad, n) for n in range(count))
            replies = LineReader(stream, 1 << 20)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, batch)
                with trio.fail_after(60):
                    for _ in range(count):  # every IAMAT answered: every event was published
                        reply = await replies.receive_line() or b""
                        assert reply.startswith(b"AT Solo "), reply[:60] + reply[-60:]
            await stream.aclose()
            start = time.monotonic()
            status = await trio.to_thread.run_sync(herd.kill, "Solo", signal.SIGTERM)
            took = time.monotonic() - start
    assert (status, took < 3.0) == (0, True), took
