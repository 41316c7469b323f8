"""The offline places index: GeoNames places as parallel columns, searched by radius.

Pure: no trio and no I/O, so small datasets test it in-process. `build_index` makes it
from parsed places, `search` ranks the places in a circle, `answer` gives the legacy
Nearby Search body. `codec.py` turns it into bytes and back (what the child process of
`build.py` writes and its cache keeps).

The index is a set of parallel columns (about 10 MB in all, instead of 235k dicts): the
places sorted by grid cell and, within a cell, by population descending. A radius query
visits the cells that overlap the circle's bounding box and merges their lists lazily in
population order, stopping as soon as `bound` places in the circle are found.

Place data: GeoNames (https://www.geonames.org/), CC BY 4.0; every answer that shows
places carries that credit (ATTRIBUTION) in `html_attributions`.
"""

from __future__ import annotations

import array
import bisect
import heapq
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import attrs
import msgspec

from herd_trio.places import JSON, legacy_body

ATTRIBUTION = 'Place data &copy; <a href="https://www.geonames.org/">GeoNames</a>, CC BY 4.0'
EARTH_RADIUS_M = 6371008.8  # the IUGG mean radius, the usual choice for haversine
PLACE_TYPES = ("locality", "political")  # what the legacy API calls a city or town

# 0.25 degree cells: a 50 km circle overlaps ~5 rows of ~7 cells at mid latitudes, and
# the densest cell (Hong Kong) holds ~270 places, so a query touches few cells and the
# population-ordered merge rarely pops places far outside the circle.
CELL_DEG = 0.25
ROWS = 720  # 180 / CELL_DEG
COLS = 1440  # 360 / CELL_DEG
# Widen every query box by this much (about 0.1 m) so rounding in the box arithmetic can
# never leave out a place the distance test would accept; an extra cell costs nothing.
BOX_MARGIN_DEG = 1e-6

# Column types. `i` is a C int, 4 bytes on every platform CPython supports; the check
# keeps a surprise from corrupting an index silently.
TypeCode = Literal["i", "d", "H"]
_INT32: Final = "i"
_FLOAT64: Final = "d"
_UINT16: Final = "H"
if array.array(_INT32).itemsize != 4 or array.array(_UINT16).itemsize != 2:
    raise ImportError("herd_trio.places.index needs 4-byte C ints and 2-byte shorts")


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


@attrs.frozen
class Column:
    """How one array column of PlacesIndex is stored.

    Its length is the number of cells or of places (`per`), plus `extra` (the offset
    columns carry one more entry: the end of the last range).
    """

    typecode: TypeCode
    per: Literal["cell", "place"] = "place"
    extra: int = 0

    def length(self, cells: int, places: int) -> int:
        """How many entries the column has in an index of that size."""
        return (cells if self.per == "cell" else places) + self.extra


def _layout(
    typecode: TypeCode, per: Literal["cell", "place"] = "place", extra: int = 0
) -> dict[str, Column]:
    """The metadata that makes a PlacesIndex field an array column."""
    return {"column": Column(typecode, per, extra)}


