"""Server and generator processes: configs on free ports, launch, wait, measure, stop.

Every wait here polls a condition under a deadline; nothing sleeps a fixed time to
synchronise, and every process started is stopped (SIGTERM, then SIGKILL) on the way out.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import cpu_ticks, raise_fd_limit, rss_kb

ROOT = Path(__file__).resolve().parent.parent  # the repo: `python -m bench.*` runs from here
HOST = "127.0.0.1"
PORTS_FROM = 10_000  # free_ports picks from here up to the ephemeral range
_GIVEN: set[int] = set()  # ports free_ports returned before: never twice in one process

# The default herd's graph (PROTOCOL.md §5) and the chain used for 1, 2 and 3 hops.
DEFAULT_NAMES = ["Bailey", "Bona", "Campbell", "Clark", "Jaquez"]
DEFAULT_EDGES = [
    ("Clark", "Jaquez"),
    ("Clark", "Bona"),
    ("Campbell", "Bailey"),
    ("Campbell", "Bona"),
    ("Campbell", "Jaquez"),
    ("Bona", "Bailey"),
]
CHAIN_NAMES = ["A", "B", "C", "D"]
CHAIN_EDGES = [("A", "B"), ("B", "C"), ("C", "D")]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on 127.0.0.1 a moment ago.

    Chosen at random below the kernel's ephemeral range (ip_local_port_range, 32768
    and up by default): a port the kernel handed out for bind(0) may be handed out
    again as the source port of an outgoing connection (a dialling server, a load
    generator) before the server that was meant to listen on it binds.
    """
    low, high = PORTS_FROM, _ephemeral_start() - 1
    if high - low < 1000:  # an unusual range: take any unprivileged port
        high = 65535
    if len(_GIVEN) > (high - low) // 2:  # a long-lived caller: start over
        _GIVEN.clear()
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(low, high)
        if port in chosen or port in _GIVEN:  # not bound yet, maybe, by whom it was given
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        chosen.append(port)
    _GIVEN.update(chosen)
    return chosen


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


@dataclass
class Herd:
    """A herd config written to disk: names, edges, client and peer ports."""

    config: Path
    names: list[str]
    edges: list[tuple[str, str]]
    ports: dict[str, int]
    peer_ports: dict[str, int]

    def hops(self, start: str) -> dict[str, int]:
        """Breadth-first distance in links from `start` to every server."""
        dist, todo = {start: 0}, [start]
        while todo:
            here = todo.pop(0)
            for a, b in self.edges:
                for x, y in ((a, b), (b, a)):
                    if x == here and y not in dist:
                        dist[y] = dist[here] + 1
                        todo.append(y)
        return dist


