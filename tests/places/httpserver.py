"""A scripted HTTP/1.1 server on 127.0.0.1 for tests: records requests, replies as told.

Real sockets, real HTTP (h11, which httpx already depends on), keep-alive, bodies by
Content-Length or chunked. It runs as a task in the test's event loop, so a scripted
delay is a `trio.sleep` and a test that ends cancels it. The script (`Script`: what to
answer, what was asked) is shared with `mockapi.MockAPI`, the same fake without sockets
for tests under `MockClock`. Usage:

    server = await start_fake_http(nursery)  # or: await nursery.start(server.serve)
    server.respond = lambda request: Reply(200, {"places": []})
    ...  # point the code under test at server.url ("http://127.0.0.1:PORT")
    assert server.requests[0].path == "/v1/places:searchNearby"

`respond` sees each request (already recorded) and picks its reply, so one server can
answer different requests differently. The end-to-end tests can start it the same way
and hand `server.url` to a herd subprocess as `places_url`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any, NoReturn

import attrs
import h11
import trio

MAX_RECEIVE = 65536


@attrs.frozen
class Recorded:
    """One request as the server received it."""

    method: str
    path: str  # the target before any "?", as sent (not percent-decoded)
    query: str  # the raw query string after "?", "" when there is none
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value), in order received
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of header `name` (any case), or None; the last one if repeated."""
        found = [value for key, value in self.headers if key == name.lower()]
        return found[-1] if found else None

    def json(self) -> dict[str, Any]:
        """The body parsed as a JSON object."""
        body = json.loads(self.body)
        assert isinstance(body, dict), body
        return body


@attrs.frozen
class Reply:
    """What to answer: a status, a body (bytes as is, anything else as JSON), a delay."""

    status: int = 200
    body: Any = b"{}"
    delay: float = 0.0  # seconds (trio time) to wait before replying
    hold: trio.Event | None = None  # then, if given, wait until it is set
    drop: bool = False  # close the connection instead of replying (after the waiting)
    content_type: str = "application/json; charset=UTF-8"

    def encoded(self) -> bytes:
        """The body's bytes."""
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


@attrs.define(eq=False)
class Script:
    """What a fake API answers, and a record of what it was asked and how busy it got."""

    respond: Callable[[Recorded], Reply] = attrs.field(default=lambda _: Reply())
    requests: list[Recorded] = attrs.field(factory=list)
    in_flight: int = 0  # requests received and not yet answered
    peak_in_flight: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def reply_always(self, reply: Reply) -> None:
        """Answer every request from now on with `reply`."""
        self.respond = lambda _: reply

    async def wait_requests(self, count: int) -> None:
        """Block until at least `count` requests have been recorded; always checkpoints."""
        await trio.lowlevel.checkpoint()
        while len(self.requests) < count:
            await self._changed.wait()

    async def take(self, request: Recorded) -> Reply:
        """Record `request` and wait out its reply's delay and hold; then the reply.

        Counts the request in flight from here until the caller calls `answered()`.
        """
        self.requests.append(request)
        self._changed.set()
        self._changed = trio.Event()
        reply = self.respond(request)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        await trio.sleep(reply.delay)
        if reply.hold is not None:
            await reply.hold.wait()
        return reply

    def answered(self) -> None:
        """The request `take` returned for has been answered (or given up on)."""
        self.in_flight -= 1


@attrs.define(eq=False)
class FakeHTTPServer(Script):
    """The state of a running HTTP server: its address, script and record."""

    port: int = 0
    connections: int = 0  # TCP connections accepted so far

    @property
    def url(self) -> str:
        """The base URL, "http://127.0.0.1:PORT" (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Serve on 127.0.0.1, a free port, until cancelled; `started()` once it accepts."""
        async with trio.open_nursery() as nursery:
            listeners: list[trio.SocketListener] = await nursery.start(
                partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()
            await trio.sleep_forever()

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection: requests in order until either side closes."""
        await trio.lowlevel.checkpoint()  # so every way out has one (flake8-async ASYNC910)
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while (request := await _receive_request(conn, stream)) is not None:
                try:
                    reply = await self.take(request)
                    if reply.drop:
                        return
                    await stream.send_all(_response_bytes(conn, reply))
                finally:
                    self.answered()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return  # the client went away (a timeout, a cancelled call): not our problem


async def _receive_request(conn: h11.Connection, stream: trio.abc.Stream) -> Recorded | None:
    """The next complete request on `conn`, or None once the client has closed.

    Always checkpoints, also when the request was already buffered (keep-alive).
    """
    await trio.lowlevel.checkpoint()
    parts = _RequestParts()
    while not parts.advance(conn):
        conn.receive_data(bytes(await stream.receive_some(MAX_RECEIVE)))
    return parts.request


@attrs.define
class _RequestParts:
    """A request's head and body as h11 hands them over, event by event."""

    head: h11.Request | None = None
    body: bytearray = attrs.field(factory=bytearray)
    request: Recorded | None = None  # once complete; stays None if the client closed

    def advance(self, conn: h11.Connection) -> bool:
        """Consume buffered events; True once the request is complete or the client closed."""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.Request):
                self.head = event
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                head = self.head
                assert head is not None
                path, _, query = head.target.decode("ascii").partition("?")
                headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers)
                method = head.method.decode("ascii")
                self.request = Recorded(method, path, query, headers, bytes(self.body))
                return True
            else:  # ConnectionClosed, or PAUSED after a client that closed mid-cycle
                return True


def _response_bytes(conn: h11.Connection, reply: Reply) -> bytes:
    body = reply.encoded()
    headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(body)))]
    return b"".join(
        (
            conn.send(h11.Response(status_code=reply.status, headers=headers)) or b"",
            conn.send(h11.Data(data=body)) or b"",
            conn.send(h11.EndOfMessage()) or b"",
        )
    )


async def start_fake_http(nursery: trio.Nursery) -> FakeHTTPServer:
    """Start a FakeHTTPServer in `nursery` (a test's); it serves until that is cancelled."""
    server = FakeHTTPServer()
    await nursery.start(server.serve)
    return server


async def unused_port() -> int:
    """A loopback port nobody listens on (bound, then closed: connecting is refused)."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
