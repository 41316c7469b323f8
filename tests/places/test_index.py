"""The offline index: building it and searching it (index.py); pure, no event loop.

Real GeoNames data and small synthetic tables, no mocks. The search is held to a
brute-force scan (real data at seeded random points; synthetic data placed on cell
borders, the antimeridian, the poles and the rim of the circle). Speed targets live in
the benchmark (`python -m herd_trio.places.build --bench`), not here.
"""

from __future__ import annotations

import bisect
import json
import math
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from herd_trio.places import render
from herd_trio.places.index import (
    ATTRIBUTION,
    CELL_DEG,
    Place,
    PlacesIndex,
    answer,
    build_index,
    distance_m,
    search,
)

from .offlinekit import (
    COUNTRIES,
    LOS_ANGELES,
    MID_PACIFIC,
    RESULT_KEYS,
    SMALL,
    US_STATES,
    brute_force,
    haversine_m,
    ids,
    place,
)

HYPOTHESIS = settings(
    max_examples=300,
    derandomize=True,  # a fixed set of examples: the same test every run
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---- search on real data ----


def test_los_angeles_top_five_are_the_most_populous_within_10_km(
    real_index: PlacesIndex,
) -> None:
    hits = search(real_index, *LOS_ANGELES, 10_000, 5)
    # The five most populous of the 17 places within 10 km (scanned once with haversine_m
    # and written down here, so the test does not share code with the search).
    assert [(real_index.geonameid[i], real_index.name(i)) for i in hits] == [
        (5368361, "Los Angeles"),
        (5357527, "Hollywood"),
        (5344994, "East Los Angeles"),
        (5363748, "Koreatown"),
        (5330413, "Boyle Heights"),
    ]
    everything = range(len(real_index))
    lats, lons = real_index.lat, real_index.lon
    near = [i for i in everything if haversine_m(*LOS_ANGELES, lats[i], lons[i]) <= 10_000]
    assert len(near) == 17
    ranked = sorted(near, key=lambda i: (-real_index.population[i], real_index.geonameid[i]))
    assert hits == ranked[:5]


def test_answer_has_legacy_shape_and_exact_key_order(real_index: PlacesIndex) -> None:
    body = answer(real_index, *LOS_ANGELES, 10_000, 2)
    assert list(body) == ["html_attributions", "results", "status"]
    assert body["status"] == "OK"
    assert body["html_attributions"] == [ATTRIBUTION]
    assert body["results"][0] == {
        "geometry": {"location": {"lat": 34.05223, "lng": -118.24368}},
        "name": "Los Angeles",
        "place_id": "geonames:5368361",
        "types": ["locality", "political"],
        "vicinity": "California, United States",
    }
    for result in body["results"]:
        assert list(result) == RESULT_KEYS
        assert list(result["geometry"]) == ["location"]
        assert list(result["geometry"]["location"]) == ["lat", "lng"]


def test_rendered_answer_is_valid_json_that_round_trips(real_index: PlacesIndex) -> None:
    body = answer(real_index, 48.8566, 2.3522, 50_000, 20)  # Paris: accents in names
    text = render(body)
    assert json.loads(text) == body
    assert list(json.loads(text)["results"][0]) == RESULT_KEYS
    assert body["results"][0]["vicinity"] == "France"
    assert not text.endswith(b"\n")


def test_empty_ocean_gives_zero_results(real_index: PlacesIndex) -> None:
    assert answer(real_index, *MID_PACIFIC, 50_000, 20) == {
        "html_attributions": [],
        "results": [],
        "status": "ZERO_RESULTS",
    }


@pytest.mark.parametrize("bound", [1, 3, 20])
def test_results_never_exceed_bound(real_index: PlacesIndex, bound: int) -> None:
    body = answer(real_index, 22.3193, 114.1694, 50_000, bound)  # Hong Kong: ~1000 places
    twenty = answer(real_index, 22.3193, 114.1694, 50_000, 20)["results"]
    assert len(twenty) == 20
    assert body["results"] == twenty[:bound]  # the same ranking, cut shorter


def test_search_crosses_the_antimeridian(real_index: PlacesIndex) -> None:
    # Fiji: Levuka lies at +179.3, Tubou at -178.8; a circle centred on -179.75 reaches
    # both (~100 km each way; search takes any radius, the protocol caps it at 50 km).
    lat, lon = -18.15, -179.75
    hits = search(real_index, lat, lon, 120_000, 20)
    assert {"Tubou", "Levuka"} <= {real_index.name(i) for i in hits}
    everything = range(len(real_index))
    assert ids(real_index, hits) == brute_force(real_index, everything, lat, lon, 120_000, 20)


def test_search_near_the_poles(real_index: PlacesIndex) -> None:
    # Longyearbyen (78.2 N) is the northernmost place in the table; nothing is near a pole.
    hits = search(real_index, 78.2232, 15.6267, 10_000, 20)
    assert [real_index.name(i) for i in hits] == ["Longyearbyen"]
    for lat, lon in [(90.0, 0.0), (-90.0, 0.0), (89.99, -179.99), (-89.5, 123.0)]:
        assert search(real_index, lat, lon, 50_000, 20) == []


def random_queries(index: PlacesIndex, count: int) -> list[tuple[float, float, float, int]]:
    """Seeded queries: two in three near a real place (dense answers), one anywhere."""
    rng = random.Random(20260101)
    queries = []
    for n in range(count):
        if n % 3:
            i = rng.randrange(len(index))
            lat = max(-90.0, min(90.0, index.lat[i] + rng.uniform(-0.05, 0.05)))
            lon = (index.lon[i] + rng.uniform(-0.05, 0.05) + 180.0) % 360.0 - 180.0
        else:
            lat = math.degrees(math.asin(rng.uniform(-1.0, 1.0)))  # uniform on the sphere
            lon = rng.uniform(-180.0, 180.0)
        radius = math.exp(rng.uniform(math.log(2_000.0), math.log(50_000.0)))
        queries.append((lat, lon, radius, rng.randint(1, 20)))
    return queries


def test_search_equals_brute_force_on_real_data(
    real_index: PlacesIndex, by_latitude: tuple[list[float], list[int]]
) -> None:
    latitudes, order = by_latitude
    answered = 0
    for lat, lon, radius, bound in random_queries(real_index, 400):
        # Brute force over a latitude band: anything within r lies within r/R radians of
        # latitude, whatever its longitude, so the band is a superset and needs no cells.
        band = math.degrees(radius / 6371008.8) + 1e-6
        low = bisect.bisect_left(latitudes, lat - band)
        high = bisect.bisect_right(latitudes, lat + band)
        expected = brute_force(real_index, order[low:high], lat, lon, radius, bound)
        assert ids(real_index, search(real_index, lat, lon, radius, bound)) == expected
        answered += len(expected) == bound
    assert answered > 100  # most queries near a place fill their bound: ranking is tested


# ---- search on synthetic data: ties, cell borders, antimeridian, poles ----


def test_equal_populations_rank_by_distance_then_geonameid() -> None:
    index = build_index(
        [
            place(10, 0.03, 0.0),  # farthest
            place(11, 0.01, 0.0),
            place(13, 0.02, 0.0),
            place(12, 0.02, 0.0),  # same spot as 13: the lower id first
            place(14, 0.05, 0.0, population=2000),  # most populous wins though farthest
        ],
        COUNTRIES,
        US_STATES,
    )
    assert ids(index, search(index, 0.0, 0.0, 10_000, 5)) == [14, 11, 12, 13, 10]
    assert ids(index, search(index, 0.0, 0.0, 10_000, 3)) == [14, 11, 12]


def test_ties_spread_over_cells_resolve_by_distance() -> None:
    # Same population in four cells around a corner: the merge must not stop at the first
    # cell's tie, or a farther place in it would beat a nearer one in the next cell.
    corner = 4 * CELL_DEG
    index = build_index(
        [
            place(1, corner + 0.05, corner + 0.05),
            place(2, corner - 0.01, corner - 0.01),
            place(3, corner + 0.02, corner - 0.02),
            place(4, corner - 0.03, corner + 0.03),
        ],
        COUNTRIES,
        US_STATES,
    )
    assert ids(index, search(index, corner, corner, 20_000, 2)) == [2, 3]


def test_places_on_cell_borders_and_the_antimeridian_are_found() -> None:
    index = build_index(
        [
            place(1, 0.25, 0.25),
            place(2, 0.0, 180.0),
            place(3, 0.0, -180.0),
            place(4, 90.0, 0.0),
            place(5, -90.0, 45.0),
            place(6, 0.0, 179.99),
        ],
        COUNTRIES,
        US_STATES,
    )
    assert ids(index, search(index, 0.25, 0.25, 1, 5)) == [1]
    assert ids(index, search(index, 0.25 - 1e-12, 0.25 - 1e-12, 1, 5)) == [1]
    assert sorted(ids(index, search(index, 0.0, -179.999, 2_000, 5))) == [2, 3, 6]
    assert ids(index, search(index, 89.9, -100.0, 20_000, 5)) == [4]  # across the pole
    assert ids(index, search(index, -89.9, -135.0, 20_000, 5)) == [5]


def test_bound_zero_or_empty_index_finds_nothing() -> None:
    index = build_index(SMALL, COUNTRIES, US_STATES)
    assert search(index, 34.0, -118.0, 50_000, 0) == []
    empty = build_index([], COUNTRIES, US_STATES)
    assert search(empty, 34.0, -118.0, 50_000, 20) == []


# Centres where the grid is awkward: the antimeridian, both poles, a cell corner.
AWKWARD = [(0.0, 180.0), (-17.0, -180.0), (89.8, 30.0), (-89.9, -60.0), (10.0, 10.0)]


@HYPOTHESIS
@given(
    centre=st.sampled_from(AWKWARD),
    offsets=st.lists(
        st.tuples(
            st.one_of(st.floats(-1.0, 1.0), st.sampled_from([-0.25, 0.0, 0.25])),
            st.one_of(st.floats(-1.0, 1.0), st.sampled_from([-0.25, 0.0, 0.25])),
            st.sampled_from([0, 500, 1000]),  # few values, so ties are common
        ),
        max_size=60,
    ),
    query=st.tuples(st.floats(-0.5, 0.5), st.floats(-0.5, 0.5)),
    radius=st.one_of(st.floats(0.0, 120_000.0), st.just(25_000_000.0)),
    bound=st.integers(1, 20),
)
def test_search_equals_brute_force_on_awkward_synthetic_data(
    centre: tuple[float, float],
    offsets: list[tuple[float, float, int]],
    query: tuple[float, float],
    radius: float,
    bound: int,
) -> None:
    def point(dlat: float, dlon: float) -> tuple[float, float]:
        lat = max(-90.0, min(90.0, centre[0] + dlat))
        lon = centre[1] + dlon
        return lat, (lon - 360.0 if lon > 180.0 else lon + 360.0 if lon < -180.0 else lon)

    places = [place(n, *point(dlat, dlon), pop) for n, (dlat, dlon, pop) in enumerate(offsets)]
    index = build_index(places, COUNTRIES, US_STATES)
    lat, lon = point(*query)
    expected = brute_force(index, range(len(index)), lat, lon, radius, bound)
    event(f"hits: {min(len(expected), 5)}{'+' if len(expected) > 5 else ''}")
    assert ids(index, search(index, lat, lon, radius, bound)) == expected


def destination(lat: float, lon: float, bearing_deg: float, distance: float) -> tuple[float, float]:
    """The point `distance` metres from (lat, lon) along `bearing_deg` (great circle)."""
    phi, delta, theta = math.radians(lat), distance / 6371008.8, math.radians(bearing_deg)
    phi2 = math.asin(
        math.sin(phi) * math.cos(delta) + math.cos(phi) * math.sin(delta) * math.cos(theta)
    )
    dlon = math.atan2(
        math.sin(theta) * math.sin(delta) * math.cos(phi),
        math.cos(delta) - math.sin(phi) * math.sin(phi2),
    )
    lon2 = (lon + math.degrees(dlon) + 180.0) % 360.0 - 180.0
    return max(-90.0, min(90.0, math.degrees(phi2))), lon2


@HYPOTHESIS
@given(
    centre=st.one_of(
        st.sampled_from(AWKWARD),
        st.tuples(st.floats(-89.9, 89.9), st.floats(-180.0, 180.0)),
    ),
    radius=st.floats(10.0, 100_000.0),
    rim=st.lists(
        st.tuples(
            st.one_of(st.sampled_from([0.0, 90.0, 180.0, 270.0]), st.floats(0.0, 360.0)),
            st.floats(0.99, 1.0),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_places_on_the_rim_of_the_circle_are_found(
    centre: tuple[float, float], radius: float, rim: list[tuple[float, float]]
) -> None:
    # The circle's northernmost, southernmost and widest points decide the cells to
    # visit; places just inside the rim there catch a box that is a little too small.
    places = [
        place(n, *destination(*centre, bearing, radius * fraction))
        for n, (bearing, fraction) in enumerate(rim)
    ]
    index = build_index(places, COUNTRIES, US_STATES)
    inside = {p.geonameid for p in places if distance_m(*centre, p.latitude, p.longitude) <= radius}
    assert set(ids(index, search(index, *centre, radius, len(places)))) == inside


@pytest.mark.parametrize("lat", [0.1, 45.3, 70.2, -60.7])
@pytest.mark.parametrize("radius", [1_000.0, 50_000.0])
@pytest.mark.parametrize("edge", [-180.0, 7.25, 180.0])
def test_rim_just_past_a_cell_edge_is_searched(lat: float, radius: float, edge: float) -> None:
    # Put the circle's extreme points 1e-7 degrees past a cell edge (north, south, east,
    # west) with a place right there: a box short by even a few metres misses it.
    delta = radius / 6371008.8
    half_height = math.degrees(delta)
    north_centre = (math.floor(lat / CELL_DEG) + 1) * CELL_DEG - half_height + 1e-7
    south_centre = math.floor(lat / CELL_DEG) * CELL_DEG + half_height - 1e-7
    half_width = math.degrees(math.asin(math.sin(delta) / math.cos(math.radians(lat))))
    tangent = math.degrees(math.asin(math.sin(math.radians(lat)) / math.cos(delta)))

    def wrap(lon: float) -> float:
        return (lon + 180.0) % 360.0 - 180.0

    cases = [
        ((north_centre, edge), (north_centre + half_height - 5e-8, edge)),
        ((south_centre, edge), (south_centre - half_height + 5e-8, edge)),
        ((lat, wrap(edge - half_width + 1e-7)), (tangent, wrap(edge + 5e-8))),
        ((lat, wrap(edge + half_width - 1e-7)), (tangent, wrap(edge - 5e-8))),
    ]
    for centre, spot in cases:
        assert distance_m(*centre, *spot) <= radius
        index = build_index([place(1, *spot)], COUNTRIES, US_STATES)
        assert ids(index, search(index, *centre, radius, 1)) == [1], (centre, spot)


def test_vicinity_names_the_state_in_the_us_else_the_country() -> None:
    index = build_index(
        [
            place(1, 34.0, -118.0, cc="US"),
            Place(2, "b", 40.0, -100.0, "US", 1, "ZZ"),  # unknown state: the country alone
            place(3, -18.0, 178.0, cc="FJ"),
            place(4, 10.0, 10.0, cc="XX"),  # unknown country: its code
        ],
        COUNTRIES,
        US_STATES,
    )
    by_id = {index.geonameid[i]: index.result(i)["vicinity"] for i in range(len(index))}
    assert by_id == {1: "California, United States", 2: "United States", 3: "Fiji", 4: "XX"}