@attrs.frozen
class PlacesIndex:
    """The places as parallel columns, sorted by (cell, population desc, geonameid).

    Position `i` in every per-place column is the same place. Cell `k` holds positions
    `cell_starts[k]` to `cell_starts[k + 1] - 1`; `cell_keys` (ascending) says which grid
    cell (`row * COLS + col`) it is. Only non-empty cells are listed.

    The array fields, in this order, are COLUMNS (also the order of the binary form,
    codec.py): this class is the one place that lists them.
    """

    cell_keys: array.array[int] = attrs.field(metadata=_layout(_INT32, "cell"))
    cell_starts: array.array[int] = attrs.field(metadata=_layout(_INT32, "cell", extra=1))
    lat: array.array[float] = attrs.field(metadata=_layout(_FLOAT64))  # degrees, as in the file
    lon: array.array[float] = attrs.field(metadata=_layout(_FLOAT64))
    population: array.array[int] = attrs.field(metadata=_layout(_INT32))
    geonameid: array.array[int] = attrs.field(metadata=_layout(_INT32))
    vicinity: array.array[int] = attrs.field(metadata=_layout(_UINT16))  # into `vicinities`
    name_offsets: array.array[int] = attrs.field(metadata=_layout(_INT32, extra=1))  # into names
    names: bytes  # every name, UTF-8, back to back
    vicinities: tuple[str, ...]

    @classmethod
    def from_values(
        cls, names: bytes, vicinities: tuple[str, ...], **columns: Iterable[float]
    ) -> PlacesIndex:
        """An index from each column's values (any iterable), stored with its typecode.

        OverflowError for a value its column's type can't hold (a population beyond 32
        bits, more than 65536 vicinities).
        """
        arrays: dict[str, Any] = {
            name: array.array(col.typecode, columns[name]) for name, col in COLUMNS
        }
        return cls(names=names, vicinities=vicinities, **arrays)

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


# (field name, layout) of every array column of PlacesIndex, in declaration order.
COLUMNS: Final[tuple[tuple[str, Column], ...]] = tuple(
    (field.name, field.metadata["column"])
    for field in attrs.fields(PlacesIndex)
    if "column" in field.metadata
)


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
    """Build the searchable index of `places`.

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
    ordered = [row[3] for row in rows]

    cell_keys: list[int] = []
    cell_starts: list[int] = []
    for i, (cell, *_) in enumerate(rows):
        if not cell_keys or cell_keys[-1] != cell:
            cell_keys.append(cell)
            cell_starts.append(i)
    cell_starts.append(len(rows))
    vicinity_ids: dict[str, int] = {}  # dicts keep insertion order: id i is entry i
    vicinity = [
        vicinity_ids.setdefault(vicinity_of(p, countries, us_states), len(vicinity_ids))
        for p in ordered
    ]
    names = [p.name.encode("utf-8") for p in ordered]
    return PlacesIndex.from_values(
        names=b"".join(names),
        vicinities=tuple(vicinity_ids),
        cell_keys=cell_keys,
        cell_starts=cell_starts,
        lat=[p.latitude for p in ordered],
        lon=[p.longitude for p in ordered],
        population=[p.population for p in ordered],
        geonameid=[p.geonameid for p in ordered],
        vicinity=vicinity,
        name_offsets=itertools.accumulate(map(len, names), initial=0),
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


# A cell's next place in the merge: (-population, position, end of the cell).
# Positions are unique, so the tuple comparison never reaches the cell end.
Cursor = tuple[int, int, int]


def _cell_heap(index: PlacesIndex, lat: float, lon: float, radius_m: float) -> list[Cursor]:
    """A heap of one cursor per non-empty cell that overlaps the circle's bounding box."""
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
    heap: list[Cursor] = []
    for row in range(_row(lat - half_height), _row(lat + half_height) + 1):
        for first_col, last_col in columns:
            # A row's cells are contiguous in the sorted key array: two bisects find them.
            low = bisect.bisect_left(keys, row * COLS + first_col)
            high = bisect.bisect_right(keys, row * COLS + last_col, lo=low)
            for cell in range(low, high):
                start = starts[cell]
                heap.append((-population[start], start, starts[cell + 1]))
    heapq.heapify(heap)
    return heap


def search(index: PlacesIndex, lat: float, lon: float, radius_m: float, bound: int) -> list[int]:
    """Positions of the top `bound` places within `radius_m` of (lat, lon), best first.

    Ranking: population descending, then distance ascending, then geonameid, so the
    answer is the same every time. Cost grows with the number of places popped, which
    stays near `bound` unless most of the box lies outside the circle.
    """
    if bound <= 0:
        return []
    heap = _cell_heap(index, lat, lon, radius_m)
    lats, lons, population = index.lat, index.lon, index.population
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
