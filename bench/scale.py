"""`python -m bench.scale [--records N] [--out DIR] [--write-docs] [--quick]`; `nox -s scale`.

A million clients on two real `python -m herd_trio` processes (A and B, one link, both
with `state_dir` and an admin port) on 127.0.0.1, measured only from outside (TCP, the
admin port's /state and /readyz, files, `ss` byte counts of the link's socket), so it
holds whatever the sync implementation is:

1. ingest: N IAMATs for new clients into A alone, pipelined from 4 connections
   (bench.loadgen); rate, RSS per record, state file size, log bytes per update;
2. join: B starts empty and catches up from A; time, records and bytes sent on the link,
   and the IAMAT latency a probe connection sees on A meanwhile;
3. restart: A (B stopped) is restarted; time until its client port accepts, until a
   sample of clients spread over the store is answered with the stored AT line, until
   /readyz says ready; its peak RSS;
4. catch-up: with B stopped, A takes D updates; B restarts; time until B holds them,
   records and bytes sent each way, probe latency on A;
5. the simulation's summary (bench.sim --quick).

Writes DIR/scale.json and DIR/scale.md (DIR defaults to bench-results/); with
`--write-docs`, replaces the marked section of docs/scale.md. Every wait polls under a
deadline; every process started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from bench import procs
from bench.loadgen import COORDS, connect, iamat_time, rss_kb, summarize
from bench.procs import HOST, ROOT, Proc
from bench.scale_report import markdown, write_docs
from herd_trio.statefile import read_all

Result = dict[str, Any]

SAMPLES = 1000  # clients spread over the store whose answers a restart must get right
ANSWER_CONNECTIONS = 20  # connections asking for them at once
PROBE_GAP = 0.002  # seconds between two probe IAMATs (one connection, one at a time)


def write_config(root: Path, ports: dict[str, int]) -> Path:
    """A and B, with one link (A dials B), state files and admin ports."""
    lines = [
        "[herd]",
        'log_dir = "logs"',
        'state_dir = "state"',
        'places = "offline"',
        "heartbeat_interval = 1.0",
    ]
    for name, neighbours in (("A", '["B"]'), ("B", "[]")):
        lines += [
            "",
            f"[servers.{name}]",
            f"port = {ports[name]}",
            f"peer_port = {ports[f'{name}_peer']}",
            f"admin_port = {ports[f'{name}_admin']}",
            f"neighbours = {neighbours}",
        ]
    path = root / "herd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def get_json(port: int, path: str) -> Result | None:
    """GET an admin path as JSON; None if the server does not answer (yet)."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as reply:
            body: Result = json.loads(reply.read())
            return body
    except (OSError, ValueError):
        return None


def wait_until(what: str, check: Callable[[], Any], deadline: float, step: float = 0.05) -> Any:  # noqa: ANN401
    """Poll `check` until it returns something truthy; TimeoutError after `deadline` s."""
    end = time.perf_counter() + deadline
    while time.perf_counter() < end:
        if value := check():
            return value
        time.sleep(step)
    raise TimeoutError(f"not within {deadline:g} s: {what}")


def records_of(port: int) -> int:
    """How many records a server's /state reports (-1 if it does not answer)."""
    state = get_json(port, "/state")
    return int(state["records"]) if state else -1


def records_out(port: int) -> int:
    """Records this server has sent on its links in all (from /state)."""
    state = get_json(port, "/state")
    return sum(int(link["records_out"]) for link in state["links"]) if state else 0


def link_bytes(peer_port: int) -> tuple[int | None, int | None]:
    """(bytes sent, bytes received) by the server side of the link accepted on `peer_port`,
    from the kernel's counters (`ss -ti`); (0, 0) if there is no such connection, and
    (None, None) without `ss` (iproute2)."""
    if shutil.which("ss") is None:
        return None, None
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{peer_port} )"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout
    sent = sum(int(x) for x in re.findall(r"bytes_acked:(\d+)", out))
    received = sum(int(x) for x in re.findall(r"bytes_received:(\d+)", out))
    return sent, received


def log_bytes(root: Path, name: str) -> int:
    """Bytes in server `name`'s log and its rotated copies."""
    return sum(p.stat().st_size for p in (root / "logs").glob(f"{name}.log*"))


