"""Google's answers as legacy Nearby Search bodies: New translated, legacy checked.

`translate_new` maps a Places API (New) `searchNearby` body to legacy shape, field by
field (docs/places.md has the table); `pass_legacy` checks a legacy body and trims it to
the bound; `upstream_message` and `status_for_http` read a failed call. Pure: bytes in,
JSON out, BadAnswer for bytes that are not the answer we expect; no trio, no I/O.
"""

from __future__ import annotations

import html
from typing import Any

import msgspec

from herd_trio.places import JSON, legacy_body

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

# The statuses of an answer proper: legacy must send `results` with them, and the
# source caches only answers with them (errors are not worth keeping).
KEPT_STATUSES = frozenset({"OK", "ZERO_RESULTS"})

PRICE_LEVELS = {
    "PRICE_LEVEL_FREE": 0,
    "PRICE_LEVEL_INEXPENSIVE": 1,
    "PRICE_LEVEL_MODERATE": 2,
    "PRICE_LEVEL_EXPENSIVE": 3,
    "PRICE_LEVEL_VERY_EXPENSIVE": 4,
}
_UNSPECIFIED = "BUSINESS_STATUS_UNSPECIFIED"


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


def _lat_lng(point: _LatLng) -> JSON:
    return {"lat": point.latitude, "lng": point.longitude}


def _attribution(author: _Author) -> str:
    """A legacy `html_attributions` entry: a link to the contributor, as legacy gives."""
    name = html.escape(author.display_name or "")
    if not author.uri:
        return name
    uri = f"https:{author.uri}" if author.uri.startswith("//") else author.uri
    return f'<a href="{html.escape(uri)}">{name}</a>'


def _geometry(place: _Place) -> JSON:
    geometry: JSON = {"location": _lat_lng(place.location)}
    if place.viewport is not None:
        geometry["viewport"] = {
            "northeast": _lat_lng(place.viewport.high),
            "southwest": _lat_lng(place.viewport.low),
        }
    return geometry


def _photo(photo: _Photo) -> JSON:
    return {
        "height": photo.height_px,
        "html_attributions": [_attribution(a) for a in photo.author_attributions],
        # The New photo resource name ("places/ID/photos/REF"): what Place Photos
        # (New) takes, and as opaque to a client as the legacy reference was.
        "photo_reference": photo.name,
        "width": photo.width_px,
    }


def _plus_code(code: _PlusCode) -> JSON:
    plus_code: JSON = {}
    if code.compound_code is not None:
        plus_code["compound_code"] = code.compound_code
    if code.global_code is not None:
        plus_code["global_code"] = code.global_code
    return plus_code


def translate_place(place: _Place) -> JSON:
    """One Places API (New) place as a legacy Nearby Search result.

    Keys in legacy's (alphabetical) order; a field absent from the place is absent from
    the result, and falsy values (`open_now: false`, `rating: 0`) are kept.
    """
    result: JSON = {}
    if place.business_status is not None and place.business_status != _UNSPECIFIED:
        result["business_status"] = place.business_status
    result["geometry"] = _geometry(place)
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
        result["photos"] = [_photo(photo) for photo in place.photos]
    result["place_id"] = place.id
    if place.plus_code is not None:
        result["plus_code"] = _plus_code(place.plus_code)
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


def upstream_message(content: bytes) -> str:
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
