"""One herd server: its client port, its peer port, its links, its store.

`serve()` owns the server's nursery: the client listener, the peer listener, one
supervised task per neighbour this server dials, and the log flusher. Everything a
connection does is answered from the store; WHATSAT also asks the places source.
"""

from __future__ import annotations

import contextlib
import errno
import re
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NoReturn

import attrs
import trio

from herd_trio import links
from herd_trio.auth import Keyring
from herd_trio.bus import Bus
from herd_trio.config import HerdConfig, ServerConfig, Settings
from herd_trio.lines import LineReader, LineTooLong
from herd_trio.log import RateLimiter, ServerLog
from herd_trio.persist import PersistError, open_persister, state_path
from herd_trio.places import JSON, PlacesSource, error_body, legacy_body, render
from herd_trio.protocol import (
    Iamat,
    ProtocolError,
    Whatsat,
    make_record,
    parse_command,
    question,
)
from herd_trio.security import PeerSecurity
from herd_trio.store import Store
from herd_trio.tls import TlsContexts

# A browser or scanner that talks HTTP to a client port gets its `?` and is closed
# at once rather than answered header by header.
HTTP_REQUEST = re.compile(rb"[A-Z]{3,10} \S+ HTTP/[0-9]")
FAIR_SHARE = 64  # lines answered before a pipelining client yields to the others
HANDOFF_DEADLINE = 0.05  # seconds a reply may wait for its update to reach the links
# Errors that end one client connection and nothing else.
CLIENT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError)


class StartupError(Exception):
    """A server could not start (a port in use, a log file it cannot open)."""


@attrs.define(eq=False)
class Server:
    """The state one server's tasks share; `serve()` runs it. Constructing it reads
    nothing: the caller loads `security` and sizes `max_clients` (see __main__)."""

    name: str
    herd: HerdConfig
    places: PlacesSource
    log: ServerLog
    security: PeerSecurity = attrs.field(factory=PeerSecurity, kw_only=True)
    max_clients: int = attrs.field(
        default=attrs.Factory(lambda self: self.herd.herd.max_clients, takes_self=True),
        kw_only=True,
    )
    store: Store = attrs.field(factory=Store)
    bus: Bus = attrs.field(factory=Bus)
    now_ns: Callable[[], int] = time.time_ns  # wall clock for AT time differences
    accepted: dict[str, trio.CancelScope] = attrs.field(factory=dict, init=False)
    refusals: RateLimiter = attrs.field(factory=RateLimiter, init=False)  # peer log lines
    clients: int = attrs.field(default=0, init=False)  # open client connections
    addresses: dict[str, int] = attrs.field(factory=dict, init=False)  # open ones per address
    wire_name: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.wire_name = self.name.encode("ascii")

    @property
    def keyring(self) -> Keyring | None:
        """Peer secrets; None: peers are accepted from loopback only."""
        return self.security.keyring

    @property
    def tls(self) -> TlsContexts | None:
        """Mutual TLS contexts for peer links; None: plain TCP."""
        return self.security.tls

    @property
    def config(self) -> ServerConfig:
        """This server's own `[servers.NAME]` table."""
        return self.herd.servers[self.name]

    @property
    def settings(self) -> Settings:
        """The herd-wide `[herd]` settings."""
        return self.herd.herd

    def answer_nowait(self, line: bytes, received_ns: int) -> bytes | Whatsat:
        """The reply to one client line, or the WHATSAT still to be answered.

        An accepted IAMAT is handed to the links (published on the bus) before this
        returns, so it is on its way to the neighbours before the client sees the reply.
        """
        try:
            command = parse_command(line)
        except ProtocolError:
            return question(line)
        if isinstance(command, Iamat):
            record = make_record(self.wire_name, received_ns, command)
            held = self.store.get(command.client)
            # PROTOCOL.md: only a strictly higher key is new; a repeat gets the stored line.
            if held is not None and record.rank <= held.rank:
                return held.at_line + b"\n"
            self.store.offer(record)
            self.bus.publish(record)
            return record.at_line + b"\n"
        if self.store.get(command.client) is None:
            return question(line)
        return command

    async def whatsat(self, command: Whatsat) -> bytes:
        """The stored AT line plus the places near it; never later than places_timeout."""
        record = self.store.get(command.client)
        assert record is not None  # records are never removed
        if command.bound == 0:
            body = legacy_body([], "OK")  # PROTOCOL.md: bound 0 makes no outbound call
        else:
            lat, lon = record.lat_lon
            timeout = self.settings.places_timeout
            body = error_body("UNKNOWN_ERROR", f"places source did not answer within {timeout} s")
            with trio.move_on_after(timeout):
                body = await self.places.nearby(lat, lon, command.radius_m, command.bound)
            body = _cap(body, command.bound)
        return record.at_line + b"\n" + render(body) + b"\n\n"


