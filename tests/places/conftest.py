"""Fixtures of the places tests: the API key in the environment and the two fake APIs."""

from __future__ import annotations

import pytest
import trio

from herd_trio.places.build import DataFiles
from herd_trio.places.index import PlacesIndex

from .googlekit import KEY, KEY_ENV
from .httpserver import FakeHTTPServer, start_fake_http
from .mockapi import MockAPI


@pytest.fixture(autouse=True)
def places_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key the Google sources read (harmless for the offline tests)."""
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
async def server(nursery: trio.Nursery) -> FakeHTTPServer:
    """A real HTTP server on 127.0.0.1, serving until the test ends."""
    return await start_fake_http(nursery)


@pytest.fixture
def api() -> MockAPI:
    """A fake API inside httpx (MockTransport): pair it with `autojump_clock`."""
    return MockAPI()


@pytest.fixture(scope="session")
def real_index() -> PlacesIndex:
    """The packaged GeoNames index, built in-process once for the whole session."""
    return DataFiles.packaged().load()


@pytest.fixture(scope="session")
def by_latitude(real_index: PlacesIndex) -> tuple[list[float], list[int]]:
    """Real positions sorted by latitude, so brute force can scan just a latitude band."""
    order = sorted(range(len(real_index)), key=real_index.lat.__getitem__)
    return [real_index.lat[i] for i in order], order
