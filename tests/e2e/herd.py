"""Drive real `python -m herd_trio` processes over TCP on 127.0.0.1, as telnet does.

Nothing here sleeps to synchronise: every wait polls a condition under a deadline
and fails with a message naming what never happened.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TypeVar

import attrs
import pytest
import trio

from bench.procs import free_ports as free_ports  # re-exported for the tests
from herd_trio import config

# The default herd's talk relations (PROTOCOL.md §5).
DEFAULT_EDGES = [
    ("Clark", "Jaquez"),
    ("Clark", "Bona"),
    ("Campbell", "Bailey"),
    ("Campbell", "Bona"),
    ("Campbell", "Jaquez"),
    ("Bona", "Bailey"),
]
DEFAULT_NAMES = ["Bailey", "Bona", "Campbell", "Clark", "Jaquez"]
# Where the map draws the default herd's servers (as the built-in config has them).
DEFAULT_LOCATIONS = {
    name: server.location
    for name, server in config.load().servers.items()
    if server.location is not None
}
POLL = 0.01  # seconds between polls of a condition
T = TypeVar("T")


def neighbours_of(edges: Iterable[tuple[str, str]], name: str) -> list[str]:
    """Everyone `name` shares an edge with."""
    return sorted({b for a, b in edges if a == name} | {a for a, b in edges if b == name})


def reachable(edges: Iterable[tuple[str, str]], start: str, alive: set[str]) -> set[str]:
    """The servers in `alive` connected to `start` through servers in `alive`."""
    edges = list(edges)
    seen, todo = {start}, [start]
    while todo:
        for other in neighbours_of(edges, todo.pop()):
            if other in alive and other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


async def poll(what: str, check: Callable[[], Awaitable[T | None]], *, deadline: float = 10.0) -> T:
    """Call `check` until it returns a value other than None; fail after `deadline`."""
    with trio.move_on_after(deadline):
        while True:
            result = await check()
            if result is not None:
                return result
            await trio.sleep(POLL)
    raise AssertionError(f"within {deadline} s: {what}")


async def connect(port: int, *, deadline: float = 5.0) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:`port`, retried while the server is starting."""

    async def attempt() -> trio.SocketStream | None:
        try:
            return await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return None

    return await poll(f"connect to port {port}", attempt, deadline=deadline)


