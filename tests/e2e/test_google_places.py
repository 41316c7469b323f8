"""End to end: `python -m herd_trio` with a Google places source pointed at a local HTTP
server the test runs (`places_url`), over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.e2e.herd import Herd, Session, exchange, poll, running
from tests.places.googlekit import FIELD_MASK
from tests.places.httpserver import Reply, start_fake_http

FIXTURES = Path(__file__).parent.parent / "places" / "fixtures"
KEY = "test-key-0123456789-never-logged"
WESTWOOD = b"+34.068930-118.445127"
BURST_LOGGED = "< b'WHATSAT burst 10 5'"  # how the server logs each of the burst's lines


def fixture(name: str) -> object:
    """A JSON fixture of the places tests."""
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The key, in the environment the servers inherit."""
    monkeypatch.setenv("GOOGLE_PLACES_API_KEY", KEY)
    return KEY


def body_of(reply: bytes, at_line: bytes) -> dict[str, object]:
    """The JSON of a WHATSAT reply, after checking its frame."""
    assert reply.startswith(at_line), reply[:200]
    assert reply.endswith(b"}\n\n"), reply[-20:]
    body = json.loads(reply[len(at_line) : -2])
    assert isinstance(body, dict)
    return body


async def test_places_api_new_end_to_end(
    tmp_path: Path, nursery: trio.Nursery, api_key: str
) -> None:
    api = await start_fake_http(nursery)
    api.reply_always(Reply(200, fixture("new_searchnearby_westwood.json")))
    herd = Herd.create(tmp_path, ["Solo"], [], places="google", places_url=api.url)
    with running(herd):
        herd.start("Solo")
        at_line = await herd.iamat("Solo", b"kiwi", WESTWOOD, b"1621464827.959498503")
        reply = await exchange(herd.ports["Solo"], b"WHATSAT kiwi 10 5\n")
        expected = fixture("legacy_from_new_westwood.json")
        assert isinstance(expected, dict)
        expected["results"] = expected["results"][:5]
        body = body_of(reply, at_line)
        assert body == expected  # translated field by field
        assert json.dumps(body) == json.dumps(expected)  # and in the legacy key order
        (request,) = api.requests
        assert (request.method, request.path) == ("POST", "/v1/places:searchNearby")
        assert request.header("X-Goog-Api-Key") == KEY
        assert request.header("X-Goog-FieldMask") == FIELD_MASK
        circle = request.json()["locationRestriction"]["circle"]
        assert circle == {
            "center": {"latitude": 34.06893, "longitude": -118.445127},
            "radius": 10000.0,
        }
        assert request.json()["maxResultCount"] == 5
        # Bound 0 makes no call at all.
        await exchange(herd.ports["Solo"], b"WHATSAT kiwi 10 0\n")
        assert len(api.requests) == 1
        log = await herd.wait_logged("Solo", "WHATSAT kiwi 10 0")
        assert KEY not in log


async def test_legacy_api_end_to_end_passes_errors_through(
    tmp_path: Path, nursery: trio.Nursery, api_key: str
) -> None:
    api = await start_fake_http(nursery)
    denied = {
        "error_message": "The provided API key is invalid.",
        "html_attributions": [],
        "results": [],
        "status": "REQUEST_DENIED",
    }
    api.reply_always(Reply(200, denied))
    herd = Herd.create(tmp_path, ["Solo"], [], places="google-legacy", places_url=api.url)
    with running(herd):
        herd.start("Solo")
        at_line = await herd.iamat("Solo", b"kiwi", WESTWOOD, b"1621464827")
        body = body_of(await exchange(herd.ports["Solo"], b"WHATSAT kiwi 2.5 3\n"), at_line)
        assert body == denied
        (request,) = api.requests
        assert (request.method, request.path) == ("GET", "/maps/api/place/nearbysearch/json")
        assert request.query == f"location=34.068930,-118.445127&radius=2500&key={KEY}"
        log = await herd.wait_logged("Solo", "WHATSAT kiwi 2.5 3")
        assert KEY not in log


