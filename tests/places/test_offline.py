"""The offline source (offline.py): the index child (build.py), waiting, failure, the cache.

Real child processes on real and small synthetic GeoNames tables, no mocks.
"""

from __future__ import annotations

import logging
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import trio

from herd_trio.places import error_body
from herd_trio.places.build import DataFiles, cache_path
from herd_trio.places.codec import decode_index, index_key
from herd_trio.places.index import PlacesIndex, answer, build_index
from herd_trio.places.offline import child_command, open_offline

from .offlinekit import COUNTRIES, LOS_ANGELES, MID_PACIFIC, SMALL, US_STATES, place, write_tables


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory shared by the tests that run the real child (one cold build)."""
    return tmp_path_factory.mktemp("places-cache")


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    """A data directory holding the SMALL tables."""
    return write_tables(tmp_path / "data", SMALL)


# ---- the source: child process, waiting, failure, cache ----


def latlon(lat: float, lon: float) -> tuple[Decimal, Decimal]:
    """Coordinates as the server passes them."""
    return Decimal(str(lat)), Decimal(str(lon))


async def test_query_before_loading_waits_then_answers(
    real_cache: Path, real_index: PlacesIndex
) -> None:
    async with open_offline(cache_dir=real_cache) as places:
        assert not places.ready
        body = await places.nearby(*latlon(*LOS_ANGELES), 10_000, 5)
        assert places.ready
    assert places.failure is None
    # The child's index answers exactly as the one built in this process.
    assert body == answer(real_index, *LOS_ANGELES, 10_000, 5)
    assert [r["name"] for r in body["results"]][:2] == ["Los Angeles", "Hollywood"]


async def test_source_answers_real_queries(real_cache: Path, real_index: PlacesIndex) -> None:
    async with open_offline(cache_dir=real_cache) as places:
        pacific = await places.nearby(*latlon(*MID_PACIFIC), 50_000, 20)
        egvekinot = await places.nearby(*latlon(66.3, 179.95), 50_000, 20)  # across 180
        bad = await places.nearby(Decimal("NaN"), Decimal(0), 50_000, 20)
        north = await places.nearby(Decimal("90.000001"), Decimal(0), 50_000, 20)
    assert pacific == {"html_attributions": [], "results": [], "status": "ZERO_RESULTS"}
    assert [r["name"] for r in egvekinot["results"]] == ["Egvekinot"]
    assert egvekinot == answer(real_index, 66.3, 179.95, 50_000, 20)
    assert bad == error_body("INVALID_REQUEST", "no such point: NaN, 0")
    assert north == error_body("INVALID_REQUEST", "no such point: 90.000001, 0")


async def test_bound_zero_answers_ok_at_once_without_the_data(tmp_path: Path) -> None:
    async with open_offline(data_dir=tmp_path / "missing", cache=False) as places:
        body = await places.nearby(*latlon(*LOS_ANGELES), 10_000, 0)
        assert not places.ready  # it did not wait for (or need) the data
    assert body == {"html_attributions": [], "results": [], "status": "OK"}


async def test_failed_load_answers_unknown_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_offline(data_dir=tmp_path / "missing", cache=False) as places:
        body = await places.nearby(*latlon(*LOS_ANGELES), 10_000, 5)
    assert body == {
        "html_attributions": [],
        "results": [],
        "status": "UNKNOWN_ERROR",
        "error_message": "offline places data is unavailable",
    }
    assert places.failure is not None
    assert places.failure.startswith(
        "index child exited with status 1: cannot build the places index: FileNotFoundError"
    )
    assert any(
        rec.levelno == logging.ERROR and "offline places unavailable" in rec.getMessage()
        for rec in caplog.records
    )


async def test_cache_is_written_then_reused(small_data: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    async with open_offline(data_dir=small_data, cache_dir=cache_dir) as places:
        first = await places.nearby(*latlon(34.0, -118.0), 5_000, 5)
    cached = cache_path(cache_dir, DataFiles(small_data))
    before = cached.stat()
    async with open_offline(data_dir=small_data, cache_dir=cache_dir) as places:
        second = await places.nearby(*latlon(34.0, -118.0), 5_000, 5)
    after = cached.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert first == second
    assert [r["place_id"] for r in first["results"]] == ["geonames:1", "geonames:2"]
    # No temp files left behind; the lock file that serialises builds stays.
    assert sorted(cache_dir.iterdir()) == [cached, cached.with_suffix(".lock")]


async def test_changed_data_or_damaged_cache_is_rebuilt(small_data: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cached = cache_path(cache_dir, DataFiles(small_data))
    cache_dir.mkdir()
    cached.write_bytes(b"garbage")
    async with open_offline(data_dir=small_data, cache_dir=cache_dir) as places:
        await places.wait_ready()
    assert places.failure is None
    assert index_key(cached.read_bytes()) == DataFiles(small_data).key()
    write_tables(small_data, [*SMALL, place(4, 34.0, -118.001, 9999, "US")])
    async with open_offline(data_dir=small_data, cache_dir=cache_dir) as places:
        body = await places.nearby(*latlon(34.0, -118.0), 5_000, 1)
    assert [r["place_id"] for r in body["results"]] == ["geonames:4"]  # the new, most populous


async def test_unwritable_cache_is_skipped(
    small_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    async with open_offline(data_dir=small_data, cache_dir=not_a_dir / "cache") as places:
        body = await places.nearby(*latlon(34.0, -118.0), 5_000, 5)
    assert places.failure is None
    assert [r["place_id"] for r in body["results"]] == ["geonames:1", "geonames:2"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # The child's stderr, quoted at WARNING (its tail: an "ignoring cache" line comes first).
    cached = cache_path(not_a_dir / "cache", DataFiles(small_data))
    assert warning.startswith("offline places: ")
    assert warning.endswith(
        f"\nnot caching the places index at {cached}:"
        f" [Errno 20] Not a directory: '{not_a_dir / 'cache'}'"
    )


async def test_child_runs_from_any_working_directory(small_data: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = child_command(data_dir=small_data, cache=False)
    assert command[:3] == [sys.executable, "-m", "herd_trio.places.build"]
    done = await trio.run_process(command, cwd=elsewhere, capture_stdout=True)
    assert decode_index(done.stdout) == build_index(SMALL, COUNTRIES, US_STATES)


async def test_error_in_the_block_propagates_and_stops_loading(small_data: Path) -> None:
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="boom")):
        async with open_offline(data_dir=small_data, cache=False) as places:
            raise ValueError("boom")
    assert places.ready  # closed mid-load: waiting queries are released
    assert places.failure == "the offline places source is closed"