def _cap(body: JSON, bound: int) -> JSON:
    results = body.get("results")
    if isinstance(results, list) and len(results) > bound:
        return {**body, "results": results[:bound]}
    return body


def describe(stream: trio.abc.Stream) -> str:
    """`host:port` of the remote end, for the log."""
    if isinstance(stream, trio.SocketStream):
        try:
            host, port, *_ = stream.socket.getpeername()
        except OSError:
            return "?"
        return f"{host}:{port}"
    return type(stream).__name__


async def handle_client(server: Server, stream: trio.abc.Stream) -> None:
    """Admit one client connection within the limits, then answer it.

    Over `max_clients` open connections (or `max_clients_per_address` from one
    address), a connection is closed at once without a word: the protocol has no
    error reply for it, and a refused client can simply retry. The caller
    (trio.serve_listeners) closes the stream afterwards.
    """
    who = describe(stream)
    address = who.rpartition(":")[0]
    per_address = server.settings.max_clients_per_address
    if server.clients >= server.max_clients:
        server.log.write(f"{who} refused: {server.max_clients} clients already connected")
        return
    if per_address and server.addresses.get(address, 0) >= per_address:
        server.log.write(f"{who} refused: {per_address} connections from {address} already")
        return
    server.clients += 1
    server.addresses[address] = server.addresses.get(address, 0) + 1
    try:
        await answer_client(server, stream, who)
    except Exception as exc:
        # A bug must not let one client take the server and everyone else down: it is
        # logged in full (tests fail on "internal error" in any log) and the connection
        # is closed.
        trace = "".join(traceback.format_exception(exc))
        server.log.write(f"{who} internal error, closing: {trace!r}")
    finally:
        server.clients -= 1
        if (left := server.addresses.pop(address) - 1) > 0:
            server.addresses[address] = left


