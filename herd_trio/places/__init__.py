"""Places sources: what WHATSAT puts after the AT line.

Every source answers in the shape of Google's legacy Nearby Search response
(`html_attributions`, `results`, `status`, maybe `next_page_token`). A source that fails
answers with a non-OK status and an `error_message` instead of raising, so the server
has a single seam to call and a single shape to render.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

if TYPE_CHECKING:
    from herd_trio.config import HerdConfig

JSON = dict[str, Any]

_LF_RUNS = re.compile(rb"\n{2,}")


class PlacesSource(Protocol):
    """Anything that can list places near a point, in legacy Nearby Search shape."""

    async def nearby(self, lat: Decimal, lon: Decimal, radius_m: int, bound: int) -> JSON:
        """Up to `bound` places within `radius_m` metres of (lat, lon); never raises.

        May block (data still loading, a remote call); the caller puts the deadline
        around it (PROTOCOL.md: `places_timeout`).
        """
        ...


def readiness(source: object) -> tuple[bool, str | None]:
    """Whether `source` answers from its data now, and why it never will if it failed.

    A source that loads data (offline) says so with `ready` and `failure` attributes;
    one without them (google: nothing to load) is ready at once.
    """
    failure = getattr(source, "failure", None)
    if isinstance(failure, str):
        return False, failure
    return bool(getattr(source, "ready", True)), None


def legacy_body(
    results: list[JSON],
    status: str,
    *,
    attributions: list[str] | None = None,
    error_message: str | None = None,
) -> JSON:
    """A legacy Nearby Search response object with keys in Google's order."""
    body: JSON = {"html_attributions": attributions or [], "results": results, "status": status}
    if error_message is not None:
        body["error_message"] = error_message
    return body


def error_body(status: str, message: str) -> JSON:
    """The answer of a source that failed: no results, a non-OK status, a reason."""
    return legacy_body([], status, error_message=message)


def render(body: JSON) -> bytes:
    """Serialise a places answer for the wire (PROTOCOL.md §2).

    Indented like the classic servers (`json.dumps(body, indent=3, ensure_ascii=False)`:
    three spaces, UTF-8 rather than `\\u` escapes), with no LF of its own at the end.
    msgspec writes the same layout some 20 times faster than the json module's Python
    encoder, which was most of a WHATSAT's cost; floats may be spelt differently
    (`0.00001` for `1e-05`), with the same value. The json module takes over for what
    msgspec refuses (a lone surrogate from a source's broken `"\\ud83d"`, written back
    as that escape, or NaN). Runs of LFs are squeezed to one so the reply's closing
    blank line is unambiguous; neither encoder writes a raw LF inside a string.
    """
    try:
        data = msgspec.json.format(msgspec.json.encode(body), indent=3)
    except (msgspec.EncodeError, UnicodeEncodeError, TypeError, ValueError):
        text = json.dumps(body, indent=3, ensure_ascii=False)
        data = text.encode("utf-8", "backslashreplace")
    if b"\n\n" in data:
        data = _LF_RUNS.sub(b"\n", data)
    return data.rstrip(b"\n")


@asynccontextmanager
async def open_places(herd: HerdConfig) -> AsyncIterator[PlacesSource]:
    """Open the places source `herd` configures; it is closed when the block exits.

    One source serves every server of a process (`--all` shares it), so data and
    connection pools are loaded and opened once.
    """
    if herd.herd.places == "offline":
        from herd_trio.places.offline import open_offline

        async with open_offline() as source:
            yield source
    else:
        from herd_trio.places.google import open_google

        async with open_google(herd) as google:
            yield google
