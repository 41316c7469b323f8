"""The admin port (PROTOCOL.md §6): health, readiness, metrics, state, live events, the map.

A small hand-written ASGI app served by hypercorn's trio `serve()`, started by the
server's `serve()` with `nursery.start` and stopped by cancellation with it. GET only
(and `POST /reload`, which re-reads the config like SIGHUP), no request bodies,
headers capped by hypercorn (ADMIN_MAX_HEADER), idle connections closed after
ADMIN_KEEP_ALIVE. Off loopback every path but /healthz needs
`Authorization: Bearer <token>` (the token from `admin_token_env`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from functools import partial
from importlib import resources
from typing import Any, NoReturn, cast
from urllib.parse import parse_qs

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from herd_trio.config import ConfigError, HerdConfig
from herd_trio.events import EventHub
from herd_trio.metrics import metrics_registry, render_metrics
from herd_trio.net import shut_connections
from herd_trio.stats import Event, Stats
from herd_trio.store import Store
from herd_trio.view import ServerView, admin_url, herd_layout

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ADMIN_MAX_HEADER = 8192  # bytes of request line and headers; the admin port takes no bodies
ADMIN_KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection stays open
ADMIN_READ_TIMEOUT = 10  # seconds a started request may take to arrive (slowloris)
SSE_KEEPALIVE = 15.0  # seconds between comment lines on a quiet /events stream
SSE_RETRY_MS = 1000  # how soon a browser reconnects a dropped /events stream
SSE_SEND_STALL = 10.0  # seconds an /events write may wait on a reader before it is cut off
STATIC = re.compile(r"/static/((?:vendor/)?[A-Za-z0-9_.-]+\.(?:js|css|json|html))")
CONTENT_TYPES = {
    "js": b"text/javascript; charset=utf-8",
    "css": b"text/css; charset=utf-8",
    "json": b"application/json",
    "html": b"text/html; charset=utf-8",
}
# The map page may ask other servers' admin ports (another origin: another port).
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
]
CSP = b"default-src 'self'; img-src 'self' data:; connect-src 'self' http://127.0.0.1:* http://localhost:*"


def _static_file(path: str) -> bytes | None:
    """A packaged file under herd_trio/web/static, or None (names are checked by STATIC)."""
    node = resources.files("herd_trio").joinpath("web", "static", *path.split("/"))
    try:
        return node.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


@attrs.define(eq=False)
class AdminApp:
    """The ASGI app of one server's admin port."""

    view: ServerView
    hub: EventHub
    token: str | None = None  # None: loopback, no token asked
    origins: frozenset[str] = frozenset()  # other servers' admin URLs (CORS)
    send_stall: float = SSE_SEND_STALL
    reload: Callable[[], dict[str, Any]] | None = None  # POST /reload; None: 404
    registry: CollectorRegistry = attrs.field(init=False)

    @registry.default
    def _registry(self) -> CollectorRegistry:
        return metrics_registry(self.view)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one ASGI connection scope."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not offered; hypercorn closes the connection
        headers = dict(scope["headers"])
        extra = self._cors(headers)
        path, method = scope["path"], scope["method"]
        if sum(len(k) + len(v) for k, v in scope["headers"]) > ADMIN_MAX_HEADER:
            # h11 caps only headers that arrive in pieces; one big read gets through it
            await _respond(send, 431, b"headers too large\n", extra=extra)
            return
        reloading = path == "/reload" and self.reload is not None
        if method not in (("POST",) if reloading else ("GET", "HEAD")):
            allow, only = (b"POST", b"POST only\n") if reloading else (b"GET, HEAD", b"GET only\n")
            await _respond(send, 405, only, extra=[(b"allow", allow), *extra])
            return
        if headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in (
            headers
        ):
            await _respond(send, 413, b"no request bodies here\n", extra=extra)
            return
        if path != "/healthz" and not self._authorised(headers):
            challenge = [(b"www-authenticate", b'Bearer realm="herd"'), *extra]
            await _respond(send, 401, b"bearer token required\n", extra=challenge)
            return
        if path == "/events":
            await self._events(receive, _StallWatch(send), extra, _connection(scope))
            return
        if reloading and self.reload is not None:
            done = self.reload()
            await _respond(send, 200 if done["ok"] else 400, _json(done), b"application/json")
            return
        status, body, kind = self._route(path, scope.get("query_string", b""))
        await _respond(send, status, b"" if method == "HEAD" else body, kind, extra)

    def _route(self, path: str, query: bytes) -> tuple[int, bytes, bytes]:
        view = self.view
        if path == "/healthz":
            return 200, b"ok\n", b"text/plain; charset=utf-8"
        if path == "/readyz":
            all_links = parse_qs(query.decode("latin-1")).get("links") == ["all"]
            ready, body = view.readiness(all_links)
            return 200 if ready else 503, _json(body), b"application/json"
        if path == "/metrics":
            return 200, render_metrics(self.registry), CONTENT_TYPE_LATEST.encode()
        if path == "/state":
            return 200, _json(view.state()), b"application/json"
        if path == "/clients":
            return 200, _json(view.clients()), b"application/json"
        if path in ("/", "/index.html"):
            path = "/static/index.html"
        if (match := STATIC.fullmatch(path)) and (data := _static_file(match[1])) is not None:
            return 200, data, CONTENT_TYPES[match[1].rpartition(".")[2]]
        return 404, b"not found\n", b"text/plain; charset=utf-8"

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        if self.token is None:
            return True
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + self.token.encode())

    def _cors(self, headers: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        origin = headers.get(b"origin")
        if self.token is None and origin is not None and origin.decode("latin-1") in self.origins:
            return [(b"access-control-allow-origin", origin), (b"vary", b"origin")]
        return []

    async def _events(
        self,
        receive: Receive,
        send: _StallWatch,
        extra: list[tuple[bytes, bytes]],
        connection: tuple[int, tuple[str, int]] | None,
    ) -> None:
        """Stream events until the reader leaves, falls behind, or the server stops.

        A reader that stops reading is cut off: the hub stops queueing for it after
        SUBSCRIBER_BUFFER events, and a write that waits longer than `send_stall` on
        its full socket gets the connection shut down (hypercorn's writes have no
        deadline of their own), so no reader holds a task or the server's exit.
        """
        gone = False

        async def watch_disconnect() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            nursery.cancel_scope.cancel()

        async def watch_stall() -> None:
            while True:
                since = await send.writing()
                await trio.sleep_until(since + self.send_stall)
                if send.since == since and connection is not None:  # that write still waits
                    shut_connections(*connection)
                    return

        # Subscribed before the hello goes out, so a reader that reloads the picture
        # on hello misses nothing.
        with self.hub.subscribe() as events:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_disconnect)
                nursery.start_soon(watch_stall)
                headers = [(b"content-type", b"text/event-stream"), *SECURITY_HEADERS, *extra]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                hello = _sse({"type": "hello", "server": self.view.name})
                await send(_chunk(b"retry: %d\n\n" % SSE_RETRY_MS + hello))
                await _stream(events, send)
                nursery.cancel_scope.cancel()
        if not gone:  # dropped as too slow: end the response; the browser reconnects
            await send({"type": "http.response.body", "body": b"", "more_body": False})


