"""The Google places sources against a real HTTP server on 127.0.0.1 (httpserver.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from herd_trio.config import HerdConfig, ServerConfig, Settings
from herd_trio.places import JSON
from herd_trio.places.google import GooglePlaces, open_google, places_deadline

from .httpserver import FakeHTTPServer, Recorded, Reply, start_fake_http, unused_port

FIXTURES = Path(__file__).parent / "fixtures"
KEY_ENV = "HERD_TEST_PLACES_KEY"
KEY = "AIzaSyD-test_0123456789abcdefghijKLMNOPQ"  # shaped like a real key, found nowhere else
LAT, LON = Decimal("+34.068930"), Decimal("-118.445127")  # as parsed from an IAMAT
KINDS = ["google", "google-legacy"]
NEW_PATH = "/v1/places:searchNearby"
LEGACY_PATH = "/maps/api/place/nearbysearch/json"
# Spelled out rather than imported: a change to what we ask Google for (and pay for)
# should show up here.
FIELD_MASK = (
    "places.id,places.displayName,places.location,places.viewport,"
    "places.shortFormattedAddress,places.types,places.businessStatus,places.rating,"
    "places.userRatingCount,places.priceLevel,places.currentOpeningHours.openNow,"
    "places.photos,places.plusCode,places.iconMaskBaseUri,places.iconBackgroundColor"
)


def fixture(name: str) -> JSON:
    body: JSON = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return body


NEW_BODY = fixture("new_searchnearby_westwood.json")
NEW_AS_LEGACY = fixture("legacy_from_new_westwood.json")
LEGACY_BODY = fixture("legacy_nearbysearch_westwood.json")


def ok_body(kind: str) -> JSON:
    return NEW_BODY if kind == "google" else LEGACY_BODY


def herd_for(url: str | None, places: str = "google", **settings: float) -> HerdConfig:
    """A one-server herd whose places source is `places` at `url`."""
    return HerdConfig(
        servers={"Clark": ServerConfig(port=12003, peer_port=12103)},
        herd=Settings(places=places, places_url=url, places_key_env=KEY_ENV, **settings),  # type: ignore[arg-type]  # places: str, not the Literal; msgspec checks at load
    )


def ordered(body: object) -> str:
    """JSON text, so that comparing two bodies also compares their key order."""
    return json.dumps(body, ensure_ascii=False)


@pytest.fixture(autouse=True)
def places_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
async def server(nursery: trio.Nursery) -> FakeHTTPServer:
    return await start_fake_http(nursery)


# -- what goes out ---------------------------------------------------------------------


async def test_new_request_is_a_post_with_key_mask_and_exact_json(
    server: FakeHTTPServer,
) -> None:
    server.reply_always(Reply(200, NEW_BODY))
    async with open_google(herd_for(server.url)) as places:
        await places.nearby(LAT, LON, 10_000, 5)
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
    assert request.json() == {
        "maxResultCount": 5,
        "locationRestriction": {
            "circle": {"center": {"latitude": 34.06893, "longitude": -118.445127}, "radius": 10000}
        },
    }


async def test_legacy_request_is_a_get_with_the_documented_query(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, LEGACY_BODY))
    async with open_google(herd_for(server.url, "google-legacy")) as places:
        await places.nearby(LAT, LON, 10_000, 5)
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
    assert [r.path for r in server.requests] == [f"/proxy/google{path}"]


@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("google", "https://places.googleapis.com/v1/places:searchNearby"),
        ("google-legacy", "https://maps.googleapis.com/maps/api/place/nearbysearch/json"),
    ],
)
async def test_without_places_url_google_hosts_are_used(kind: str, url: str) -> None:
    async with open_google(herd_for(None, kind)) as places:
        assert places.url == url


@pytest.mark.parametrize("kind", KINDS)
async def test_bound_zero_makes_no_call(server: FakeHTTPServer, kind: str) -> None:
    async with open_google(herd_for(server.url, kind)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 0)
    assert ordered(answer) == ordered({"html_attributions": [], "results": [], "status": "OK"})
    assert server.requests == []


# -- what comes back -------------------------------------------------------------------


async def test_new_places_translate_to_exact_legacy_json(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, NEW_BODY))
    async with open_google(herd_for(server.url)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 20)
    assert answer == NEW_AS_LEGACY
    assert ordered(answer) == ordered(NEW_AS_LEGACY)


async def test_new_results_are_trimmed_to_the_bound(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, NEW_BODY))  # three places, though we asked for two
    async with open_google(herd_for(server.url)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 2)
    assert server.requests[0].json()["maxResultCount"] == 2
    assert answer["results"] == NEW_AS_LEGACY["results"][:2]


@pytest.mark.parametrize("body", [{}, {"places": []}])
async def test_new_empty_answer_is_zero_results(server: FakeHTTPServer, body: object) -> None:
    server.reply_always(Reply(200, body))
    async with open_google(herd_for(server.url)) as places:
        answer = await places.nearby(LAT, LON, 50, 3)
    expected = {"html_attributions": [], "results": [], "status": "ZERO_RESULTS"}
    assert ordered(answer) == ordered(expected)


async def test_legacy_passes_through_in_order_trimmed_to_bound(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, LEGACY_BODY))
    async with open_google(herd_for(server.url, "google-legacy")) as places:
        answer = await places.nearby(LAT, LON, 10_000, 2)
    expected = dict(LEGACY_BODY, results=LEGACY_BODY["results"][:2])
    assert list(answer) == ["html_attributions", "next_page_token", "results", "status"]
    assert ordered(answer) == ordered(expected)


@pytest.mark.parametrize(
    "body",
    [
        {
            "error_message": "You must use an API key to authenticate each request.",
            "html_attributions": [],
            "results": [],
            "status": "REQUEST_DENIED",
        },
        {"html_attributions": [], "results": [], "status": "ZERO_RESULTS"},
        {"html_attributions": [], "results": [], "status": "OVER_QUERY_LIMIT"},
    ],
)
async def test_legacy_statuses_pass_through(server: FakeHTTPServer, body: object) -> None:
    server.reply_always(Reply(200, body))
    async with open_google(herd_for(server.url, "google-legacy")) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert ordered(answer) == ordered(body)


# -- failures --------------------------------------------------------------------------

GOOGLE_ERROR = {"error": {"code": 0, "message": "Something is wrong.", "status": "SOMETHING"}}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("code", "status"),
    [
        (400, "INVALID_REQUEST"),
        (401, "REQUEST_DENIED"),
        (403, "REQUEST_DENIED"),
        (429, "OVER_QUERY_LIMIT"),
        (500, "UNKNOWN_ERROR"),
        (503, "UNKNOWN_ERROR"),
        (404, "UNKNOWN_ERROR"),
    ],
)
async def test_http_errors_map_to_legacy_statuses(
    server: FakeHTTPServer, kind: str, code: int, status: str
) -> None:
    server.reply_always(Reply(code, GOOGLE_ERROR))
    async with open_google(herd_for(server.url, kind)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    label = "Places API (New)" if kind == "google" else "Places API (legacy Nearby Search)"
    assert ordered(answer) == ordered(
        {
            "html_attributions": [],
            "results": [],
            "status": status,
            "error_message": f"{label} answered HTTP {code}: SOMETHING: Something is wrong.",
        }
    )


async def test_http_error_without_a_google_body_still_says_what_happened(
    server: FakeHTTPServer,
) -> None:
    server.reply_always(Reply(502, b"<html>Bad Gateway</html>", content_type="text/html"))
    async with open_google(herd_for(server.url)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR"
    assert answer["error_message"] == "Places API (New) answered HTTP 502"


@pytest.mark.parametrize("kind", KINDS)
async def test_timeout_is_unknown_error_before_the_server_deadline(
    server: FakeHTTPServer, kind: str
) -> None:
    server.reply_always(Reply(200, ok_body(kind), delay=5))
    async with open_google(herd_for(server.url, kind, places_timeout=1.0)) as places:
        start = trio.current_time()
        answer = await places.nearby(LAT, LON, 10_000, 5)
        elapsed = trio.current_time() - start
    assert 0.9 <= elapsed < 1.0  # our deadline, inside the server's places_timeout
    assert answer["status"] == "UNKNOWN_ERROR"
    assert answer["results"] == []
    assert "did not answer within 0.9 s" in answer["error_message"]


@pytest.mark.parametrize("kind", KINDS)
async def test_connection_refused_is_unknown_error(kind: str) -> None:
    url = f"http://127.0.0.1:{await unused_port()}"
    async with open_google(herd_for(url, kind)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR"
    assert answer["error_message"].startswith("cannot reach Places API")
    assert "ConnectError" in answer["error_message"]


@pytest.mark.parametrize("kind", KINDS)
async def test_unusable_places_url_is_unknown_error_not_an_exception(kind: str) -> None:
    async with open_google(herd_for("http://127.0.0.1:notaport", kind)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR"
    assert answer["error_message"].startswith("bad places_url 'http://127.0.0.1:notaport/")


@pytest.mark.parametrize("kind", KINDS)
async def test_connection_dropped_without_reply_is_unknown_error(
    server: FakeHTTPServer, kind: str
) -> None:
    server.reply_always(Reply(drop=True))
    async with open_google(herd_for(server.url, kind)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR"
    assert "RemoteProtocolError" in answer["error_message"]


@pytest.mark.parametrize("kind", KINDS)
async def test_malformed_json_is_unknown_error(server: FakeHTTPServer, kind: str) -> None:
    server.reply_always(Reply(200, b'{"places": [{"id": "ChIJ'))
    async with open_google(herd_for(server.url, kind)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR"
    assert "answered malformed JSON" in answer["error_message"]


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("google", []),
        ("google", {"places": "none"}),
        ("google", {"places": [{"displayName": {"text": "no id, no location"}}]}),
        ("google", {"places": [{"id": "x", "location": {"latitude": "34", "longitude": 1}}]}),
        ("google-legacy", []),
        ("google-legacy", {"results": []}),
        ("google-legacy", {"status": "OK"}),
        ("google-legacy", {"status": "OK", "results": "none"}),
        ("google-legacy", {"status": "OK", "results": [1, 2]}),
    ],
)
async def test_json_of_the_wrong_shape_is_unknown_error(
    server: FakeHTTPServer, kind: str, body: object
) -> None:
    server.reply_always(Reply(200, body))
    async with open_google(herd_for(server.url, kind)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR"
    assert "answered JSON of an unexpected shape" in answer["error_message"]
    assert answer["results"] == []


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
    assert answers[6]["error_message"].endswith(f"PERMISSION_DENIED: {redacted}")
    assert answers[3]["error_message"] == "Places API (New) answered HTTP 500"  # no body


# -- concurrency -----------------------------------------------------------------------


def delayed_for_one_latitude(slow_lat: str, body: JSON) -> Callable[[Recorded], Reply]:
    def respond(request: Recorded) -> Reply:
        slow = request.json()["locationRestriction"]["circle"]["center"]["latitude"]
        return Reply(200, body, delay=2 if str(slow) == slow_lat else 0)

    return respond


async def test_a_slow_call_does_not_delay_another_caller(server: FakeHTTPServer) -> None:
    server.respond = delayed_for_one_latitude("34.06893", NEW_BODY)
    finished: dict[str, float] = {}

    async def ask(places: GooglePlaces, name: str, lat: Decimal) -> None:
        answer = await places.nearby(lat, LON, 10_000, 5)
        assert answer["status"] == "OK"
        finished[name] = trio.current_time() - start

    async with open_google(herd_for(server.url)) as places:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, places, "slow", LAT)
            await server.wait_requests(1)  # the slow call is on the wire
            nursery.start_soon(ask, places, "fast", Decimal("+34.1"))
    assert finished["fast"] < 0.5
    assert finished["slow"] >= 2
    assert server.connections == 2  # the slow one's connection was busy, so a second one


async def test_calls_in_flight_are_capped(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, NEW_BODY, delay=0.2))
    async with (
        open_google(herd_for(server.url, places_concurrency=2)) as places,
        trio.open_nursery() as nursery,
    ):
        for radius_m in range(100, 700, 100):
            nursery.start_soon(places.nearby, LAT, LON, radius_m, 5)
    assert len(server.requests) == 6
    assert server.peak_in_flight == 2


async def test_connections_are_kept_alive_and_reused(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, NEW_BODY))
    async with open_google(herd_for(server.url)) as places:
        for radius_m in (100, 200, 300):
            await places.nearby(LAT, LON, radius_m, 5)
    assert len(server.requests) == 3
    assert server.connections == 1


# -- the cache -------------------------------------------------------------------------


async def test_fifty_identical_concurrent_calls_make_one_request(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, NEW_BODY, delay=0.2))
    answers: list[Any] = []

    async def ask(places: GooglePlaces) -> None:
        answers.append(await places.nearby(LAT, LON, 10_000, 20))

    async with open_google(herd_for(server.url)) as places:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(ask, places)
        assert await places.nearby(LAT, LON, 10_000, 20) == NEW_AS_LEGACY  # and then cached
        stats = places.statistics()
    assert len(server.requests) == 1
    assert answers == [NEW_AS_LEGACY] * 50
    assert (stats.calls, stats.joins, stats.hits, stats.in_flight) == (1, 49, 1, 0)


async def test_cache_entries_expire_after_the_ttl(
    server: FakeHTTPServer, mock_clock: trio.testing.MockClock
) -> None:
    server.reply_always(Reply(200, NEW_BODY))
    async with open_google(herd_for(server.url, places_cache_ttl=10.0)) as places:
        await places.nearby(LAT, LON, 10_000, 5)
        mock_clock.jump(9.9)
        await places.nearby(LAT, LON, 10_000, 5)
        assert len(server.requests) == 1
        mock_clock.jump(0.1)
        await places.nearby(LAT, LON, 10_000, 5)
        assert len(server.requests) == 2
        await places.nearby(LAT, LON, 10_000, 5)
    assert len(server.requests) == 2


async def test_cache_evicts_the_least_recently_used(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, NEW_BODY))
    a, b, c = (LAT, LON, 100, 5), (LAT, LON, 200, 5), (LAT, LON, 100, 6)  # bound is key too
    async with open_google(herd_for(server.url, places_cache_size=2)) as places:
        for args in (a, b, a, c, a, b):  # c evicts b, not the recently used a
            await places.nearby(*args)
    asked = [
        (r.json()["locationRestriction"]["circle"]["radius"], r.json()["maxResultCount"])
        for r in server.requests
    ]
    assert asked == [(100, 5), (200, 5), (100, 6), (200, 5)]


async def test_error_answers_are_not_cached(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(503, GOOGLE_ERROR))
    async with open_google(herd_for(server.url)) as places:
        for _ in range(3):
            assert (await places.nearby(LAT, LON, 10_000, 5))["status"] == "UNKNOWN_ERROR"
        server.reply_always(Reply(200, NEW_BODY))
        for _ in range(3):
            assert (await places.nearby(LAT, LON, 10_000, 5))["status"] == "OK"
    assert len(server.requests) == 4


async def test_waiters_take_over_when_the_calling_caller_is_cancelled(
    server: FakeHTTPServer,
) -> None:
    server.respond = lambda _: Reply(200, NEW_BODY, delay=30 if len(server.requests) == 1 else 0)
    answers: list[Any] = []

    async def wait(places: GooglePlaces) -> None:
        answers.append(await places.nearby(LAT, LON, 10_000, 20))

    async with open_google(herd_for(server.url)) as places, trio.open_nursery() as nursery:
        first = trio.CancelScope()

        async def call_first() -> None:
            with first:
                await places.nearby(LAT, LON, 10_000, 20)
                pytest.fail("the first call should have been cancelled")

        nursery.start_soon(call_first)
        await server.wait_requests(1)
        nursery.start_soon(wait, places)
        nursery.start_soon(wait, places)
        await trio.testing.wait_all_tasks_blocked()
        assert answers == []  # they are waiting on the first call, not calling
        first.cancel()
    assert len(server.requests) == 2  # one of the waiters called, the other joined it
    assert answers == [NEW_AS_LEGACY] * 2


async def test_each_caller_gets_its_own_copy(server: FakeHTTPServer) -> None:
    server.reply_always(Reply(200, NEW_BODY))
    async with open_google(herd_for(server.url)) as places:
        first = await places.nearby(LAT, LON, 10_000, 5)
        first["results"].clear()
        first["status"] = "scribbled on"
        assert await places.nearby(LAT, LON, 10_000, 5) == NEW_AS_LEGACY
    assert len(server.requests) == 1


def test_own_deadline_is_a_little_under_places_timeout() -> None:
    assert places_deadline(5.0) == 4.5
    assert places_deadline(0.5) == 0.45
    assert places_deadline(600.0) == 599.5
