"""A herd across hosts, made of Linux network namespaces by the test itself.

`Lab` makes one namespace per host plus a `hub` namespace holding a bridge; each host
gets a veth pair to the bridge (`eth0` inside), 10.77.0.N/24 and fd77::N/64. Those
addresses exist only inside the namespaces: the test process reaches them by creating
each socket inside a host's namespace (setns(2) around socket(2), nothing else), so
the machine's own network is never touched. Faults are made with what this kernel
has (checked): nftables rules inside a host's namespace drop packets (all, one way,
or a random share), and `delay.py` forwarders add latency (there is no netem qdisc).
Every namespace is deleted when the lab closes, whatever happened.

`HostHerd` runs one `python -m herd_trio NAME` per host (`ip netns exec`) from one
config file for the herd, with a keyring file and a per-host certificate from one
trustme CA, and reads each server's store through its admin port (on the host's own
loopback, no token).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import attrs
import pytest
import trio
import trustme

from tests.e2e.herd import REQUIRE_ALL, poll, read_until_close
from tests.hosts.delay import READY

CLONE_NEWNET = 0x40000000
SUBNET4, SUBNET6 = "10.77.0", "fd77::"
CLIENT_PORT, PEER_PORT, ADMIN_PORT = 12000, 12100, 12200  # the same on every host
DEADLINE = 30.0  # seconds any one step may take on a busy 2-core machine
DELAY_SCRIPT = Path(__file__).with_name("delay.py")
_libc = ctypes.CDLL(None, use_errno=True)


def missing() -> str | None:
    """Why namespaces cannot be made here (not root, a program missing), or None."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces (ip netns add)"
    lacking = [tool for tool in ("ip", "nft", "tc") if shutil.which(tool) is None]
    if lacking:
        return f"needs {', '.join(lacking)}: apt-get install iproute2 nftables"
    return None


def require_lab() -> None:
    """Skip with the reason unless a lab can be made; fail instead under HERD_REQUIRE_ALL=1."""
    if (reason := missing()) is None:
        return
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ALL}=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; its failure names the command and what it said."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Sockets made in this block belong to `namespace` (this thread only, briefly)."""
    with open(f"/run/netns/{namespace}") as target, open("/proc/thread-self/ns/net") as home:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


