"""A scripted Google stand-in as an `httpx.MockTransport`: no sockets, virtual time.

The same `Script` as the real HTTP server in httpserver.py (what to answer, what was
asked), served inside httpx: requests never leave the test's event loop, so a reply's
delay is a `trio.sleep` that `MockClock` can jump over, and tests can assert exact
virtual times. Usage:

    api = MockAPI()
    api.reply_always(Reply(200, {"places": []}, delay=2))
    async with open_google(herd, transport=api.transport()) as places: ...
    assert api.requests[0].path == "/v1/places:searchNearby"

What it cannot show (connections, keep-alive, bytes on a real wire) stays with the
tests against httpserver.py.
"""

from __future__ import annotations

import attrs
import httpx

from .httpserver import Recorded, Script

# What httpx's own transport raises for a server that closes without answering.
DROPPED = "Server disconnected without sending a response."


@attrs.define(eq=False)
class MockAPI(Script):
    """A Script answered through httpx.MockTransport."""

    def transport(self) -> httpx.MockTransport:
        """A transport for `httpx.AsyncClient` that answers from this script."""
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        """Record `request`, wait as the script says, then answer (or drop) it."""
        path, _, query = request.url.raw_path.decode("ascii").partition("?")
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in request.headers.raw
        )
        recorded = Recorded(request.method, path, query, headers, await request.aread())
        try:
            reply = await self.take(recorded)
            if reply.drop:
                raise httpx.RemoteProtocolError(DROPPED, request=request)
            return httpx.Response(
                reply.status, content=reply.encoded(), headers={"Content-Type": reply.content_type}
            )
        finally:
            self.answered()
