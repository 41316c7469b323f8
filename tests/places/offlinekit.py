"""What the offline places tests share: small GeoNames-shaped tables and brute force."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from herd_trio.places.index import Place, PlacesIndex, distance_m

LOS_ANGELES = (34.0522, -118.2437)
MID_PACIFIC = (0.0, -140.0)
COUNTRIES = {"US": "United States", "FJ": "Fiji", "AQ": "Antarctica", "NO": "Norway"}
US_STATES = {"CA": "California"}
RESULT_KEYS = ["geometry", "name", "place_id", "types", "vicinity"]


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """An independent great-circle distance (atan2 form) for checking answers."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371008.8 * math.atan2(math.sqrt(a), math.sqrt(1 - a))


def brute_force(
    index: PlacesIndex, candidates: range | list[int], lat: float, lon: float, r: float, bound: int
) -> list[int]:
    """Geonameids of the top `bound` candidates in range, ranked by scanning them all.

    It uses the module's distance_m so that answers must agree exactly, even for a place
    on the rim; haversine_m above independently checks "within the radius".
    """
    ranked = sorted(
        (-index.population[i], d, index.geonameid[i])
        for i in candidates
        if (d := distance_m(lat, lon, index.lat[i], index.lon[i])) <= r
    )
    return [gid for *_, gid in ranked[:bound]]


def ids(index: PlacesIndex, positions: list[int]) -> list[int]:
    """The geonameids at `positions`."""
    return [index.geonameid[i] for i in positions]


def place(gid: int, lat: float, lon: float, population: int = 1000, cc: str = "FJ") -> Place:
    """A synthetic place."""
    return Place(gid, f"place {gid}", lat, lon, cc, population, "CA" if cc == "US" else "")


def write_tables(directory: Path, places: list[Place]) -> Path:
    """Write GeoNames-shaped tables of `places` into `directory` (the child's input)."""
    directory.mkdir(parents=True, exist_ok=True)
    cities = {str(p.geonameid): p for p in places}
    (directory / "cities500.json").write_bytes(msgspec.json.encode(cities))
    names = {code: {"name": name, "iso": code} for code, name in COUNTRIES.items()}
    (directory / "countries.json").write_bytes(msgspec.json.encode(names))
    states = {code: {"code": code, "name": name} for code, name in US_STATES.items()}
    (directory / "us_states.json").write_bytes(msgspec.json.encode(states))
    return directory


SMALL = [
    place(1, 34.0, -118.0, 5000, "US"),
    place(2, 34.01, -118.01, 700, "US"),
    place(3, -18.2, 179.9, 900),
]
