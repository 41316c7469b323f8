"""What the Google source tests share: the key, the fixtures, a herd, both fakes' openers."""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager
from decimal import Decimal
from pathlib import Path

from herd_trio.config import HerdConfig, ServerConfig, Settings
from herd_trio.places import JSON
from herd_trio.places.google import GooglePlaces, open_google

from .mockapi import MockAPI

FIXTURES = Path(__file__).parent / "fixtures"
KEY_ENV = "HERD_TEST_PLACES_KEY"
KEY = "AIzaSyD-test_0123456789abcdefghijKLMNOPQ"  # shaped like a real key, found nowhere else
LAT, LON = Decimal("+34.068930"), Decimal("-118.445127")  # as parsed from an IAMAT
KINDS = ["google", "google-legacy"]
LABELS = {"google": "Places API (New)", "google-legacy": "Places API (legacy Nearby Search)"}
NEW_PATH = "/v1/places:searchNearby"
LEGACY_PATH = "/maps/api/place/nearbysearch/json"
MOCK_URL = "https://places.test"  # never resolved: MockAPI answers inside httpx
# Spelled out rather than imported: a change to what we ask Google for (and pay for)
# should show up here.
FIELD_MASK = (
    "places.id,places.displayName,places.location,places.viewport,"
    "places.shortFormattedAddress,places.types,places.businessStatus,places.rating,"
    "places.userRatingCount,places.priceLevel,places.currentOpeningHours.openNow,"
    "places.photos,places.plusCode,places.iconMaskBaseUri,places.iconBackgroundColor"
)


def fixture(name: str) -> JSON:
    """A JSON file of tests/places/fixtures."""
    body: JSON = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return body


NEW_BODY = fixture("new_searchnearby_westwood.json")
NEW_AS_LEGACY = fixture("legacy_from_new_westwood.json")
LEGACY_BODY = fixture("legacy_nearbysearch_westwood.json")


def ok_body(kind: str) -> JSON:
    """What the API of `kind` answers for Westwood."""
    return NEW_BODY if kind == "google" else LEGACY_BODY


def herd_for(url: str | None, places: str = "google", **settings: float) -> HerdConfig:
    """A one-server herd whose places source is `places` at `url`."""
    return HerdConfig(
        servers={"Clark": ServerConfig(port=12003, peer_port=12103)},
        herd=Settings(places=places, places_url=url, places_key_env=KEY_ENV, **settings),  # type: ignore[arg-type]  # places: str, not the Literal; msgspec checks at load
    )


def open_mock(
    api: MockAPI, kind: str = "google", **settings: float
) -> AbstractAsyncContextManager[GooglePlaces]:
    """Open the Google source of `kind` with `api` as its transport."""
    return open_google(herd_for(MOCK_URL, kind, **settings), transport=api.transport())


def ordered(body: object) -> str:
    """JSON text, so that comparing two bodies also compares their key order."""
    return json.dumps(body, ensure_ascii=False)


def error(status: str, message: str) -> str:
    """An error answer as `ordered` text."""
    return ordered(
        {"html_attributions": [], "results": [], "status": status, "error_message": message}
    )
