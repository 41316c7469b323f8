"""The Google places sources with the API faked inside httpx (MockTransport): virtual time.

Every test that waits runs under `autojump_clock` and asserts exact virtual times.
What needs a real wire (request bytes, connections, refused and dropped connections,
the key in httpx's log) is in test_google_http.py.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from herd_trio.places import JSON
from herd_trio.places.google import GooglePlaces, open_google, places_deadline

from .googlekit import (
    KINDS,
    LABELS,
    LAT,
    LEGACY_BODY,
    LON,
    MOCK_URL,
    NEW_AS_LEGACY,
    NEW_BODY,
    error,
    herd_for,
    ok_body,
    open_mock,
    ordered,
)
from .httpserver import Recorded, Reply
from .mockapi import MockAPI

EMPTY_OK = {"html_attributions": [], "results": [], "status": "OK"}
ZERO_RESULTS = {"html_attributions": [], "results": [], "status": "ZERO_RESULTS"}


def legacy_trimmed(bound: int) -> JSON:
    """LEGACY_BODY with its results cut to `bound`, keys in Google's order."""
    return dict(LEGACY_BODY, results=LEGACY_BODY["results"][:bound])


# -- where calls go --------------------------------------------------------------------


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
async def test_bound_zero_makes_no_call(api: MockAPI, kind: str) -> None:
    async with open_mock(api, kind) as places:
        answer = await places.nearby(LAT, LON, 10_000, 0)
    assert ordered(answer) == ordered(EMPTY_OK)
    assert api.requests == []


@pytest.mark.parametrize("kind", KINDS)
async def test_unusable_places_url_is_unknown_error_not_an_exception(kind: str) -> None:
    async with open_google(herd_for("http://127.0.0.1:notaport", kind)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR"
    assert answer["results"] == []
    assert answer["error_message"].startswith("bad places_url 'http://127.0.0.1:notaport/")


# -- what comes back -------------------------------------------------------------------


async def test_new_places_translate_to_exact_legacy_json(api: MockAPI) -> None:
    api.reply_always(Reply(200, NEW_BODY))
    async with open_mock(api) as places:
        answer = await places.nearby(LAT, LON, 10_000, 20)
    assert ordered(answer) == ordered(NEW_AS_LEGACY)


async def test_new_results_are_trimmed_to_the_bound(api: MockAPI) -> None:
    api.reply_always(Reply(200, NEW_BODY))  # three places, though we asked for two
    async with open_mock(api) as places:
        answer = await places.nearby(LAT, LON, 10_000, 2)
    assert api.requests[0].json()["maxResultCount"] == 2
    assert len(NEW_AS_LEGACY["results"]) == 3
    assert ordered(answer) == ordered(dict(NEW_AS_LEGACY, results=NEW_AS_LEGACY["results"][:2]))


@pytest.mark.parametrize("body", [{}, {"places": []}])
async def test_new_empty_answer_is_zero_results(api: MockAPI, body: object) -> None:
    api.reply_always(Reply(200, body))
    async with open_mock(api) as places:
        answer = await places.nearby(LAT, LON, 50, 3)
    assert ordered(answer) == ordered(ZERO_RESULTS)


async def test_legacy_passes_through_in_order_trimmed_to_bound(api: MockAPI) -> None:
    api.reply_always(Reply(200, LEGACY_BODY))
    async with open_mock(api, "google-legacy") as places:
        answer = await places.nearby(LAT, LON, 10_000, 2)
    assert len(LEGACY_BODY["results"]) > 2
    assert list(answer) == ["html_attributions", "next_page_token", "results", "status"]
    assert ordered(answer) == ordered(legacy_trimmed(2))


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
async def test_legacy_statuses_pass_through(api: MockAPI, body: object) -> None:
    api.reply_always(Reply(200, body))
    async with open_mock(api, "google-legacy") as places:
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
    api: MockAPI, kind: str, code: int, status: str
) -> None:
    api.reply_always(Reply(code, GOOGLE_ERROR))
    async with open_mock(api, kind) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    message = f"{LABELS[kind]} answered HTTP {code}: SOMETHING: Something is wrong."
    assert ordered(answer) == error(status, message)


async def test_http_error_without_a_google_body_still_says_what_happened(api: MockAPI) -> None:
    api.reply_always(Reply(502, b"<html>Bad Gateway</html>", content_type="text/html"))
    async with open_mock(api) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert ordered(answer) == error("UNKNOWN_ERROR", "Places API (New) answered HTTP 502")