async def answer_client(server: Server, stream: trio.abc.Stream, who: str) -> None:
    """Answer one client connection, line by line, in order, until EOF or error.

    All lines that arrived together are answered with one write; each reply is whole
    inside it.
    """
    log = server.log
    settings = server.settings
    reader = LineReader(stream, settings.max_line)
    one_shot = settings.one_shot
    deadline = settings.write_deadline

    bus = server.bus
    replies: list[bytes] = []
    flooded = False  # an update among `replies` went to the bus

    async def flush() -> None:
        nonlocal replies, flooded
        if flooded:  # flood first, then reply
            with trio.move_on_after(HANDOFF_DEADLINE):
                await bus.wait_handed_off()
        data, replies, flooded = b"".join(replies), [], False
        with trio.move_on_after(deadline) as scope:  # (fail_after costs a generator here)
            await stream.send_all(data)
        if scope.cancelled_caught:  # a client that never reads is dropped, not buffered
            raise trio.TooSlowError

    log.write(f"{who} connected")
    first = True  # the connection's first line: an HTTP request line ends it
    try:
        while lines := await reader.receive_lines():
            received_ns = server.now_ns()  # when these lines were complete
            # Peer records that became readable in the same poll as these lines are
            # scheduled in this batch too; one checkpoint lets them land in the store
            # first, so a WHATSAT sent after an IAMAT's reply sees that IAMAT.
            if any(b"WHAT" in line for line in lines):
                await trio.lowlevel.cancel_shielded_checkpoint()
            for index, line in enumerate(lines, 1):
                if index % FAIR_SHARE == 0 and replies:
                    await flush()  # a pipelining client must not hold the loop for long
                log.received(who, line)
                if not line.strip():  # bytes.strip() drops exactly the six white-space bytes
                    continue  # blank lines are ignored, also in one_shot mode
                if first and HTTP_REQUEST.match(line):
                    replies.append(question(line))
                    log.sent(who, replies[-1])
                    await flush()
                    log.write(f"{who} sent an HTTP request to the client port; closing")
                    return
                first = False
                published = bus.published
                reply = server.answer_nowait(line, received_ns)
                flooded |= bus.published != published
                if isinstance(reply, Whatsat):
                    if replies:  # earlier answers must not wait for the places source
                        await flush()
                    reply = await server.whatsat(reply)
                log.sent(who, reply)
                replies.append(reply)
                if one_shot:
                    await flush()
                    log.write(f"{who} closed after one reply (one_shot)")
                    return
            if replies:
                await flush()
        log.write(f"{who} closed by the client")
    except LineTooLong as exc:
        log.write(f"{who} sent a line longer than {settings.max_line} bytes, closing: {exc.head!r}")
    except CLIENT_ERRORS as exc:
        log.write(f"{who} dropped: {exc!r}")


async def open_listeners(server: Server, role: str, port: int) -> list[trio.SocketListener]:
    """Listen on `port` of the server's host; StartupError names the port if it can't."""
    host = server.config.host
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or repr(exc)
        message = f"{server.name}: cannot listen for {role}s on {host}:{port}: {reason}"
        raise StartupError(message) from exc


async def serve(
    server: Server, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Run `server` until cancelled; report its client port once both ports accept.

    With `state_dir`, the server's records are loaded before anything is served and
    every record it keeps is written back; the persister closes last, after the
    listeners and links that feed the store, so a clean stop loses nothing.
    """
    cfg, state_dir = server.config, server.settings.state_dir
    async with contextlib.AsyncExitStack() as stack:
        if state_dir is not None:
            path = state_path(state_dir, server.name)
            persister = open_persister(path, server.store, log=server.log.write)
            try:
                await stack.enter_async_context(persister)
            except (OSError, PersistError) as exc:
                message = f"{server.name}: cannot use state file {str(path)!r}: {exc}"
                raise StartupError(message) from exc
            server.log.write(f"{len(server.store)} records loaded from {path}")
        clients = await open_listeners(server, "client", cfg.port)
        stack.push_async_callback(_close_all, clients)  # until serve_listeners owns them
        peers = await open_listeners(server, "peer", cfg.peer_port)
        stack.push_async_callback(_close_all, peers)
        where = f"clients on {cfg.host}:{cfg.port} and peers on {cfg.host}:{cfg.peer_port}"
        server.log.write(f"listening for {where}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.log.run_flusher, name=f"{server.name} log flusher")
            nursery.start_soon(trio.serve_listeners, partial(handle_client, server), clients)
            nursery.start_soon(trio.serve_listeners, partial(links.handle_peer, server), peers)
            for peer in server.herd.neighbours(server.name):
                if links.dials(server.name, peer):
                    name = f"{server.name} link {peer}"
                    nursery.start_soon(links.run_link, server, peer, name=name)
            task_status.started(clients[0].socket.getsockname()[1])
            await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


async def _close_all(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        await trio.aclose_forcefully(listener)


def log_path(herd: HerdConfig, name: str) -> Path:
    """Where server `name` writes its log."""
    return Path(herd.herd.log_dir) / f"{name}.log"
