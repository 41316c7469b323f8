"""The load generator: a separate process that drives one server over loopback.

    python -m bench.loadgen '{"mode": "throughput", "port": 12003, ...}'

It prints one JSON object on stdout. Plain sockets and `selectors` (epoll), no trio:
on a 2-core machine the generator competes with the server for CPU, so it does as
little as it can per request (one `%`-format per line, one `send` per batch, replies
counted with `bytes.count`). The herd and the limit server get the same generator.

Modes (every loop is bounded in count AND in time):

- `throughput`: `conns` connections, each keeping `depth` IAMATs in flight (a batch
  of `depth` lines in one write, the next batch once all replies are in). Every IAMAT
  has a new client id, so the herd stores and floods every one.
- `sequential`: one connection, one request at a time; latency of each.
- `propagate`: IAMAT at `origin`, then poll `WHATSAT id 50 0` at one target until the
  target answers with the AT line; time from the IAMAT's send to that answer.
- `idle`: open N idle connections to one server (cumulatively, for each N in
  `counts`), wait until the server process holds them all (its /proc fd count), read
  its RSS, check it still answers, close them.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

Spec = dict[str, Any]
Result = dict[str, Any]

HOST = "127.0.0.1"
RECV = 262144  # bytes per recv: large enough to take a whole pipelined batch at once
COORDS = b"+34.068930-118.445127"
FD_WANT = 65536  # RLIMIT_NOFILE we ask for: 10 000 idle clients need more than 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_fd_limit(want: int = FD_WANT) -> int:
    """Raise this process's open-file limit towards `want`; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):  # root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def cpu_ticks(pid: int) -> int:
    """utime + stime of process `pid`, in clock ticks (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # the name may hold spaces
    return int(fields[11]) + int(fields[12])


def machine_busy_ticks() -> int:
    """CPU ticks all cores spent busy (not idle, not waiting for I/O), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields) - fields[3] - fields[4]