async def open_stream(namespace: str, host: str, port: int) -> trio.SocketStream:
    """A TCP connection from inside `namespace` to `host:port`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with inside(namespace):
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@attrs.define(eq=False)
class Lab:
    """Namespaces `<prefix>-hub` and `<prefix>-1` .. `-N`, bridged; see the module doc."""

    prefix: str
    hosts: int
    made: list[str] = attrs.field(factory=list)

    def ns(self, index: int) -> str:
        """The namespace of host `index` (1-based)."""
        return f"{self.prefix}-{index}"

    @property
    def hub(self) -> str:
        """The namespace holding the bridge."""
        return f"{self.prefix}-hub"

    def open(self) -> None:
        """Make the hub and every host; on failure, what was made is removed by close()."""
        self._netns(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for index in range(1, self.hosts + 1):
            self.add_host(index)

    def add_host(self, index: int) -> None:
        """Host `index`: its namespace, a veth to the bridge, its addresses, nft tables."""
        ns = self.ns(index)
        self._netns(ns)
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{index}",
           "netns", self.hub)  # fmt: skip
        sh("ip", "-n", self.hub, "link", "set", f"p{index}", "master", "br0", "up")
        for device in ("lo", "eth0"):
            sh("ip", "-n", ns, "link", "set", device, "up")
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET4}.{index}/24", "dev", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET4}.{100 + index}/24", "dev", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET6}{index}/64", "dev", "eth0", "nodad")
        self.nft(index, "add table inet lab")
        for chain, hook in (("out", "output"), ("in", "input")):
            self.nft(index, f"add chain inet lab {chain} {{ type filter hook {hook} priority 0; }}")

    def _netns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.made.append(name)

    def close(self) -> None:
        """Delete every namespace this lab made (their veths go with them)."""
        for name in reversed(self.made):
            sh("ip", "netns", "del", name, check=False)
        self.made.clear()

    def nft(self, index: int, rule: str) -> None:
        """Run one nft command inside host `index`."""
        sh("ip", "netns", "exec", self.ns(index), "nft", rule)

    def loss(self, index: int, percent: int) -> None:
        """Drop `percent`% of the packets host `index` sends on its link, at random."""
        self.nft(
            index, f'add rule inet lab out oifname "eth0" numgen random mod 100 < {percent} drop'
        )

    def cut(self, index: int) -> None:
        """Drop everything host `index` sends or receives on its link."""
        self.nft(index, 'add rule inet lab out oifname "eth0" drop')
        self.nft(index, 'add rule inet lab in iifname "eth0" drop')

    def drop_to(self, index: int, address: str) -> None:
        """Drop the packets host `index` sends to `address` (one way only)."""
        family = "ip6" if ":" in address else "ip"
        self.nft(index, f"add rule inet lab out {family} daddr {address} drop")

    def limit(self, index: int, rate: str) -> None:
        """Cap what host `index` sends on its link at `rate` (tc's units: `8mbit`)."""
        sh(*self.exec(index, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                      "burst", "32kbit", "latency", "400ms"))  # fmt: skip

    def heal(self, index: int) -> None:
        """Remove every drop rule of host `index`."""
        for chain in ("out", "in"):
            self.nft(index, f"flush chain inet lab {chain}")

    def exec(self, index: int, *argv: str) -> list[str]:
        """`argv` run inside host `index`."""
        return ["ip", "netns", "exec", self.ns(index), *argv]


@contextmanager
def lab(hosts: int) -> Iterator[Lab]:
    """A lab of `hosts` hosts with names unique to this run, removed however the block ends."""
    made = Lab(f"herd{os.getpid() % 100000}{secrets.token_hex(2)}", hosts)
    try:
        made.open()
        yield made
    finally:
        made.close()


def start_forwarder(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start delay.py (`argv`) and wait, up to DEADLINE, for its READY line."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], DEADLINE)  # a start-up wait
    line = process.stdout.readline() if readable else b""
    process.stdout.close()  # it says nothing else
    if line.rstrip() != READY:
        process.kill()
        process.wait(timeout=DEADLINE)
        raise AssertionError(f"delay forwarder never ready: {argv[-6:]} said {line!r}")
    return process


def address(index: int, ipv6: bool = False) -> str:
    """Host `index`'s own address."""
    return f"{SUBNET6}{index}" if ipv6 else f"{SUBNET4}.{index}"


@attrs.define(eq=False)
class HostHerd:
    """Servers named `names`, server i on host i+1 of `lab`, run from one config file."""

    lab: Lab
    root: Path
    names: list[str]
    edges: list[tuple[str, str]]
    ipv6: bool = False
    delay: float = 0.0  # seconds each link adds each way (a delay.py per host)
    settings: dict[str, object] = attrs.field(factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    forwarders: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    ca: trustme.CA = attrs.field(factory=trustme.CA)
    placed: dict[str, int] = attrs.field(factory=dict)  # a server keeps its host

    def index(self, name: str) -> int:
        """The host number of server `name`: the next free one when first named."""
        if name not in self.placed:
            self.placed[name] = len(self.placed) + 1
        return self.placed[name]

    def host(self, name: str) -> str:
        """Where server `name` takes clients (its host's own address)."""
        return address(self.index(name), self.ipv6)

    @property
    def config(self) -> Path:
        """The herd's one config file."""
        return self.root / "herd.toml"

    def log(self, name: str) -> Path:
        """Server `name`'s log file."""
        return self.root / "logs" / f"{name}.log"

    def write_config(self) -> None:
        """The config file, certificates and keyring for the herd as it is now.

        Each server listens on `::`/`0.0.0.0` and is dialled at its host's address; with
        a delay, it listens on its host's address and is dialled at a second address of
        its host where the delay forwarder takes the dial (the same port number).
        """
        tls = self.root / "tls"
        tls.mkdir(parents=True, exist_ok=True)
        self.ca.cert_pem.write_to_path(tls / "ca.pem")
        keyring = self.root / "keyring"
        if not keyring.exists():
            keyring.write_text(secrets.token_hex(32) + "\n")
        lines = ["[herd]", 'log_dir = "logs"', 'keyring_file = "keyring"', 'tls_ca = "tls/ca.pem"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in self.settings.items()]
        for name in self.names:
            self.index(name)
        for name in self.names:
            if not (tls / f"{name}.pem").exists():
                cert = self.ca.issue_cert(name)
                cert.cert_chain_pems[0].write_to_path(tls / f"{name}.pem")
                cert.private_key_pem.write_to_path(tls / f"{name}.key")
            listed = [b for a, b in self.edges if a == name]
            listen = self.host(name) if self.delay else "::" if self.ipv6 else "0.0.0.0"
            lines += [
                "",
                f"[servers.{name}]",
                f'host = "{self.front(name)}"',
                f'listen = "{listen}"',
                f"port = {CLIENT_PORT}",
                f"peer_port = {PEER_PORT}",
                f"admin_port = {ADMIN_PORT}",
                f"neighbours = {json.dumps(listed)}",
                f'tls_cert = "tls/{name}.pem"',
                f'tls_key = "tls/{name}.key"',
            ]
        self.config.write_text("\n".join(lines) + "\n")

    def front(self, name: str) -> str:
        """Where neighbours dial server `name`: its address, or its delay forwarder's."""
        return f"{SUBNET4}.{100 + self.index(name)}" if self.delay else self.host(name)

    def start(self, name: str) -> None:
        """Start server `name` in its host's namespace (and its forwarder, with a delay)."""
        index = self.index(name)
        if self.delay and len(self.forwarders) < len(self.names):
            self._forwarder(index)
        argv = [sys.executable, "-m", "herd_trio", name, "--config", str(self.config)]
        self.processes[name] = subprocess.Popen(
            self.lab.exec(index, *argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.root,
        )

    def _forwarder(self, index: int) -> None:
        argv = [sys.executable, str(DELAY_SCRIPT), f"{SUBNET4}.{100 + index}", str(PEER_PORT)]
        argv += [address(index), str(PEER_PORT), str(self.delay)]
        process = start_forwarder(self.lab.exec(index, *argv))
        self.forwarders.append(process)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        """Stop server `name`; its exit status."""
        process = self.processes[name]
        process.send_signal(sig)
        status = process.wait(timeout=DEADLINE)
        if process.stderr is not None:
            process.stderr.close()
        return status

    def close(self) -> None:
        """Stop every process; fail if a server logged an internal error."""
        for process in [*self.processes.values(), *self.forwarders]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.processes.values(), *self.forwarders]:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()
        for name in self.placed:
            if self.log(name).exists():
                assert "internal error" not in self.log(name).read_text(), name

    def check_alive(self, name: str) -> None:
        """Fail with its stderr if server `name` has exited."""
        process = self.processes[name]
        if process.poll() is not None:
            said = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise AssertionError(f"{name} exited ({process.returncode}): {said.strip()}")

    def running(self, name: str) -> bool:
        """True if server `name` was started and has not exited."""
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    async def exchange(self, name: str, payload: bytes) -> bytes:
        """Send `payload` to server `name`'s client port from its own host; the answer."""
        ns = self.lab.ns(self.index(name))

        async def attempt() -> trio.SocketStream | None:
            try:
                return await open_stream(ns, self.host(name), CLIENT_PORT)
            except OSError:
                return None

        stream = await poll(f"connect to {name}", attempt, deadline=DEADLINE)
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            return await read_until_close(stream, deadline=DEADLINE)

    async def iamat_once(self, name: str, client: bytes, sent: float) -> bytes:
        """One try of `iamat` (OSError if `name` does not accept): for loads that go on
        while servers stop and start."""
        stream = await open_stream(self.lab.ns(self.index(name)), self.host(name), CLIENT_PORT)
        async with stream:
            await stream.send_all(b"IAMAT %s +34.07-118.44 %.9f\n" % (client, sent))
            await stream.send_eof()
            reply = await read_until_close(stream, deadline=DEADLINE)
        assert reply.startswith(b"AT "), reply
        return reply

    async def iamat(self, name: str, client: bytes, sent: float) -> bytes:
        """An IAMAT for `client` at `name`, stamped `sent`; the AT line."""
        reply = await self.exchange(name, b"IAMAT %s +34.07-118.44 %.9f\n" % (client, sent))
        assert reply.startswith(b"AT "), reply
        return reply

    async def get(self, name: str, path: str) -> tuple[int, bytes] | None:
        """GET `path` from server `name`'s admin port on its host's loopback, as curl
        on that host would: (status, body), or None if it does not accept."""
        try:
            stream = await open_stream(self.lab.ns(self.index(name)), "127.0.0.1", ADMIN_PORT)
        except OSError:
            return None
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        async with stream:
            await stream.send_all(request.encode())
            answer = await read_until_close(stream, deadline=DEADLINE)
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body

    async def state(self, name: str) -> dict[str, object] | None:
        """Server `name`'s GET /state, or None if it does not answer 200."""
        answer = await self.get(name, "/state")
        if answer is None or answer[0] != 200:
            return None
        result: dict[str, object] = json.loads(answer[1])
        return result

    async def ready(self, name: str) -> bool | None:
        """True once `GET /readyz?links=all` answers 200 (the rolling upgrade's check)."""
        self.check_alive(name)
        answer = await self.get(name, "/readyz?links=all")
        return True if answer is not None and answer[0] == 200 else None

    async def wait_up(self, names: list[str] | None = None) -> None:
        """Wait until each server answers /state with every configured link up."""
        for name in names or self.names:

            async def linked(name: str = name) -> bool | None:
                self.check_alive(name)
                state = await self.state(name)
                links = state["links"] if state else None
                assert links is None or isinstance(links, list)
                return True if links is not None and all(x["up"] for x in links) else None

            await poll(f"{name} up with its links", linked, deadline=DEADLINE)

    async def digests(self) -> dict[str, tuple[object, object]]:
        """(record count, store digest) of every running server."""
        out: dict[str, tuple[object, object]] = {}
        for name in self.names:
            if self.running(name) and (state := await self.state(name)) is not None:
                out[name] = (state["records"], state["digest"])
        return out


@contextmanager
def host_herd(lab_: Lab, root: Path, names: list[str], edges: list[tuple[str, str]],
              **kwargs: object) -> Iterator[HostHerd]:  # fmt: skip
    """A HostHerd whose processes are stopped however the block ends."""
    herd = HostHerd(lab_, root, names, edges, **kwargs)  # type: ignore[arg-type]
    try:
        yield herd
    finally:
        herd.close()


def log_times(path: Path, marker: bytes) -> dict[bytes, float]:
    """For each client whose id starts with `marker`: when this log first took its record
    from a peer (POSIX seconds, from the log's millisecond stamps)."""
    first: dict[bytes, float] = {}
    needle = b" < b'AT "
    for raw in path.read_bytes().splitlines():
        if b" peer " not in raw or needle not in raw or not raw.endswith(b" kept"):
            continue
        fields = raw.split(b"' ", 1)[0].split(b" ")
        client = fields[8]  # STAMP NAME peer X < b'AT ORIGIN SKEW CLIENT ...
        if client.startswith(marker) and client not in first:
            first[client] = datetime.fromisoformat(fields[0].decode()).timestamp()
    return first


def peer_lines(path: Path, marker: bytes) -> int:
    """How many records of `marker` clients this log took in from peers (any verdict)."""
    needle = b" < b'AT "
    count = 0
    for raw in path.read_bytes().splitlines():
        if b" peer " in raw and needle in raw and b" " + marker in raw:
            count += 1
    return count


def percentile(values: list[float], share: float) -> float:
    """The `share` (0..1) percentile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]