@attrs.define(eq=False)
class _StallWatch:
    """An ASGI `send` that remembers since when its current write has been waiting."""

    send: Send
    since: float | None = None  # when the write in progress began
    _started: trio.Event = attrs.field(factory=trio.Event)

    async def __call__(self, message: Message) -> None:
        self.since = trio.current_time()
        self._started.set()
        try:
            await self.send(message)
        finally:
            self.since, self._started = None, trio.Event()

    async def writing(self) -> float:
        """Wait for a write to be in progress; when it began. Always checkpoints."""
        await trio.lowlevel.checkpoint()
        while self.since is None:
            await self._started.wait()  # the write may be over again when we run: recheck
        return self.since


def _connection(scope: Scope) -> tuple[int, tuple[str, int]] | None:
    """(local port, remote address) of the request's connection, if the server says."""
    server, client = scope.get("server"), scope.get("client")
    if not server or not client:
        return None
    return int(server[1]), (str(client[0]), int(client[1]))


async def _stream(events: trio.MemoryReceiveChannel[Event], send: _StallWatch) -> None:
    """Send events as they come, a comment line when quiet; return when the hub drops us."""
    while True:
        with trio.move_on_after(SSE_KEEPALIVE) as quiet:
            try:
                event = await events.receive()
            except trio.EndOfChannel:
                return
        await send(_chunk(b": keep-alive\n\n" if quiet.cancelled_caught else _sse(event)))


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _json(body: object) -> bytes:
    return json.dumps(body, indent=1).encode() + b"\n"


