"""The Google places sources over real HTTP: a server on 127.0.0.1 (httpserver.py).

What only a real wire shows: the request bytes as a server receives them, keep-alive,
a second connection while the first is busy, refused and dropped connections, and the
key in httpx's own log line. Nothing here waits on a timer.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest
import trio

from herd_trio.places import JSON
from herd_trio.places.google import open_google

from .googlekit import (
    FIELD_MASK,
    KEY,
    KINDS,
    LABELS,
    LAT,
    LEGACY_BODY,
    LEGACY_PATH,
    LON,
    NEW_AS_LEGACY,
    NEW_BODY,
    NEW_PATH,
    error,
    herd_for,
    ok_body,
    ordered,
)
from .httpserver import FakeHTTPServer, Recorded, Reply, unused_port
from .mockapi import DROPPED


async def test_new_request_is_a_post_with_key_mask_and_exact_json(
    server: FakeHTTPServer,
) -> None:
    server.reply_always(Reply(200, NEW_BODY))
    async with open_google(herd_for(server.url)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert ordered(answer) == ordered(NEW_AS_LEGACY)  # three places, all within the bound
    [request] = server.requests
    assert (request.method, request.path, request.query) == ("POST", NEW_PATH, "")
    assert request.header("X-Goog-Api-Key") == KEY
    assert request.header("X-Goog-FieldMask") == FIELD_MASK
    assert request.header("Content-Type") == "application/json"
    # Coordinates go out exactly as the client sent them; the radius in metres, as a float.
    assert request.body == (
        b'{"maxResultCount":5,"locationRestriction":{"circle":{"center":'
        b'{"latitude":34.068930,"longitude":-118.445127},"radius":10000.0}}}'
    )


async def test_legacy_request_is_a_get_with_the_documented_query(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, LEGACY_BODY))
    async with open_google(herd_for(server.url, "google-legacy")) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert ordered(answer) == ordered(dict(LEGACY_BODY, results=LEGACY_BODY["results"][:5]))
    [request] = server.requests
    assert (request.method, request.path, request.body) == ("GET", LEGACY_PATH, b"")
    assert request.query == f"location=34.068930,-118.445127&radius=10000&key={KEY}"
    assert request.header("X-Goog-Api-Key") is None
    assert request.header("X-Goog-FieldMask") is None


@pytest.mark.parametrize(("kind", "path"), [("google", NEW_PATH), ("google-legacy", LEGACY_PATH)])
async def test_places_url_path_prefix_is_kept(server: FakeHTTPServer, kind: str, path: str) -> None:
    server.reply_always(Reply(200, ok_body(kind)))
    async with open_google(herd_for(f"{server.url}/proxy/google/", kind)) as places:
        answer = await places.nearby(LAT, LON, 1_500, 1)
    assert answer["status"] == "OK"
    assert len(answer["results"]) == 1
    assert [r.path for r in server.requests] == [f"/proxy/google{path}"]


@pytest.mark.parametrize("kind", KINDS)
async def test_connection_refused_is_unknown_error(kind: str) -> None:
    url = f"http://127.0.0.1:{await unused_port()}"
    async with open_google(herd_for(url, kind)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert list(answer) == ["html_attributions", "results", "status", "error_message"]
    assert (answer["status"], answer["results"]) == ("UNKNOWN_ERROR", [])
    assert answer["error_message"].startswith(f"cannot reach {LABELS[kind]}: ConnectError: ")


@pytest.mark.parametrize("kind", KINDS)
async def test_connection_dropped_without_reply_is_unknown_error(
    server: FakeHTTPServer, kind: str
) -> None:
    server.reply_always(Reply(drop=True))
    async with open_google(herd_for(server.url, kind)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    message = f"cannot reach {LABELS[kind]}: RemoteProtocolError: {DROPPED}"
    assert ordered(answer) == error("UNKNOWN_ERROR", message)


async def test_key_never_appears_in_answers_or_logs(
    server: FakeHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"The provided API key {KEY} is invalid."
    replies = [
        Reply(200, {"error_message": echo, "results": [], "status": "REQUEST_DENIED"}),
        Reply(403, {"error": {"code": 403, "message": echo, "status": "PERMISSION_DENIED"}}),
        Reply(403, {"error_message": echo}),
        Reply(500, b"internal error for key=" + KEY.encode()),
        Reply(200, LEGACY_BODY),
    ]
    answers: list[Any] = []
    for kind in KINDS:
        async with open_google(herd_for(server.url, kind, places_cache_ttl=0)) as places:
            for reply in replies:
                server.reply_always(reply)
                answers.append(await places.nearby(LAT, LON, 10_000, 5))
    refused = f"http://127.0.0.1:{await unused_port()}"
    async with open_google(herd_for(refused, "google-legacy")) as places:
        answers.append(await places.nearby(LAT, LON, 10_000, 5))
    assert len(server.requests) == 2 * len(replies)
    assert KEY in server.requests[len(replies)].query  # it did go out
    assert KEY not in ordered(answers)
    assert KEY not in caplog.text
    # httpx logged the legacy request URL, key redacted; our warnings did too.
    assert "key=[key redacted] " in caplog.text
    redacted = "The provided API key [key redacted] is invalid."
    assert answers[5]["error_message"] == redacted  # legacy's own REQUEST_DENIED
    assert answers[6]["error_message"] == (
        f"{LABELS['google-legacy']} answered HTTP 403: PERMISSION_DENIED: {redacted}"
    )
    assert answers[3]["error_message"] == "Places API (New) answered HTTP 500"  # no body
    assert answers[10]["error_message"].startswith(
        f"cannot reach {LABELS['google-legacy']}: ConnectError: "
    )


async def test_a_busy_connection_does_not_hold_up_another_caller(server: FakeHTTPServer) -> None:
    # The first request is held until the second caller has its answer: if the second
    # call queued behind the first (one connection, or one lock), it would run into
    # its 4.5 s deadline and answer UNKNOWN_ERROR instead.
    release = trio.Event()

    def respond(request: Recorded) -> Reply:
        return Reply(200, NEW_BODY, hold=release if len(server.requests) == 1 else None)

    server.respond = respond
    slow: list[JSON] = []

    async def ask_slow() -> None:
        slow.append(await places.nearby(LAT, LON, 10_000, 5))

    async with open_google(herd_for(server.url)) as places, trio.open_nursery() as nursery:
        nursery.start_soon(ask_slow)
        await server.wait_requests(1)  # the slow call is on the wire
        fast = await places.nearby(Decimal("+34.1"), LON, 10_000, 5)
        assert (slow, server.in_flight) == ([], 1)  # answered while the first is held
        release.set()
    assert fast == slow[0] == NEW_AS_LEGACY
    assert server.connections == 2  # the slow one's connection was busy, so a second one


async def test_connections_are_kept_alive_and_reused(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, NEW_BODY))
    async with open_google(herd_for(server.url)) as places:
        for radius_m in (100, 200, 300):
            await places.nearby(LAT, LON, radius_m, 5)
    assert len(server.requests) == 3
    assert server.connections == 1