async def test_a_slow_api_delays_neither_iamats_nor_other_clients(
    tmp_path: Path, nursery: trio.Nursery, api_key: str
) -> None:
    # The API holds its answer until the test lets it go: twenty IAMATs on other
    # connections are answered meanwhile (each under exchange()'s own deadline), so
    # nothing waits on the places call but the WHATSAT that made it.
    release = trio.Event()
    api = await start_fake_http(nursery)
    api.reply_always(Reply(200, {"places": []}, hold=release))
    herd = Herd.create(
        tmp_path, ["Solo"], [], places="google", places_url=api.url, places_timeout=60.0
    )
    with running(herd):
        herd.start("Solo")
        at_line = await herd.iamat("Solo", b"slow", WESTWOOD, b"1")
        async with (await herd.session("Solo")).stream as stream:
            waiting = Session(stream)
            await stream.send_all(b"WHATSAT slow 10 5\n")
            await api.wait_requests(1)  # the places call is under way
            for number in range(20):
                reply = await herd.iamat("Solo", b"busy%d" % number, WESTWOOD, b"2")
                assert reply.startswith(b"AT Solo ")
            assert (len(api.requests), api.in_flight) == (1, 1)  # all while the API holds
            release.set()
            reply = await waiting.read_until(b"\n\n")
        assert body_of(reply, at_line) == {
            "html_attributions": [],
            "results": [],
            "status": "ZERO_RESULTS",
        }


async def test_a_burst_of_identical_whatsats_makes_one_call(
    tmp_path: Path, nursery: trio.Nursery, api_key: str
) -> None:
    # The API holds its answer until the server has logged all fifty WHATSATs, so they
    # all arrive while the one call is in flight.
    release = trio.Event()
    api = await start_fake_http(nursery)
    api.reply_always(Reply(200, fixture("new_searchnearby_westwood.json"), hold=release))
    herd = Herd.create(
        tmp_path, ["Solo"], [], places="google", places_url=api.url, places_timeout=60.0
    )
    with running(herd):
        herd.start("Solo")
        at_line = await herd.iamat("Solo", b"burst", WESTWOOD, b"1")
        replies: list[bytes] = []

        async def ask() -> None:
            replies.append(await exchange(herd.ports["Solo"], b"WHATSAT burst 10 5\n"))

        async def all_received() -> bool | None:
            await trio.lowlevel.checkpoint()
            return True if herd.log("Solo").read_text().count(BURST_LOGGED) == 50 else None

        async with trio.open_nursery() as clients:
            for _ in range(50):
                clients.start_soon(ask)
            await poll("Solo logs fifty WHATSATs", all_received)
            assert (len(api.requests), api.in_flight, replies) == (1, 1, [])
            release.set()
        expected = fixture("legacy_from_new_westwood.json")
        assert isinstance(expected, dict)
        assert replies == [replies[0]] * 50
        assert body_of(replies[0], at_line) == expected  # three places, within the bound
        assert len(api.requests) == 1


async def test_a_failing_api_answers_in_legacy_shape(
    tmp_path: Path, nursery: trio.Nursery, api_key: str
) -> None:
    api = await start_fake_http(nursery)
    api.reply_always(Reply(429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}))
    herd = Herd.create(tmp_path, ["Solo"], [], places="google", places_url=api.url)
    with running(herd):
        herd.start("Solo")
        at_line = await herd.iamat("Solo", b"quota", WESTWOOD, b"1")
        body = body_of(await exchange(herd.ports["Solo"], b"WHATSAT quota 10 5\n"), at_line)
        assert json.dumps(body) == json.dumps(
            {
                "html_attributions": [],
                "results": [],
                "status": "OVER_QUERY_LIMIT",
                "error_message": "Places API (New) answered HTTP 429: RESOURCE_EXHAUSTED",
            }
        )


def test_a_google_source_without_a_key_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    monkeypatch.delenv("GOOGLE_PLACES_API_KEY", raising=False)
    herd = Herd.create(tmp_path, ["Solo"], [], places="google")
    result = subprocess.run(
        [sys.executable, "-m", "herd_trio", "Solo", "--config", str(herd.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "GOOGLE_PLACES_API_KEY" in result.stderr