def rss_kb(pid: int) -> int:
    """Resident set size of process `pid` in kB (VmRSS)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    """Open file descriptors of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def summarize(samples_ns: list[int]) -> Result:
    """p50/p90/p99/max/mean of latencies, in microseconds."""
    if not samples_ns:
        return {"n": 0}
    s = sorted(samples_ns)
    n = len(s)

    def pct(p: float) -> float:
        return s[min(n - 1, max(0, int(p * n + 0.5) - 1))] / 1000  # nearest rank

    return {
        "n": n,
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": s[-1] / 1000,
        "mean_us": sum(s) / n / 1000,
    }


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    """A blocking TCP connection to HOST:port with Nagle off."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def iamat_time() -> bytes:
    """The current POSIX time as `S.NNNNNNNNN`."""
    seconds, ns = divmod(time.time_ns(), 1_000_000_000)
    return b"%d.%09d" % (seconds, ns)


class _Conn:
    """One throughput connection: its socket, replies outstanding, unsent bytes."""

    __slots__ = ("client", "outbuf", "pending", "seq", "sock", "started")

    def __init__(self, sock: socket.socket, client: bytes) -> None:
        self.sock = sock
        self.client = client  # per-connection id prefix; a counter makes each id new
        # (or, with a pool, names the pool's clients round and round)
        self.pending = 0
        self.seq = 0
        self.started = 0
        self.outbuf = b""


def throughput(spec: Spec) -> Result:
    """Closed-loop load: `conns` connections with `depth` IAMATs in flight each.

    Replies are counted in a window that starts after `warmup` seconds and lasts
    `duration`; CPU of the processes `pids` and of this one is read at both ends of it.
    """
    ports = [int(p) for p in spec.get("ports", [spec.get("port")])]
    conns, depth = int(spec["conns"]), int(spec["depth"])
    warmup, duration = float(spec["warmup"]), float(spec["duration"])
    max_requests = int(spec["max_requests"])
    prefix = str(spec["prefix"]).encode()
    pool = int(spec.get("pool", 0))  # clients per connection, updated round and round
    pids = [int(p) for p in spec.get("pids", [])]
    sel = selectors.DefaultSelector()
    all_conns: list[_Conn] = []
    for i in range(conns):
        sock = connect(ports[i % len(ports)])  # spread over the servers given
        sock.setblocking(False)
        conn = _Conn(sock, b"%s%d-" % (prefix, i))
        all_conns.append(conn)
        sel.register(sock, selectors.EVENT_READ, conn)
    sent = replies = errors = 0
    latencies: list[int] = []

    def send_batch(conn: _Conn, now_ns: int) -> None:
        nonlocal sent
        stamp = iamat_time()
        client, seq = conn.client, conn.seq
        ids = range(seq, seq + depth) if not pool else [n % pool for n in range(seq, seq + depth)]
        data = b"".join([b"IAMAT %s%d %s %s\n" % (client, n, COORDS, stamp) for n in ids])
        conn.seq = seq + depth
        conn.pending = depth
        conn.started = now_ns
        sent += depth
        try:
            n = conn.sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            conn.outbuf = data[n:]
            sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    begin = time.perf_counter()
    warm_at, end_at = begin + warmup, begin + warmup + duration
    end_ns = int(end_at * 1e9)
    now_ns = time.perf_counter_ns()
    for conn in all_conns:
        send_batch(conn, now_ns)
    counting = False
    window_replies = 0
    cpu0 = {pid: cpu_ticks(pid) for pid in pids}
    busy0 = machine_busy_ticks()
    rusage0 = resource.getrusage(resource.RUSAGE_SELF)
    t_window = begin
    while True:
        now = time.perf_counter()
        if not counting and now >= warm_at:
            counting, t_window, window_replies = True, now, replies
            cpu0 = {pid: cpu_ticks(pid) for pid in pids}
            busy0 = machine_busy_ticks()
            rusage0 = resource.getrusage(resource.RUSAGE_SELF)
        if now >= end_at or (sent >= max_requests and replies >= sent):
            break
        events = sel.select(min(end_at, warm_at if not counting else end_at) - now)
        now_ns = time.perf_counter_ns()
        for key, mask in events:
            conn = key.data
            if mask & selectors.EVENT_WRITE and conn.outbuf:
                try:
                    n = conn.sock.send(conn.outbuf)
                except BlockingIOError:
                    n = 0
                conn.outbuf = conn.outbuf[n:]
                if not conn.outbuf:
                    sel.modify(conn.sock, selectors.EVENT_READ, conn)
            if mask & selectors.EVENT_READ:
                try:
                    data = conn.sock.recv(RECV)
                except BlockingIOError:
                    continue
                if not data:
                    raise RuntimeError("a server closed a connection")
                got = data.count(b"\n")
                if b"?" in data:  # an AT line never holds '?': the server refused a line
                    errors += 1
                replies += got
                conn.pending -= got
                if conn.pending <= 0:
                    if counting:
                        latencies.append(now_ns - conn.started)
                    if sent < max_requests and now_ns < end_ns:
                        send_batch(conn, now_ns)
    t_end = time.perf_counter()
    cpu1 = {pid: cpu_ticks(pid) for pid in pids}
    busy1 = machine_busy_ticks()
    rusage1 = resource.getrusage(resource.RUSAGE_SELF)
    for conn in all_conns:
        sel.unregister(conn.sock)
        conn.sock.close()
    counted = replies - window_replies if counting else 0
    elapsed = t_end - t_window if counting else 0.0
    gen_cpu = (rusage1.ru_utime + rusage1.ru_stime) - (rusage0.ru_utime + rusage0.ru_stime)
    return {
        "mode": "throughput",
        "conns": conns,
        "depth": depth,
        "replies": counted,
        "seconds": elapsed,
        "rps": counted / elapsed if elapsed > 0 else 0.0,
        "requests_sent": sent,
        "errors": errors,
        "batch_latency": summarize(latencies),
        "server_cpu_s": {str(pid): (cpu1[pid] - cpu0[pid]) / CLK_TCK for pid in pids},
        "loadgen_cpu_s": gen_cpu,
        "machine_busy_s": (busy1 - busy0) / CLK_TCK,  # every process, ours and others'
    }


def read_reply(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """Read from a blocking socket until `done(buffer)`; ConnectionError on EOF."""
    buffer = b""
    while not done(buffer):
        data = sock.recv(RECV)
        if not data:
            raise ConnectionError("server closed the connection")
        buffer += data
    return buffer


def line_done(buffer: bytes) -> bool:
    """A one-line reply (an AT line, or `? ...`) is complete."""
    return buffer.endswith(b"\n")


def whatsat_done(buffer: bytes) -> bool:
    """A WHATSAT reply (AT line, JSON, blank line) or a `? ...` line is complete."""
    return buffer.endswith(b"\n\n") or (buffer.startswith(b"?") and buffer.endswith(b"\n"))


def sequential(spec: Spec) -> Result:
    """One request at a time on one connection: `iamat` (new ids) or fixed `lines`."""
    port = int(spec["port"])
    count, duration, warmup = int(spec["count"]), float(spec["duration"]), int(spec["warmup"])
    kind = str(spec["kind"])
    prefix = str(spec.get("prefix", "seq-")).encode()
    lines = [str(x).encode() + b"\n" for x in spec.get("lines", [])]
    done = line_done if kind == "iamat" else whatsat_done
    pids = [int(p) for p in spec.get("pids", [])]
    sock = connect(port)
    cpu0: dict[int, int] = {}
    latencies: list[int] = []
    errors = 0
    reply_bytes = 0
    start = time.perf_counter()
    end_at = start + duration
    warm_until = start + min(0.3, duration / 4)  # warm-up is bounded in time as well
    with sock:
        for i in range(count + warmup):
            now = time.perf_counter()
            if now >= end_at:
                break
            if i < warmup and now >= warm_until:
                warmup = i  # measure from here on
            if i == warmup:
                cpu0 = {pid: cpu_ticks(pid) for pid in pids}
            if kind == "iamat":
                request = b"IAMAT %s%d %s %s\n" % (prefix, i, COORDS, iamat_time())
            else:
                request = lines[i % len(lines)]
            t0 = time.perf_counter_ns()
            sock.sendall(request)
            reply = read_reply(sock, done)
            t1 = time.perf_counter_ns()
            if reply.startswith(b"?"):
                errors += 1
            if i >= warmup:
                latencies.append(t1 - t0)
                reply_bytes += len(reply)
    cpu = {pid: cpu_ticks(pid) - cpu0.get(pid, 0) for pid in pids if cpu0}
    return {
        "mode": "sequential",
        "kind": kind,
        "server_cpu_us_per_request": {
            str(pid): ticks / CLK_TCK / max(1, len(latencies)) * 1e6 for pid, ticks in cpu.items()
        },
        "latency": summarize(latencies),
        "errors": errors,
        "mean_reply_bytes": reply_bytes / len(latencies) if latencies else 0,
    }


def propagate(spec: Spec) -> Result:
    """IAMAT at `origin`, poll each target in turn until it has the record."""
    origin_port = int(spec["origin"])
    targets = {str(k): int(v) for k, v in spec["targets"].items()}
    trials, duration = int(spec["trials"]), float(spec["duration"])
    trial_timeout = float(spec.get("trial_timeout", 0.5))
    gap = float(spec.get("gap", 0.002))
    prefix = str(spec.get("prefix", "prop-")).encode()
    origin = connect(origin_port)
    socks = {name: connect(port) for name, port in targets.items()}
    upper: dict[str, list[int]] = {name: [] for name in targets}  # to the hit's reply
    lower: dict[str, list[int]] = {name: [] for name in targets}  # to the hit poll's send
    polls: dict[str, int] = dict.fromkeys(targets, 0)
    lost: dict[str, int] = dict.fromkeys(targets, 0)
    names = list(targets)
    end_at = time.perf_counter() + duration
    for i in range(trials):
        if time.perf_counter() >= end_at:
            break
        name = names[i % len(names)]
        target = socks[name]
        client = b"%s%d" % (prefix, i)
        poll = b"WHATSAT %s 50 0\n" % client
        t0 = time.perf_counter_ns()
        origin.sendall(b"IAMAT %s %s %s\n" % (client, COORDS, iamat_time()))
        while True:
            ts = time.perf_counter_ns()
            target.sendall(poll)
            reply = read_reply(target, whatsat_done)
            tr = time.perf_counter_ns()
            polls[name] += 1
            if reply.startswith(b"AT "):
                upper[name].append(tr - t0)
                lower[name].append(ts - t0)
                break
            if tr - t0 > trial_timeout * 1e9:
                lost[name] += 1
                break
        read_reply(origin, line_done)
        time.sleep(gap)  # let every server go idle between trials
    origin.close()
    for sock in socks.values():
        sock.close()
    return {
        "mode": "propagate",
        "targets": {
            name: {
                "latency": summarize(upper[name]),
                "lower_bound": summarize(lower[name]),
                "polls_per_trial": polls[name] / max(1, len(upper[name]) + lost[name]),
                "lost": lost[name],
            }
            for name in targets
        },
    }


def observe(spec: Spec) -> Result:
    """Be a silent neighbour ("observer") of some servers; time AT lines from each.

    The observer listens on its peer port; the servers named in `expect` dial it (the
    name that sorts first dials, so the observer's name sorts last), say HELLO, and from
    then on send it every record they store. An IAMAT goes to `origin`; the arrival of
    its AT line from server X bounds from above the moment X stored it (X stores, then
    its link writer sends: one loopback hop later). Unlike polling with WHATSAT, this
    puts no load on the servers beyond one more link each. The observer never sends a
    record or a sync line, only PINGs, so it takes no part in the flood.
    """
    name = str(spec["name"]).encode()
    expect = {str(x).encode() for x in spec["expect"]}
    trials, duration = int(spec["trials"]), float(spec["duration"])
    trial_timeout, gap = float(spec.get("trial_timeout", 0.5)), float(spec.get("gap", 0.002))
    prefix = str(spec.get("prefix", "obs-")).encode()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, int(spec["peer_port"])))
    listener.listen(16)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    links: dict[bytes, socket.socket] = {}
    pending: dict[socket.socket, bytes] = {}  # connected, HELLO not yet read
    buffers: dict[bytes, bytes] = {}
    arrivals: dict[bytes, dict[bytes, int]] = {}  # client -> server -> perf_counter_ns
    last_ping = time.perf_counter()

    def pump(timeout: float) -> None:
        nonlocal last_ping
        for key, _ in sel.select(timeout):
            now_ns = time.perf_counter_ns()
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pending[conn] = b""
                sel.register(conn, selectors.EVENT_READ, b"")
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = sock.recv(RECV)
            if not data:
                raise ConnectionError(f"server {key.data!r} closed the observer link")
            if sock in pending:
                pending[sock] += data
                if b"\n" not in pending[sock]:
                    continue
                hello, _, rest = pending.pop(sock).partition(b"\n")
                fields = hello.split()  # HELLO herd_trio/1 <server> <observer>
                if len(fields) != 4 or fields[0] != b"HELLO" or fields[3] != name:
                    raise ConnectionError(f"unexpected handshake {hello[:80]!r}")
                server = fields[2]
                sock.sendall(b"HELLO %s %s %s\n" % (fields[1], name, server))
                links[server] = sock
                sel.modify(sock, selectors.EVENT_READ, server)
                data, key_data = rest, server
            else:
                key_data = key.data
            buffer = buffers.get(key_data, b"") + data
            *lines, buffers[key_data] = buffer.split(b"\n")
            for line in lines:
                if line.startswith(b"AT "):
                    fields = line.split()
                    if len(fields) == 6 and fields[3].startswith(prefix):
                        arrivals.setdefault(fields[3], {}).setdefault(key_data, now_ns)
        if time.perf_counter() - last_ping > 0.5:  # a silent link is dropped after 3 beats
            last_ping = time.perf_counter()
            for sock in links.values():
                sock.sendall(b"PING\n")

    end_at = time.perf_counter() + duration
    while set(links) != expect and time.perf_counter() < end_at:
        pump(0.05)
    if set(links) != expect:
        missing = sorted(x.decode() for x in expect - set(links))
        raise TimeoutError(f"servers {missing} did not dial the observer")
    origin = connect(int(spec["origin"]))
    samples: dict[bytes, list[int]] = {server: [] for server in expect}
    lost: dict[bytes, int] = dict.fromkeys(expect, 0)
    for i in range(trials):
        if time.perf_counter() >= end_at:
            break
        client = b"%s%d" % (prefix, i)
        t0 = time.perf_counter_ns()
        origin.sendall(b"IAMAT %s %s %s\n" % (client, COORDS, iamat_time()))
        deadline = time.perf_counter() + trial_timeout
        while len(arrivals.get(client, {})) < len(expect) and time.perf_counter() < deadline:
            pump(max(0.0, deadline - time.perf_counter()))
        got = arrivals.get(client, {})
        for server in expect:
            if server in got:
                samples[server].append(got[server] - t0)
            else:
                lost[server] += 1
        read_reply(origin, line_done)
        pause_until = time.perf_counter() + gap
        while time.perf_counter() < pause_until:  # keep reading (PINGs, sync lines) meanwhile
            pump(max(0.0, pause_until - time.perf_counter()))
    origin.close()
    for sock in links.values():
        sock.close()
    listener.close()
    return {
        "mode": "observe",
        "targets": {
            server.decode(): {"latency": summarize(samples[server]), "lost": lost[server]}
            for server in sorted(expect)
        },
    }


def _open_wave(port: int, count: int, deadline: float) -> list[socket.socket]:
    """Open `count` connections at once (non-blocking connects), wait for all to connect."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex((HOST, port))
        if err not in (0, 115):  # 115: EINPROGRESS
            sock.close()
            raise OSError(err, os.strerror(err))
        socks.append(sock)
        sel.register(sock, selectors.EVENT_WRITE)
    waiting = len(socks)
    while waiting and time.perf_counter() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.perf_counter())):
            sock = key.fileobj  # type: ignore[assignment]
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            sel.unregister(sock)
            waiting -= 1
    sel.close()
    if waiting:
        raise TimeoutError(f"{waiting} connects still pending")
    return socks