async def read_until_close(stream: trio.abc.ReceiveStream, *, deadline: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = bytearray()
    with trio.fail_after(deadline):
        while chunk := await stream.receive_some():
            data += chunk
    return bytes(data)


async def exchange(port: int, payload: bytes, *, deadline: float = 10.0) -> bytes:
    """Send `payload`, half-close, and return all the server answered before closing."""
    async with await connect(port) as stream:
        await stream.send_all(payload)
        await stream.send_eof()
        return await read_until_close(stream, deadline=deadline)


class Session:
    """A persistent client connection (like `telnet localhost PORT`)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def read_until(self, terminator: bytes, *, deadline: float = 10.0) -> bytes:
        """Bytes up to and including the first `terminator`."""
        with trio.fail_after(deadline):
            while (end := self.buffer.find(terminator)) < 0:
                chunk = await self.stream.receive_some()
                if not chunk:
                    raise AssertionError(f"connection closed; got {bytes(self.buffer)!r}")
                self.buffer += chunk
        reply = bytes(self.buffer[: end + len(terminator)])
        del self.buffer[: end + len(terminator)]
        return reply

    async def line(self, request: bytes) -> bytes:
        """Send one line and read a one-line reply (AT or `?`)."""
        await self.stream.send_all(request + b"\r\n")
        return await self.read_until(b"\n")

    async def whatsat(self, request: bytes) -> bytes:
        """Send a WHATSAT line; the whole reply (AT line, JSON, blank line) or a `?` line."""
        await self.stream.send_all(request + b"\r\n")
        first = await self.read_until(b"\n")
        if first.startswith(b"?"):
            return first
        return first + await self.read_until(b"\n\n")


@attrs.define(eq=False)
class Herd:
    """A herd of server processes described by a config file the test wrote."""

    root: Path
    names: list[str]
    edges: list[tuple[str, str]]
    ports: dict[str, int]
    peer_ports: dict[str, int]
    extra: dict[str, object] = attrs.field(factory=dict)
    admin_ports: dict[str, int] = attrs.field(factory=dict)  # empty: no admin listeners
    processes: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)

    @classmethod
    def create(
        cls,
        root: Path,
        names: list[str] | None = None,
        edges: list[tuple[str, str]] | None = None,
        **settings: object,
    ) -> Herd:
        """A herd config on free loopback ports (default: the default herd's graph)."""
        names = names or DEFAULT_NAMES
        ports = free_ports(2 * len(names))
        herd = cls(
            root,
            names,
            DEFAULT_EDGES if edges is None else edges,
            dict(zip(names, ports[: len(names)], strict=True)),
            dict(zip(names, ports[len(names) :], strict=True)),
            settings,
        )
        herd.write_config()
        return herd

    @property
    def config(self) -> Path:
        """The config file."""
        return self.root / "herd.toml"

    def log(self, name: str) -> Path:
        """Server `name`'s log file."""
        return self.root / "logs" / f"{name}.log"

    def write_config(self, path: Path | None = None, **overrides: object) -> Path:
        """Write the TOML file (log_dir relative to it, as PROTOCOL.md §5 wants).

        `path` (default: `config`) and `overrides` of the `[herd]` settings give one
        process its own variant of the herd's config (its own keyring or certificate);
        keep `path` in `root` so every process logs to the same `logs` folder.
        """
        path = self.config if path is None else path
        lines = ["[herd]", 'log_dir = "logs"', "heartbeat_interval = 0.2"]
        settings = {**self.extra, **overrides}
        lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
        for name in self.names:
            # List each edge once, on one end only: relations are symmetric.
            listed = [b for a, b in self.edges if a == name]
            lines += [
                "",
                f"[servers.{name}]",
                f"port = {self.ports[name]}",
                f"peer_port = {self.peer_ports[name]}",
                f"neighbours = {_toml(listed)}",
            ]
            if name in self.admin_ports:
                index = self.names.index(name)
                where = DEFAULT_LOCATIONS.get(name, f"+34.07{index}-118.44{index}")
                lines += [f"admin_port = {self.admin_ports[name]}", f'location = "{where}"']
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, name: str, *args: str, config: Path | None = None) -> subprocess.Popen[bytes]:
        """Launch server `name` as `python -m herd_trio NAME --config FILE`.

        `config`: another config file for this one process (see `write_config`).
        """
        if (old := self.processes.get(name)) is not None:
            assert old.poll() is not None, f"{name} is still running"
            if old.stderr is not None:
                old.stderr.close()
        config = self.config if config is None else config
        process = subprocess.Popen(
            [sys.executable, "-m", "herd_trio", name, "--config", str(config), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.root.anchor,  # any working directory must do
        )
        self.processes[name] = process
        return process

    async def start_all(self, *args: str) -> None:
        """Start every server and wait until each accepts and all links are up."""
        for name in self.names:
            self.start(name, *args)
        for name in self.names:
            await (await connect(self.ports[name])).aclose()
        await self.wait_linked()

    async def wait_linked(self, names: Iterable[str] | None = None) -> None:
        """Wait until each of `names` (default: all running) logs its links up."""
        names = list(names or [n for n in self.names if self.running(n)])
        for name in names:
            expected = [n for n in neighbours_of(self.edges, name) if n in names]
            try:
                # start-up of several servers on a busy 2-core machine: generous
                await poll(f"{name} linked to {expected}", partial(self._linked, name, expected),
                           deadline=20.0)  # fmt: skip
            except AssertionError as exc:
                raise AssertionError(f"{exc}; its log says:\n{self._link_story(name)}") from None

    def _link_story(self, name: str) -> str:
        """The lines of `name`'s log about its links (for a failure message)."""
        text = self.log(name).read_text() if self.log(name).exists() else "(no log)"
        lines = [ln for ln in text.splitlines() if " link " in ln or " listening " in ln]
        return "\n".join(lines[-30:])

    async def _linked(self, name: str, peers: list[str]) -> bool | None:
        await trio.lowlevel.checkpoint()
        text = self.log(name).read_text() if self.log(name).exists() else ""
        state: dict[str, bool] = {}
        for line in text.splitlines():
            if " listening for clients on " in line:
                state.clear()  # the server (re)started: links from a past run are gone
            for peer in peers:
                for verb in ("to", "from"):
                    if f" link {verb} {peer} up" in line:
                        state[peer] = True
                    elif f" link {verb} {peer} dropped" in line:
                        state[peer] = False
        return True if all(state.get(peer) for peer in peers) else None

    async def wait_logged(self, name: str, text: str, *, deadline: float = 5.0) -> str:
        """Wait until server `name`'s log contains `text`; the whole log."""

        async def check() -> str | None:
            await trio.lowlevel.checkpoint()
            log = self.log(name)
            content = log.read_text() if log.exists() else ""
            return content if text in content else None

        return await poll(f"{name} logs {text!r}", check, deadline=deadline)

    def with_admin(self) -> Herd:
        """Give every server an admin port (free now, on 127.0.0.1) and a location."""
        taken = set(self.ports.values()) | set(self.peer_ports.values())
        free = [port for port in free_ports(2 * len(self.names)) if port not in taken]
        self.admin_ports = dict(zip(self.names, free, strict=False))
        self.write_config()
        return self

    def admin_url(self, name: str) -> str:
        """Server `name`'s admin listener."""
        return f"http://127.0.0.1:{self.admin_ports[name]}"

    def running(self, name: str) -> bool:
        """True if server `name` was started and has not exited."""
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to server `name` and wait for it to exit; its exit status."""
        process = self.processes[name]
        process.send_signal(sig)
        return process.wait(timeout=10)

    def stop_all(self) -> None:
        """SIGTERM every running server, SIGKILL stragglers; close the pipes.

        Fails if any server logged an internal error (a bug caught at a connection).
        """
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()
        for name in self.names:
            log = self.log(name)
            if log.exists():
                assert "internal error" not in log.read_text(), f"{name}: {log.read_text()}"

    async def session(self, name: str) -> Session:
        """A persistent connection to server `name`'s client port."""
        return Session(await connect(self.ports[name]))

    async def iamat(self, name: str, client: bytes, coords: bytes, when: bytes) -> bytes:
        """Send an IAMAT to `name` on a new connection; the AT reply line."""
        reply = await exchange(self.ports[name], b"IAMAT %s %s %s\n" % (client, coords, when))
        assert reply.count(b"\n") == 1, reply
        assert reply.endswith(b"\n"), reply
        return reply

    async def whatsat(
        self, name: str, client: bytes, radius: bytes = b"10", bound: bytes = b"3"
    ) -> bytes:
        """Send a WHATSAT to `name` on a new connection; the whole reply."""
        return await exchange(self.ports[name], b"WHATSAT %s %s %s\n" % (client, radius, bound))

    async def wait_for(
        self, name: str, client: bytes, at_line: bytes, *, deadline: float = 10.0
    ) -> None:
        """Poll `name` with WHATSAT until its stored line for `client` is `at_line`."""

        async def check() -> bool | None:
            reply = await self.whatsat(name, client, b"1", b"0")
            return True if reply.split(b"\n", 1)[0] + b"\n" == at_line else None

        await poll(f"{name} holds {at_line!r}", check, deadline=deadline)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


@contextmanager
def running(herd: Herd) -> Iterator[Herd]:
    """Stop the herd's processes however the block ends."""
    try:
        yield herd
    finally:
        herd.stop_all()


# The programs some tests drive as a user would, and the Debian package of each.
PROGRAM_PACKAGES = {"telnet": "telnet", "nc": "netcat-openbsd", "lsof": "lsof"}
# Set to 1 (CI does) to turn "program not installed" skips into failures.
REQUIRE_ALL = "HERD_REQUIRE_ALL"


def require_program(*names: str) -> None:
    """Skip the calling test unless every program in `names` is on PATH.

    The reason names the Debian package to install. With HERD_REQUIRE_ALL=1 in the
    environment the test fails instead, so a CI machine that lost a program cannot go
    green by skipping the tests that need it.
    """
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    packages = " ".join(PROGRAM_PACKAGES.get(name, name) for name in missing)
    reason = (
        f"needs {', '.join(missing)}: apt-get install {packages}"
        " (all of them: apt-get install telnet netcat-openbsd lsof)"
    )
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ALL}=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def pids_listening(port: int) -> list[int]:
    """`lsof -ti:PORT`, as an operator would run it."""
    result = subprocess.run(["lsof", f"-ti:{port}"], capture_output=True, check=False)
    return [int(pid) for pid in result.stdout.split()]


def kill_pids(pids: Iterable[int]) -> None:
    """`kill PID...` (SIGTERM), ignoring processes that are already gone."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m herd_trio ARGS`, expected to exit by itself (within 30 s)."""
    return subprocess.run(
        [sys.executable, "-m", "herd_trio", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        check=False,
        env=env,
    )
