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

if TYPE_CHECKING:
    from herd_trio.config import HerdConfig

JSON = dict[str, Any]

_LF_RUNS = re.compile(r"\n{2,}")


class PlacesSource(Protocol):
    """Anything that can list places near a point, in legacy Nearby Search shape."""

    async def nearby(self, lat: Decimal, lon: Decimal, radius_m: int, bound: int) -> JSON:
        """Up to `bound` places within `radius_m` metres of (lat, lon); never raises.

        May block (data still loading, a remote call); the caller puts the deadline
        around it (PROTOCOL.md: `places_timeout`).
        """
        ...


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

    Indented like the classic servers (`indent=3`, UTF-8 rather than `\\u` escapes); runs
    of LFs are squeezed to one so the reply's closing blank line is unambiguous, and the
    JSON never ends in an LF of its own.
    """
    text = json.dumps(body, indent=3, ensure_ascii=False)
    # A lone surrogate (from a source's broken "\\ud83d") cannot be UTF-8: write it
    # back as the JSON escape it came from, which keeps the JSON valid.
    return _LF_RUNS.sub("\n", text).rstrip("\n").encode("utf-8", "backslashreplace")


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