@pytest.mark.parametrize("kind", KINDS)
async def test_timeout_is_unknown_error_before_the_server_deadline(
    api: MockAPI, kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    api.reply_always(Reply(200, ok_body(kind), delay=5))
    async with open_mock(api, kind, places_timeout=1.0) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
        assert trio.current_time() == 0.9  # our deadline, inside the server's places_timeout
    assert ordered(answer) == error("UNKNOWN_ERROR", f"{LABELS[kind]} did not answer within 0.9 s")
    assert api.in_flight == 0  # the call was abandoned, not left running


@pytest.mark.parametrize("kind", KINDS)
async def test_an_httpx_timeout_is_unknown_error_naming_it(kind: str) -> None:
    def read_timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    herd = herd_for(MOCK_URL, kind)
    async with open_google(herd, transport=httpx.MockTransport(read_timeout)) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    message = f"{LABELS[kind]} did not answer within 4.5 s (ReadTimeout)"
    assert ordered(answer) == error("UNKNOWN_ERROR", message)


@pytest.mark.parametrize("kind", KINDS)
async def test_malformed_json_is_unknown_error(api: MockAPI, kind: str) -> None:
    api.reply_always(Reply(200, b'{"places": [{"id": "ChIJ'))
    async with open_mock(api, kind) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert list(answer) == ["html_attributions", "results", "status", "error_message"]
    assert (answer["status"], answer["results"]) == ("UNKNOWN_ERROR", [])
    assert answer["error_message"].startswith(f"{LABELS[kind]} answered malformed JSON: ")


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
    api: MockAPI, kind: str, body: object
) -> None:
    api.reply_always(Reply(200, body))
    async with open_mock(api, kind) as places:
        answer = await places.nearby(LAT, LON, 10_000, 5)
    assert list(answer) == ["html_attributions", "results", "status", "error_message"]
    assert (answer["status"], answer["results"]) == ("UNKNOWN_ERROR", [])
    prefix = f"{LABELS[kind]} answered JSON of an unexpected shape: "
    assert answer["error_message"].startswith(prefix)


# -- concurrency -----------------------------------------------------------------------


async def test_a_slow_call_does_not_delay_another_caller(
    api: MockAPI, autojump_clock: trio.testing.MockClock
) -> None:
    def respond(request: Recorded) -> Reply:
        latitude = request.json()["locationRestriction"]["circle"]["center"]["latitude"]
        return Reply(200, NEW_BODY, delay=2 if latitude == 34.06893 else 0)

    api.respond = respond
    finished: dict[str, tuple[float, JSON]] = {}

    async def ask(places: GooglePlaces, name: str, lat: Decimal) -> None:
        answer = await places.nearby(lat, LON, 10_000, 5)
        finished[name] = (trio.current_time(), answer)

    async with open_mock(api) as places, trio.open_nursery() as nursery:
        nursery.start_soon(ask, places, "slow", LAT)
        await api.wait_requests(1)  # the slow call is under way
        nursery.start_soon(ask, places, "fast", Decimal("+34.1"))
    assert finished == {"fast": (0.0, NEW_AS_LEGACY), "slow": (2.0, NEW_AS_LEGACY)}


async def test_calls_in_flight_are_capped(
    api: MockAPI, autojump_clock: trio.testing.MockClock
) -> None:
    api.reply_always(Reply(200, NEW_BODY, delay=1))
    done: list[float] = []

    async def ask(places: GooglePlaces, radius_m: int) -> None:
        await places.nearby(LAT, LON, radius_m, 5)
        done.append(trio.current_time())

    async with open_mock(api, places_concurrency=2) as places, trio.open_nursery() as nursery:
        for radius_m in range(100, 700, 100):
            nursery.start_soon(ask, places, radius_m)
    assert len(api.requests) == 6
    assert api.peak_in_flight == 2
    assert done == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]  # two at a time, one second each


# -- the cache -------------------------------------------------------------------------