def write_herd(
    path: Path, names: Sequence[str], edges: Sequence[tuple[str, str]], settings: dict[str, Any]
) -> Herd:
    """Write a herd config on free ports; logs go to `logs/` beside the file."""
    ports = free_ports(2 * len(names))
    client = dict(zip(names, ports[: len(names)], strict=True))
    peer = dict(zip(names, ports[len(names) :], strict=True))
    lines = ["[herd]", 'log_dir = "logs"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    for name in names:
        mine = [b for a, b in edges if a == name]
        lines += [
            "",
            f"[servers.{name}]",
            f"port = {client[name]}",
            f"peer_port = {peer[name]}",
            f"neighbours = {json.dumps(mine)}",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return Herd(path, list(names), list(edges), client, peer)


@dataclass
class Proc:
    """A server process we started."""

    name: str
    port: int
    popen: subprocess.Popen[bytes]
    started: float  # time.perf_counter() just before Popen
    stderr: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid


NICE = 0  # niceness for every process we start (servers and generator alike); --nice


def _preexec() -> None:
    raise_fd_limit()  # 10 000 idle clients need more than the usual 1 024 descriptors
    if NICE:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)


def launch(
    name: str, port: int, argv: list[str], run_dir: Path, env: dict[str, str] | None = None
) -> Proc:
    """Start `argv` (a server listening on `port`) with a raised fd limit."""
    run_dir.mkdir(parents=True, exist_ok=True)
    err = run_dir / f"{name}.stderr"
    with err.open("wb") as stderr:
        started = time.perf_counter()
        popen = subprocess.Popen(
            argv,
            cwd=run_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=_preexec,
            env=env,
        )
    return Proc(name, port, popen, started, err)


def launch_server(herd: Herd, name: str, run_dir: Path, env: dict[str, str] | None = None) -> Proc:
    """`python -m herd_trio NAME --config FILE`, as an operator starts one server;
    `env`: variables to add to ours (a secret_env)."""
    argv = [sys.executable, "-m", "herd_trio", name, "--config", str(herd.config)]
    return launch(name, herd.ports[name], argv, run_dir, {**os.environ, **env} if env else None)


def bench_env() -> dict[str, str]:
    """Our environment, with the repo on PYTHONPATH (bench servers run in scratch dirs)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def launch_limit(port: int, run_dir: Path) -> Proc:
    """The limit server (bench.limit) on `port`."""
    argv = [sys.executable, "-m", "bench.limit", str(port)]
    return launch("limit", port, argv, run_dir, bench_env())


def wait_accepting(proc: Proc, deadline: float = 10.0) -> float:
    """Seconds from launch until a TCP connect to the server succeeds."""
    end = time.perf_counter() + deadline
    while time.perf_counter() < end:
        try:
            with socket.create_connection((HOST, proc.port), timeout=1.0):
                return time.perf_counter() - proc.started
        except OSError:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited: {tail(proc.stderr)}") from None
            time.sleep(0.001)
    raise TimeoutError(f"{proc.name} did not accept on port {proc.port} within {deadline} s")


def tail(path: Path, chars: int = 400) -> str:
    """The end of a text file, for error messages."""
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def stop(procs: Iterable[Proc], deadline: float = 8.0) -> dict[str, int | None]:
    """SIGTERM every process, wait for them, SIGKILL stragglers; exit codes by name."""
    procs = list(procs)
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
    end = time.perf_counter() + deadline
    codes: dict[str, int | None] = {}
    for proc in procs:
        try:
            codes[proc.name] = proc.popen.wait(max(0.1, end - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(5)
            codes[proc.name] = None  # did not stop on SIGTERM
    return codes


def settle(pids: Sequence[int], *, quiet: float = 0.02, timeout: float = 10.0) -> float:
    """Wait until the processes use less than `quiet` of a core for 0.2 s; seconds waited."""
    start = time.perf_counter()
    tck = os.sysconf("SC_CLK_TCK")
    before = sum(cpu_ticks(pid) for pid in pids)
    while time.perf_counter() - start < timeout:
        time.sleep(0.2)
        after = sum(cpu_ticks(pid) for pid in pids)
        if (after - before) / tck <= quiet * 0.2 * max(1, len(pids)):
            break
        before = after
    return time.perf_counter() - start


def request(port: int, line: bytes, *, whatsat: bool = False, timeout: float = 10.0) -> bytes:
    """Send one line on a new connection and read the reply (orchestration, not timed)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(line + b"\n")
        buffer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return buffer
            buffer += data
            if buffer.startswith(b"?") or not whatsat:
                if buffer.endswith(b"\n"):
                    return buffer
            elif buffer.endswith(b"\n\n"):
                return buffer


def loadgen(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run `python -m bench.loadgen SPEC` (a separate process) and return its JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        timeout=timeout,
        check=False,
        preexec_fn=_preexec,
    )
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"loadgen {spec['mode']} failed: {message[-1] if message else '?'}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def memory_kb(pid: int) -> int:
    """RSS of `pid` in kB (re-exported for the suite)."""
    return rss_kb(pid)
