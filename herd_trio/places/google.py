"""Google places sources: Places API (New) translated to legacy shape, or legacy as is.

`places = "google"` POSTs `{base}/v1/places:searchNearby` and translates each place to a
legacy Nearby Search result (docs/places.md has the table); `places = "google-legacy"`
GETs `{base}/maps/api/place/nearbysearch/json` and passes Google's JSON through, results
trimmed to the bound (translate.py reads both kinds of answer). Either way `nearby()`
never raises (cancellation aside): a failed call answers `error_body(status, message)`
with PROTOCOL.md §2's status for the failure.

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
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import TYPE_CHECKING
from urllib.parse import quote

import attrs
import httpx
import msgspec
import trio

from herd_trio.places import JSON, error_body, legacy_body
from herd_trio.places.cache import AnswerCache, CacheStatistics
from herd_trio.places.translate import (
    FIELD_MASK,
    KEPT_STATUSES,
    BadAnswer,
    pass_legacy,
    status_for_http,
    translate_new,
    upstream_message,
)

if TYPE_CHECKING:
    from herd_trio.config import HerdConfig

log = logging.getLogger(__name__)

NEW_BASE = "https://places.googleapis.com"
LEGACY_BASE = "https://maps.googleapis.com"
NEW_PATH = "/v1/places:searchNearby"
LEGACY_PATH = "/maps/api/place/nearbysearch/json"

# The server cancels a WHATSAT's places call after `places_timeout` and answers a bare
# UNKNOWN_ERROR. Our own deadline fires a little earlier, so the answer says what timed out.
DEADLINE_SHARE = 0.9  # of places_timeout ...
DEADLINE_HEADROOM = 0.5  # ... but at most this many seconds short of it
MAX_BODY = 4 << 20  # bytes; 20 places with photos are ~100 kB, so more is not an answer
MAX_MESSAGE = 300  # characters of an upstream error message worth passing on
REDACTED = "[key redacted]"

CacheKey = tuple[Decimal, Decimal, int, int]  # (lat, lon, radius_m, bound), exact values


_encode_exact = msgspec.json.Encoder(decimal_format="number").encode  # 34.068930 stays so


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
                detail = upstream_message(content)
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
async def open_google(
    herd: HerdConfig, *, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[GooglePlaces]:
    """Open the Google source `herd` configures; its HTTP client closes when the block exits.

    Reads the key from the environment (`herd.places_key()`, KeyError if unset: the
    config check has already refused that). While open, httpx's request log lines have
    the key replaced. `transport` replaces httpx's network transport (and with it the
    connection pool limits): tests pass an `httpx.MockTransport`.
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
            transport=transport,
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