def state_lines(root: Path, name: str) -> int:
    """Record lines in server `name`'s state file now (a read-only look beside the
    server's appends). A server that only ever received new clients, as B joining
    empty, holds one line per client."""
    path = root / "state" / f"{name}.records"
    try:
        with path.open("rb") as file:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
    except FileNotFoundError:
        return 0
    return max(0, lines - 1)  # the header


def state_bytes(root: Path, name: str) -> int:
    """Bytes of server `name`'s state file (and of a compaction's file, while one runs)."""
    return sum(p.stat().st_size for p in (root / "state").glob(f"{name}.records*"))


class Probe:
    """One connection sending the same IAMAT again and again, one at a time, every
    PROBE_GAP s: the latency a client of a busy server sees. Bounded by `limit` seconds.

    The same line each time: after the first, each is a repeat, answered from the store
    and not flooded (the full IAMAT path otherwise: parse, offer, reply). New updates
    every 2 ms would keep the link busy, and a link with records in flight postpones
    its next anti-entropy round (linkwriter.Timers), so the probe would hold up the
    very sync it measures.
    """

    def __init__(self, port: int, client: bytes, limit: float) -> None:
        self.port, self.client, self.limit = port, client, limit
        self.samples: list[int] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        end = time.perf_counter() + self.limit
        line = b"IAMAT %s %s %s\n" % (self.client, COORDS, iamat_time())
        with connect(self.port, timeout=10) as sock:
            buffer = b""
            while not self._stop.is_set() and time.perf_counter() < end:
                began = time.perf_counter_ns()
                sock.sendall(line)
                while b"\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                reply, _, buffer = buffer.partition(b"\n")
                self.samples.append(time.perf_counter_ns() - began)
                if not reply.startswith(b"AT "):
                    self.errors += 1
                self._stop.wait(PROBE_GAP)

    def summary(self) -> Result:
        """Latency percentiles in ms, and how many replies were not AT lines."""
        s = summarize(self.samples)
        return {
            "n": s["n"],
            "p50_ms": s.get("p50_us", 0) / 1000,
            "p99_ms": s.get("p99_us", 0) / 1000,
            "max_ms": s.get("max_us", 0) / 1000,
            "errors": self.errors,
        }


