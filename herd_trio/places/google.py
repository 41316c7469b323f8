"""Google places sources: Places API (New) translated to legacy shape, or legacy as is.

`places = "google"` POSTs `{base}/v1/places:searchNearby` and translates each place to a
legacy Nearby Search result (docs/places.md has the table); `places = "google-legacy"`
GETs `{base}/maps/api/place/nearbysearch/json` and passes Google's JSON through, results
trimmed to the bound. Either way `nearby()` never raises (cancellation aside): a failed
call answers `error_body(status, message)` with PROTOCOL.md §2's status for the failure.

One `httpx.AsyncClient` per source (pooled keep-alive connections; httpx runs on trio
through httpcore's trio backend), a `trio.CapacityLimiter` on calls in flight, and an
`AnswerCache` so a burst of identical WHATSATs costs one call. Each call runs in its
caller's task under that caller's deadline: a slow API delays only the WHATSATs that
asked it (and those waiting on the very same call).

The API key goes out in a header (New) or the query string (legacy, which has no other
way); it is scrubbed from every error message, from our log lines, and from httpx's own
"HTTP Request: GET <url>" log line, which would otherwise carry it.
"""

from __future__ import annotations

import contextlib
import copy
import html
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import attrs
import httpx
import msgspec
import trio

from herd_trio.places import JSON, error_body, legacy_body
from herd_trio.places.cache import AnswerCache, CacheStatistics

if TYPE_CHECKING:
    from herd_trio.config import HerdConfig

log = logging.getLogger(__name__)

NEW_BASE = "https://places.googleapis.com"
LEGACY_BASE = "https://maps.googleapis.com"
NEW_PATH = "/v1/places:searchNearby"
LEGACY_PATH = "/maps/api/place/nearbysearch/json"

# Only what the translation reads: Google bills Nearby Search (New) by the costliest field
# asked for. rating, userRatingCount, priceLevel and currentOpeningHours are Enterprise
# fields; the rest are Pro (docs/places.md, "What a call costs").
FIELD_MASK = ",".join(
    f"places.{field}"
    for field in (
        "id",
        "displayName",
        "location",
        "viewport",
        "shortFormattedAddress",
        "types",
        "businessStatus",
        "rating",
        "userRatingCount",
        "priceLevel",
        "currentOpeningHours.openNow",
        "photos",
        "plusCode",
        "iconMaskBaseUri",
        "iconBackgroundColor",
    )
)

# The server cancels a WHATSAT's places call after `places_timeout` and answers a bare
# UNKNOWN_ERROR. Our own deadline fires a little earlier, so the answer says what timed out.
DEADLINE_SHARE = 0.9  # of places_timeout ...
DEADLINE_HEADROOM = 0.5  # ... but at most this many seconds short of it
MAX_BODY = 4 << 20  # bytes; 20 places with photos are ~100 kB, so more is not an answer
MAX_MESSAGE = 300  # characters of an upstream error message worth passing on
REDACTED = "[key redacted]"
KEPT_STATUSES = frozenset({"OK", "ZERO_RESULTS"})  # answers worth caching; errors are not

PRICE_LEVELS = {
    "PRICE_LEVEL_FREE": 0,
    "PRICE_LEVEL_INEXPENSIVE": 1,
    "PRICE_LEVEL_MODERATE": 2,
    "PRICE_LEVEL_EXPENSIVE": 3,
    "PRICE_LEVEL_VERY_EXPENSIVE": 4,
}
_UNSPECIFIED = "BUSINESS_STATUS_UNSPECIFIED"

CacheKey = tuple[Decimal, Decimal, int, int]  # (lat, lon, radius_m, bound), exact values


class BadAnswer(Exception):
    """The API answered 2xx with a body that is not the JSON we expect."""


# -- Places API (New) ------------------------------------------------------------------
# The response shape, as far as the translation reads it. Unknown fields are ignored
# (Google adds fields); a place without an id or a location is not a usable result.


class _LatLng(msgspec.Struct, frozen=True):
    latitude: float
    longitude: float


class _Viewport(msgspec.Struct, frozen=True):
    low: _LatLng
    high: _LatLng


class _LocalizedText(msgspec.Struct, frozen=True):
    text: str


class _Author(msgspec.Struct, frozen=True, rename="camel"):
    display_name: str | None = None
    uri: str | None = None