def _sse(event: object) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def _chunk(data: bytes) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True}


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    kind: bytes = b"text/plain; charset=utf-8",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", kind), (b"content-length", b"%d" % len(body)), *SECURITY_HEADERS]
    if kind.startswith(b"text/html"):
        headers.append((b"content-security-policy", CSP))
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})


def admin_token(herd: HerdConfig, name: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Server `name`'s admin bearer token from `admin_token_env`; ConfigError if unset."""
    env = herd.servers[name].admin_token_env
    if env is None:
        return None
    if not (value := environ.get(env)):
        raise ConfigError(f"${env} is not set", field=f"servers.{name}.admin_token_env")
    return value


def admin_app(
    name: str,
    herd: HerdConfig,
    stats: Stats,
    store: Store,
    version: str,
    token: str | None,
    places: object = None,
    *,
    reload: Callable[[], dict[str, Any]] | None = None,
) -> tuple[AdminApp, str, int] | None:
    """The admin app of server `name` and where it listens, or None without admin_port.

    `places` is the server's places source, for /readyz (see places.readiness).
    `reload`, if given, answers `POST /reload` (see herd_trio/reconfig.py).
    """
    cfg = herd.servers[name]
    if cfg.admin_port is None:
        return None
    layout = tuple(herd_layout(herd))
    neighbours = tuple(herd.neighbours(name))
    view = ServerView(name, version, stats, store, neighbours, layout, places)
    origins = frozenset(
        url
        for server in herd.servers.values()
        if server.admin_port
        for url in (
            admin_url(server.admin_host, server.admin_port),
            admin_url("localhost", server.admin_port),
        )
    )
    app = AdminApp(view, EventHub(), token, origins, reload=reload)
    return app, cfg.admin_host, cfg.admin_port


def reconfigured(app: AdminApp, name: str, herd: HerdConfig) -> None:
    """After a reload: /state, /readyz and the metrics count server `name`'s new links."""
    app.view.neighbours = tuple(herd.neighbours(name))
    app.view.layout = tuple(herd_layout(herd))


def _asgi(app: AdminApp) -> ASGIFramework:
    # The app takes plain mappings; hypercorn's types name a TypedDict per message.
    return cast("ASGIFramework", app)


def hypercorn_config(host: str, port: int) -> Config:
    """Hypercorn's settings for an admin listener: limits, timeouts, no logging of its own."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("herd_trio.admin")  # into the server logs
    config.h11_max_incomplete_size = ADMIN_MAX_HEADER
    config.keep_alive_timeout = ADMIN_KEEP_ALIVE
    config.read_timeout = ADMIN_READ_TIMEOUT
    config.include_server_header = False
    config.alpn_protocols = ["http/1.1"]
    return config


async def serve(
    app: AdminApp,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve `app` on `host:port` until cancelled; report the bound port once it accepts.

    OSError (a port in use) escapes before `started()`. The hub's subscriptions are
    made by the store and stats of the app's view for the block's duration only.
    """
    app.view.store.on_change(app.hub.record_kept)
    app.view.stats.watchers.append(app.hub.publish)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn_serve, _asgi(app), hypercorn_config(host, port))
        )
        bound = int(binds[0].rpartition(":")[2])
        task_status.started(bound)
        try:
            await trio.sleep_forever()
        finally:
            # hypercorn waits for its connections, and a write to a reader that does not
            # read waits forever (shielded): shut them all so a stop takes no longer.
            shut_connections(bound)
    raise AssertionError("unreachable")  # pragma: no cover