class Scale:
    """The servers of one run and what was measured."""

    def __init__(self, root: Path, records: int, missed: int) -> None:
        self.root, self.n, self.missed = root, records, missed
        ports = procs.free_ports(6)
        self.ports = dict(
            zip(["A", "B", "A_peer", "B_peer", "A_admin", "B_admin"], ports, strict=True)
        )
        self.config = write_config(root, self.ports)
        self.procs: dict[str, Proc] = {}
        self.result: Result = {"records": records, "missed_updates": missed}
        self.empty_rss_kb = 0  # A's RSS before the ingest (set by ingest)

    def start(self, name: str) -> Proc:
        argv = [sys.executable, "-m", "herd_trio", name, "--config", str(self.config)]
        proc = procs.launch(name, self.ports[name], argv, self.root)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        procs.stop([self.procs.pop(name)], deadline=30)

    def stop_all(self) -> None:
        procs.stop(self.procs.values(), deadline=30)
        self.procs.clear()

    def admin(self, name: str) -> int:
        return self.ports[f"{name}_admin"]

    def ready(self, name: str) -> bool:
        body = get_json(self.admin(name), "/readyz")
        return bool(body and body.get("ready"))

    def ingest(self) -> None:
        """N new clients into A alone, pipelined from 4 connections."""
        a = self.start("A")
        procs.wait_accepting(a, deadline=60)
        wait_until("A ready", lambda: self.ready("A"), 120)
        rss0, logs0 = rss_kb(a.pid), log_bytes(self.root, "A")
        self.empty_rss_kb = rss0
        duration = max(60.0, self.n / 2000)
        spec = {
            "mode": "throughput",
            "port": self.ports["A"],
            "conns": 4,
            "depth": 64,
            "warmup": 0,
            "duration": duration,
            "max_requests": self.n,
            "prefix": "scale",
            "pids": [a.pid],
        }
        load = procs.loadgen(spec, timeout=duration + 120)
        held = records_of(self.admin("A"))
        # Every record on disk: the persister writes in batches behind the ingest.
        procs.settle([a.pid], timeout=120)
        rss = rss_kb(a.pid)
        self.result["ingest"] = {
            "records": held,
            "seconds": load["seconds"],
            "rate": load["rps"],
            "errors": load["errors"],
            "rss_mb": rss / 1024,
            "rss_bytes_per_record": rss * 1024 / held,
            "rss_growth_bytes_per_record": (rss - rss0) * 1024 / held,
            "state_file_mb": state_bytes(self.root, "A") / 2**20,
            "state_bytes_per_record": state_bytes(self.root, "A") / held,
            "log_bytes_per_update": (log_bytes(self.root, "A") - logs0) / held,
        }

    def sync(self, key: str) -> None:
        """B starts (with whatever its state file holds) and catches up with A, which a
        probe connection keeps asking meanwhile."""
        a_admin, b_admin = self.admin("A"), self.admin("B")
        sent0 = records_out(a_admin)
        b = self.start("B")
        with Probe(self.ports["A"], b"probe-" + key.encode(), limit=600) as probe:
            accept = procs.wait_accepting(b, deadline=60)
            ready = wait_until("B ready", lambda: self.ready("B") and time.perf_counter(), 600)
            target = records_of(a_admin)
            wait_until(
                f"B holds A's {target} records",
                lambda: records_of(b_admin) >= records_of(a_admin),
                600,
                step=0.1,
            )
            done = time.perf_counter()
            b_sent, b_received = link_bytes(self.ports["B_peer"])
        state_a, state_b = get_json(a_admin, "/state"), get_json(b_admin, "/state")
        self.result[key] = {
            "b_accept_s": accept,
            "b_ready_s": ready - b.started,
            "complete_s": done - b.started,
            "records_a_to_b": records_out(a_admin) - sent0,
            "records_b_to_a": records_out(b_admin),
            "bytes_a_to_b": b_received,
            "bytes_b_to_a": b_sent,
            "records": target,
            "same_digest": bool(state_a and state_b and state_a["digest"] == state_b["digest"]),
            "probe_on_a": probe.summary(),
        }

    def join(self) -> None:
        """An empty B joins A; then B's state file catches up with what B received (so
        the catch-up below starts from a B that lacks only the missed updates)."""
        self.sync("join")
        began = time.perf_counter()
        target = self.result["join"]["records"]
        wait_until(
            "B's state file holds what B received",
            lambda: state_lines(self.root, "B") >= target,
            900,
            step=0.5,
        )
        self.result["join"]["b_state_written_s"] = time.perf_counter() - began

    def restart(self) -> None:
        """A alone restarts: accept, every sampled client answered right, ready."""
        self.stop("B")
        self.stop("A")
        samples = self._samples()
        a = self.start("A")
        accept = procs.wait_accepting(a, deadline=60)
        with Probe(self.ports["A"], b"probe-restart", limit=600) as probe:
            answered = self._answer_all(samples) - a.started
            wait_until("A ready", lambda: self.ready("A"), 600)
            ready = time.perf_counter() - a.started
        held = records_of(self.admin("A"))
        loaded_rss = rss_kb(a.pid)  # steady: the store, nothing in flight
        baseline = self._blocking_load()
        self.result["restart"] = {
            "blocking_load_s": baseline,
            "accept_s": accept,
            "all_answered_s": answered,
            "ready_s": ready,
            "samples": len(samples),
            "peak_rss_mb": _hwm_kb(a.pid) / 1024,  # the load is the peak
            "loaded_rss_mb": loaded_rss / 1024,
            "loaded_rss_bytes_per_record": loaded_rss * 1024 / max(held, 1),
            "loaded_rss_growth_bytes_per_record": (loaded_rss - self.empty_rss_kb)
            * 1024
            / max(held, 1),
            "probe_while_loading": probe.summary(),
        }

    def _blocking_load(self) -> float:
        """The baseline, measured in the same run: how long a server that loads before it
        serves, as before issue 11, takes to have its file in its store (interpreter and
        imports, every line read and parsed by `protocol.parse_at`, every record
        offered), with nothing served meanwhile."""
        path = self.root / "state" / "A.records"
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", _BLOCKING_LOAD, str(path)], check=True, timeout=600)
        return time.perf_counter() - began

    def _samples(self) -> dict[bytes, bytes]:
        """SAMPLES clients spread over A's state file, with their stored AT lines."""
        rows = list(read_all(self.root / "state" / "A.records").items())  # A is stopped
        step = max(1, len(rows) // SAMPLES)
        return dict(rows[step - 1 :: step][:SAMPLES])

    def _answer_all(self, samples: dict[bytes, bytes]) -> float:
        """Ask A for every sample (WHATSAT, bound 0) from ANSWER_CONNECTIONS connections at
        once, each pipelining its share, as many clients would, until each answer is its
        stored line; the time when the last one was."""
        todo = dict(samples)
        end = time.perf_counter() + 60
        with ThreadPoolExecutor(ANSWER_CONNECTIONS) as pool:
            while todo and time.perf_counter() < end:
                clients = list(todo)
                shares = [clients[i::ANSWER_CONNECTIONS] for i in range(ANSWER_CONNECTIONS)]
                asks = [partial(self._ask, {c: todo[c] for c in share}) for share in shares]
                for right in pool.map(lambda ask: ask(), asks):
                    for client in right:
                        del todo[client]
        if todo:
            raise TimeoutError(f"{len(todo)} sampled clients not answered right within 60 s")
        return time.perf_counter()

    def _ask(self, expected: dict[bytes, bytes]) -> list[bytes]:
        """On one connection, pipelined: the clients whose stored line A answered."""
        if not expected:
            return []
        with connect(self.ports["A"], timeout=30) as sock:
            sock.sendall(b"".join(b"WHATSAT %s 10 0\n" % client for client in expected))
            replies = _Replies(sock)
            return [c for c, line in expected.items() if replies.next().split(b"\n")[0] == line]

    def catch_up(self) -> None:
        """B down while A takes `missed` updates; then B restarts and catches up."""
        spec = {
            "mode": "throughput",
            "port": self.ports["A"],
            "conns": 1,
            "depth": 16,
            "warmup": 0,
            "duration": 60.0,
            "max_requests": self.missed,
            "prefix": "missed",
            "pids": [],
        }
        procs.loadgen(spec, timeout=120)
        self.sync("catch_up")

    def simulation(self) -> None:
        out = self.root / "sim"
        done = subprocess.run(
            [sys.executable, "-m", "bench.sim", "--quick", "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        # The first table (messages and convergence per graph) is the summary; the
        # rest stays in sim.json.
        self.result["simulation"] = {"tables": done.stdout.strip().split("\n\n")[0]}


_BLOCKING_LOAD = """
import sys
from pathlib import Path
import herd_trio.server
from herd_trio.protocol import parse_at
from herd_trio.statefile import read_all
from herd_trio.store import Store
store = Store()
for at_line in read_all(Path(sys.argv[1])).values():
    store.offer(parse_at(at_line))
assert len(store) > 0
"""


class _Replies:
    """Whole WHATSAT replies, in order, from a socket that answers pipelined requests."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, bytearray()

    def next(self) -> bytes:
        """The next reply: AT line, JSON and a blank line, or one `?` line."""
        while True:
            if self.buffer.startswith(b"?") and (end := self.buffer.find(b"\n")) >= 0:
                end += 1
            elif not self.buffer.startswith(b"?") and (end := self.buffer.find(b"\n\n")) >= 0:
                end += 2
            else:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                self.buffer += data
                continue
            reply = bytes(self.buffer[:end])
            del self.buffer[:end]
            return reply


def _hwm_kb(pid: int) -> int:
    """Peak RSS of `pid` in kB (VmHWM)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    return 0


def run(records: int, missed: int, out: Path) -> Result:
    """Every phase, in order; the figures."""
    root = out / "scale-run"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    scale = Scale(root, records, missed)
    began = time.perf_counter()
    try:
        for phase in (scale.ingest, scale.join, scale.restart):
            phase()
            print(
                f"{time.perf_counter() - began:.0f} s: {json.dumps(scale.result)}", file=sys.stderr
            )
        scale.catch_up()
    finally:
        scale.stop_all()
    scale.simulation()
    scale.result["seconds"] = time.perf_counter() - began
    return scale.result


def main(argv: list[str] | None = None) -> int:
    """Run the scale session; write DIR/scale.json, DIR/scale.md and maybe docs/scale.md."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--missed", type=int, default=2_000, help="updates B misses (d)")
    parser.add_argument("--quick", action="store_true", help="50,000 records")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--write-docs", action="store_true", help="update docs/scale.md")
    args = parser.parse_args(argv)
    records = 50_000 if args.quick else args.records
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(records, args.missed, args.out)
    (args.out / "scale.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    text = markdown(result)
    (args.out / "scale.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    if args.write_docs:
        write_docs(ROOT / "docs" / "scale.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