class _Photo(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    width_px: int
    height_px: int
    author_attributions: list[_Author] = msgspec.field(default_factory=list)


class _PlusCode(msgspec.Struct, frozen=True, rename="camel"):
    global_code: str | None = None
    compound_code: str | None = None


class _OpeningHours(msgspec.Struct, frozen=True, rename="camel"):
    open_now: bool | None = None


class _Place(msgspec.Struct, frozen=True, rename="camel"):
    id: str
    location: _LatLng
    display_name: _LocalizedText | None = None
    viewport: _Viewport | None = None
    short_formatted_address: str | None = None
    types: list[str] | None = None
    business_status: str | None = None
    rating: float | None = None
    user_rating_count: int | None = None
    price_level: str | None = None
    current_opening_hours: _OpeningHours | None = None
    photos: list[_Photo] | None = None
    plus_code: _PlusCode | None = None
    icon_mask_base_uri: str | None = None
    icon_background_color: str | None = None


class _SearchNearbyResponse(msgspec.Struct, frozen=True):
    places: list[_Place] = msgspec.field(default_factory=list)  # Google sends {} for none


_decode_new = msgspec.json.Decoder(_SearchNearbyResponse).decode
_encode_exact = msgspec.json.Encoder(decimal_format="number").encode  # 34.068930 stays so


def _lat_lng(point: _LatLng) -> JSON:
    return {"lat": point.latitude, "lng": point.longitude}


def _attribution(author: _Author) -> str:
    """A legacy `html_attributions` entry: a link to the contributor, as legacy gives."""
    name = html.escape(author.display_name or "")
    if not author.uri:
        return name
    uri = f"https:{author.uri}" if author.uri.startswith("//") else author.uri
    return f'<a href="{html.escape(uri)}">{name}</a>'


def translate_place(place: _Place) -> JSON:
    """One Places API (New) place as a legacy Nearby Search result.

    Keys in legacy's (alphabetical) order; a field absent from the place is absent from
    the result, and falsy values (`open_now: false`, `rating: 0`) are kept.
    """
    result: JSON = {}
    if place.business_status is not None and place.business_status != _UNSPECIFIED:
        result["business_status"] = place.business_status
    geometry: JSON = {"location": _lat_lng(place.location)}
    if place.viewport is not None:
        geometry["viewport"] = {
            "northeast": _lat_lng(place.viewport.high),
            "southwest": _lat_lng(place.viewport.low),
        }
    result["geometry"] = geometry
    if place.icon_mask_base_uri is not None:
        # Legacy `icon` was a coloured PNG URL; New only gives the mask's base URI, to
        # which Google's docs say to append ".png" or ".svg".
        result["icon"] = f"{place.icon_mask_base_uri}.png"
    if place.icon_background_color is not None:
        result["icon_background_color"] = place.icon_background_color
    if place.icon_mask_base_uri is not None:
        result["icon_mask_base_uri"] = place.icon_mask_base_uri
    if place.display_name is not None:
        result["name"] = place.display_name.text
    hours = place.current_opening_hours
    if hours is not None and hours.open_now is not None:
        result["opening_hours"] = {"open_now": hours.open_now}
    if place.photos is not None:
        result["photos"] = [
            {
                "height": photo.height_px,
                "html_attributions": [_attribution(a) for a in photo.author_attributions],
                # The New photo resource name ("places/ID/photos/REF"): what Place Photos
                # (New) takes, and as opaque to a client as the legacy reference was.
                "photo_reference": photo.name,
                "width": photo.width_px,
            }
            for photo in place.photos
        ]
    result["place_id"] = place.id
    if place.plus_code is not None:
        plus_code: JSON = {}
        if place.plus_code.compound_code is not None:
            plus_code["compound_code"] = place.plus_code.compound_code
        if place.plus_code.global_code is not None:
            plus_code["global_code"] = place.plus_code.global_code
        result["plus_code"] = plus_code
    if place.price_level in PRICE_LEVELS:
        result["price_level"] = PRICE_LEVELS[place.price_level]
    if place.rating is not None:
        result["rating"] = place.rating
    if place.types is not None:
        result["types"] = list(place.types)
    if place.user_rating_count is not None:
        result["user_ratings_total"] = place.user_rating_count
    if place.short_formatted_address is not None:
        result["vicinity"] = place.short_formatted_address
    return result


def translate_new(content: bytes, bound: int) -> JSON:
    """A searchNearby response body as a legacy body; BadAnswer if it is not one."""
    try:
        response = _decode_new(content)
    except msgspec.ValidationError as exc:
        raise BadAnswer(f"JSON of an unexpected shape: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadAnswer(f"malformed JSON: {exc}") from exc
    results = [translate_place(place) for place in response.places[:bound]]
    return legacy_body(results, "OK" if results else "ZERO_RESULTS")


def pass_legacy(content: bytes, bound: int) -> JSON:
    """A legacy Nearby Search body as Google sent it, results trimmed to `bound`.

    Key order, non-OK statuses and `error_message` are kept. BadAnswer unless it is an
    object with a string `status` and, if present (required for OK), a list `results`.
    """
    try:
        body: Any = msgspec.json.decode(content)
    except msgspec.DecodeError as exc:
        raise BadAnswer(f"malformed JSON: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("status"), str):
        raise BadAnswer("JSON of an unexpected shape: no object with a string `status`")
    results = body.get("results")
    if results is None and body["status"] in KEPT_STATUSES:
        raise BadAnswer(f"JSON of an unexpected shape: status {body['status']} without results")
    if results is not None:
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise BadAnswer("JSON of an unexpected shape: `results` is not a list of objects")
        body["results"] = results[:bound]  # same key, so the order is kept
    return body


def _upstream_message(content: bytes) -> str:
    """What an error body says, if it says it the way Google does; else ''."""
    try:
        body: Any = msgspec.json.decode(content)
    except msgspec.DecodeError:
        return ""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")  # Google Cloud APIs: {"error": {code, message, status}}
    if isinstance(error, dict):
        parts = (error.get("status"), error.get("message"))
        return ": ".join(p for p in parts if isinstance(p, str))
    message = body.get("error_message")  # legacy Maps APIs
    return message if isinstance(message, str) else ""


def status_for_http(code: int) -> str:
    """The legacy status for a non-2xx HTTP status (PROTOCOL.md §2)."""
    if code == 400:
        return "INVALID_REQUEST"
    if code in (401, 403):
        return "REQUEST_DENIED"
    if code == 429:
        return "OVER_QUERY_LIMIT"
    return "UNKNOWN_ERROR"  # 5xx, and anything else nobody should be answering with


def places_deadline(places_timeout: float) -> float:
    """How long one outbound call may take: a little under the server's deadline."""
    return max(places_timeout * DEADLINE_SHARE, places_timeout - DEADLINE_HEADROOM)


# -- the source ------------------------------------------------------------------------


@attrs.frozen
class _Endpoint:
    """How one of the two APIs is asked and how its answer is read."""

    label: str  # for error messages
    url: str
    key: str = attrs.field(repr=False)
    legacy: bool

    def request(
        self, client: httpx.AsyncClient, lat: Decimal, lon: Decimal, radius_m: int, bound: int
    ) -> httpx.Request:
        if self.legacy:
            # Built by hand: httpx's `params=` would send the comma as %2C, and this is
            # the query string Google documents.
            query = f"location={lat:f},{lon:f}&radius={radius_m}&key={quote(self.key, safe='')}"
            return client.build_request("GET", f"{self.url}?{query}")
        body = {
            "maxResultCount": bound,
            "locationRestriction": {
                "circle": {
                    "center": {"latitude": lat, "longitude": lon},
                    "radius": float(radius_m),
                }
            },
        }
        headers = {
            "Content-Type": "application/json",
            "X-Goog-Api-Key": self.key,
            "X-Goog-FieldMask": FIELD_MASK,
        }
        return client.build_request("POST", self.url, content=_encode_exact(body), headers=headers)

    def answer(self, content: bytes, bound: int) -> JSON:
        return pass_legacy(content, bound) if self.legacy else translate_new(content, bound)


class _RedactKey(logging.Filter):
    """Replace the API key in records of the logger this filter is added to."""

    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self._scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = self._scrub(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


@attrs.frozen
class Scrubber:
    """Replaces a secret, as is and URL-quoted, in text bound for users or logs."""

    secret: str = attrs.field(repr=False)

    def __call__(self, text: str) -> str:
        if not self.secret:  # "" is in every string
            return text
        for form in {self.secret, quote(self.secret, safe="")}:
            text = text.replace(form, REDACTED)
        return text


@attrs.define(eq=False)
class GooglePlaces:
    """A PlacesSource backed by Google; made and closed by `open_google`."""

    _client: httpx.AsyncClient
    _endpoint: _Endpoint
    _limiter: trio.CapacityLimiter
    _cache: AnswerCache[CacheKey, JSON]
    _deadline: float  # seconds one call may take, waiting for the limiter included
    _scrub: Scrubber

    async def nearby(self, lat: Decimal, lon: Decimal, radius_m: int, bound: int) -> JSON:
        """Up to `bound` places within `radius_m` metres of (lat, lon); never raises.

        Bound 0 makes no call. Answers come from the cache, from an identical call in
        flight, or from a call of our own; each caller gets its own copy. Always
        checkpoints.
        """
        if bound <= 0:
            await trio.lowlevel.checkpoint()
            return legacy_body([], "OK")
        answer = await self._cache.fetch(
            (lat, lon, radius_m, bound),
            lambda: self._call(lat, lon, radius_m, bound),
            keep=lambda body: body.get("status") in KEPT_STATUSES,
        )
        return copy.deepcopy(answer)

    @property
    def url(self) -> str:
        """The endpoint this source calls (without a query string, so without the key)."""
        return self._endpoint.url

    def statistics(self) -> CacheStatistics:
        """How the answer cache has served callers so far."""
        return self._cache.statistics()

    async def _call(self, lat: Decimal, lon: Decimal, radius_m: int, bound: int) -> JSON:
        """One outbound call under the concurrency cap and our deadline; never raises."""
        endpoint = self._endpoint
        try:
            request = endpoint.request(self._client, lat, lon, radius_m, bound)
        except httpx.InvalidURL as exc:  # a places_url the config check let through
            await trio.lowlevel.checkpoint()
            return self._fail("UNKNOWN_ERROR", f"bad places_url {endpoint.url!r}: {exc}")
        # httpx's timeout is per phase (connect, each read...), so a server that drips
        # bytes could outlast it; this scope bounds the whole call, queueing included.
        with trio.move_on_after(self._deadline):
            async with self._limiter:  # always checkpoints, even with tokens to spare
                try:
                    code, content = await self._send(request)
                except httpx.TimeoutException as exc:
                    return self._fail(
                        "UNKNOWN_ERROR",
                        f"{endpoint.label} did not answer within {self._deadline:g} s"
                        f" ({type(exc).__name__})",
                    )
                except httpx.HTTPError as exc:
                    return self._fail(
                        "UNKNOWN_ERROR",
                        f"cannot reach {endpoint.label}: {type(exc).__name__}: {exc}",
                    )
                except BadAnswer as exc:
                    return self._fail("UNKNOWN_ERROR", f"{endpoint.label} answered {exc}")
            if not 200 <= code < 300:
                detail = _upstream_message(content)
                return self._fail(
                    status_for_http(code),
                    f"{endpoint.label} answered HTTP {code}" + (f": {detail}" if detail else ""),
                )
            try:
                answer = endpoint.answer(content, bound)
            except BadAnswer as exc:
                return self._fail("UNKNOWN_ERROR", f"{endpoint.label} answered {exc}")
            if "error_message" in answer:  # legacy's own REQUEST_DENIED etc.
                answer["error_message"] = self._scrub(str(answer["error_message"]))
                log.warning(
                    "%s answered %r: %r", endpoint.label, answer["status"], answer["error_message"]
                )
            return answer
        return self._fail(
            "UNKNOWN_ERROR", f"{endpoint.label} did not answer within {self._deadline:g} s"
        )

    async def _send(self, request: httpx.Request) -> tuple[int, bytes]:
        """Send `request`; its status and body, read up to MAX_BODY bytes."""
        response = await self._client.send(request, stream=True)
        async with contextlib.aclosing(response):  # not `finally: await`: ASYNC102
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_BODY:
                    raise BadAnswer(f"a body of more than {MAX_BODY} bytes")
                chunks.append(chunk)
        return response.status_code, b"".join(chunks)

    def _fail(self, status: str, message: str) -> JSON:
        message = self._scrub(message)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        log.warning("places call failed, %s: %r", status, message)  # upstream text: %r
        return error_body(status, message)


@asynccontextmanager
async def open_google(herd: HerdConfig) -> AsyncIterator[GooglePlaces]:
    """Open the Google source `herd` configures; its HTTP client closes when the block exits.

    Reads the key from the environment (`herd.places_key()`, KeyError if unset: the
    config check has already refused that). While open, httpx's request log lines have
    the key replaced.
    """
    settings = herd.herd
    legacy = settings.places == "google-legacy"
    base = settings.places_url or (LEGACY_BASE if legacy else NEW_BASE)
    key = herd.places_key()
    endpoint = _Endpoint(
        label="Places API (legacy Nearby Search)" if legacy else "Places API (New)",
        url=base.rstrip("/") + (LEGACY_PATH if legacy else NEW_PATH),
        key=key,
        legacy=legacy,
    )
    scrub = Scrubber(key)
    deadline = places_deadline(settings.places_timeout)
    redact = _RedactKey(scrub)
    httpx_log = logging.getLogger("httpx")
    httpx_log.addFilter(redact)
    pool = settings.places_concurrency
    try:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(deadline),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            headers={"User-Agent": "herd_trio (+httpx)"},
            # No HTTP(S)_PROXY/NO_PROXY from the environment: a request carrying the key
            # goes where the config says, nowhere else. places_url is the override.
            trust_env=False,
        ) as client:
            yield GooglePlaces(
                client=client,
                endpoint=endpoint,
                limiter=trio.CapacityLimiter(pool),
                cache=AnswerCache(ttl=settings.places_cache_ttl, size=settings.places_cache_size),
                deadline=deadline,
                scrub=scrub,
            )
    finally:
        httpx_log.removeFilter(redact)