def idle(spec: Spec) -> Result:
    """RSS of server `pid` with N idle connections open, for each N in `counts`."""
    port, pid = int(spec["port"]), int(spec["pid"])
    counts = sorted(int(n) for n in spec["counts"])
    wave, timeout = int(spec.get("wave", 500)), float(spec["timeout"])
    limit = raise_fd_limit()
    end_at = time.perf_counter() + timeout
    fds0, rss0 = fd_count(pid), _stable_rss(pid, end_at)
    socks: list[socket.socket] = []
    steps: list[Result] = []
    try:
        for n in counts:
            step: Result = {"count": n}
            steps.append(step)
            if n + 64 > limit:
                step["error"] = f"fd limit {limit} is too low for {n} connections"
                break
            t0 = time.perf_counter()
            try:
                while len(socks) < n and time.perf_counter() < end_at:
                    socks += _open_wave(port, min(wave, n - len(socks)), end_at)
                    # Stay within the listen backlog: let the server accept what is queued.
                    while fd_count(pid) - fds0 < len(socks) - wave and time.perf_counter() < end_at:
                        time.sleep(0.005)
                while fd_count(pid) - fds0 < n and time.perf_counter() < end_at:
                    time.sleep(0.01)
            except OSError as exc:
                step["error"] = f"after {len(socks)} connections: {exc!r}"
            accepted = fd_count(pid) - fds0
            step["accepted"] = accepted
            step["open_seconds"] = time.perf_counter() - t0
            rss = _stable_rss(pid, end_at)
            step["rss_kb"] = rss
            step["bytes_per_conn"] = (rss - rss0) * 1024 / max(1, accepted)
            step["responsive"] = _answers(socks[-1]) if socks else False
            if accepted < n:
                step.setdefault("error", f"the server holds {accepted} of {n} connections")
                break
    finally:
        for sock in socks:
            sock.close()
    return {"mode": "idle", "baseline_rss_kb": rss0, "baseline_fds": fds0, "steps": steps}


def _stable_rss(pid: int, end_at: float) -> int:
    """RSS once it stopped changing for three readings 0.1 s apart (bounded by end_at)."""
    readings = [rss_kb(pid)]
    while time.perf_counter() < end_at and (len(readings) < 3 or len(set(readings[-3:])) > 1):
        time.sleep(0.1)
        readings.append(rss_kb(pid))
    return readings[-1]


def _answers(sock: socket.socket) -> bool:
    """True if the server answers an IAMAT on this (idle) connection within 5 s."""
    sock.setblocking(True)
    sock.settimeout(5.0)
    try:
        sock.sendall(b"IAMAT idle-check %s %s\n" % (COORDS, iamat_time()))
        return read_reply(sock, line_done).startswith(b"AT ")
    except OSError:
        return False


MODES: dict[str, Callable[[Spec], Result]] = {
    "throughput": throughput,
    "sequential": sequential,
    "propagate": propagate,
    "idle": idle,
    "observe": observe,
}


def main() -> None:
    """Run the mode the JSON spec in argv[1] names; print the result as JSON."""
    spec: Spec = json.loads(sys.argv[1])
    raise_fd_limit()
    result = MODES[str(spec["mode"])](spec)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