async def test_fifty_identical_concurrent_calls_make_one_request(
    api: MockAPI, autojump_clock: trio.testing.MockClock
) -> None:
    api.reply_always(Reply(200, NEW_BODY, delay=1))
    answers: list[tuple[float, JSON]] = []

    async def ask(places: GooglePlaces) -> None:
        answer = await places.nearby(LAT, LON, 10_000, 20)
        answers.append((trio.current_time(), answer))

    async with open_mock(api) as places:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(ask, places)
        assert await places.nearby(LAT, LON, 10_000, 20) == NEW_AS_LEGACY  # and then cached
        assert trio.current_time() == 1.0
        stats = places.statistics()
    assert len(api.requests) == 1
    assert answers == [(1.0, NEW_AS_LEGACY)] * 50
    assert (stats.calls, stats.joins, stats.hits, stats.in_flight) == (1, 49, 1, 0)


async def test_cache_entries_expire_after_the_ttl(
    api: MockAPI, autojump_clock: trio.testing.MockClock
) -> None:
    api.reply_always(Reply(200, NEW_BODY))
    asked: list[int] = []
    async with open_mock(api, places_cache_ttl=10.0) as places:
        for pause in (0, 9.5, 0.5, 0):  # the answer of t=0 expires at t=10
            await trio.sleep(pause)
            await places.nearby(LAT, LON, 10_000, 5)
            asked.append(len(api.requests))
    assert trio.current_time() == 10.0
    assert asked == [1, 1, 2, 2]


async def test_cache_evicts_the_least_recently_used(api: MockAPI) -> None:
    api.reply_always(Reply(200, NEW_BODY))
    a, b, c = (LAT, LON, 100, 5), (LAT, LON, 200, 5), (LAT, LON, 100, 6)  # bound is key too
    async with open_mock(api, places_cache_size=2) as places:
        for args in (a, b, a, c, a, b):  # c evicts b, not the recently used a
            await places.nearby(*args)
    asked = [
        (r.json()["locationRestriction"]["circle"]["radius"], r.json()["maxResultCount"])
        for r in api.requests
    ]
    assert asked == [(100, 5), (200, 5), (100, 6), (200, 5)]


async def test_error_answers_are_not_cached(api: MockAPI) -> None:
    api.reply_always(Reply(503, GOOGLE_ERROR))
    statuses = []
    async with open_mock(api) as places:
        for _ in range(3):
            statuses.append((await places.nearby(LAT, LON, 10_000, 5))["status"])
        api.reply_always(Reply(200, NEW_BODY))
        for _ in range(3):
            statuses.append((await places.nearby(LAT, LON, 10_000, 5))["status"])
    assert statuses == ["UNKNOWN_ERROR"] * 3 + ["OK"] * 3
    assert len(api.requests) == 4


async def test_waiters_take_over_when_the_calling_caller_is_cancelled(
    api: MockAPI, autojump_clock: trio.testing.MockClock
) -> None:
    # The first request would take 30 s (its caller gives up at t=1); the next is instant.
    api.respond = lambda _: Reply(200, NEW_BODY, delay=30 if len(api.requests) == 1 else 0)
    answers: list[tuple[float, Any]] = []

    async def wait(places: GooglePlaces) -> None:
        answer = await places.nearby(LAT, LON, 10_000, 20)
        answers.append((trio.current_time(), answer))

    async with open_mock(api) as places, trio.open_nursery() as nursery:

        async def call_first() -> None:
            with trio.move_on_after(1):
                await places.nearby(LAT, LON, 10_000, 20)
                pytest.fail("the first call should have been cancelled")

        nursery.start_soon(call_first)
        await api.wait_requests(1)
        nursery.start_soon(wait, places)
        nursery.start_soon(wait, places)
        await trio.testing.wait_all_tasks_blocked()
        assert answers == []  # they are waiting on the first call, not calling
        assert len(api.requests) == 1
    assert len(api.requests) == 2  # one of the waiters called, the other joined it
    assert answers == [(1.0, NEW_AS_LEGACY)] * 2


async def test_each_caller_gets_its_own_copy(api: MockAPI) -> None:
    api.reply_always(Reply(200, NEW_BODY))
    async with open_mock(api) as places:
        first = await places.nearby(LAT, LON, 10_000, 5)
        first["results"].clear()
        first["status"] = "scribbled on"
        assert await places.nearby(LAT, LON, 10_000, 5) == NEW_AS_LEGACY
    assert len(api.requests) == 1


def test_own_deadline_is_a_little_under_places_timeout() -> None:
    assert places_deadline(5.0) == 4.5
    assert places_deadline(0.5) == 0.45
    assert places_deadline(600.0) == 599.5
