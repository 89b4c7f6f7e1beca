"""The synthetic city: places (cells) with coordinates, a land use and POI counts.

Places cluster around district centres of four land uses inside a London-sized bounding box:
residential (homes), office (workplaces, campuses), leisure (shops, parks, restaurants) and
transit (stations on the radial lines between the suburbs and the centre, where commutes
pass). Users draw their home, work, favourite outings and commute cells from these, so their
location records form the few-places-a-day pattern real cell data shows. The city keeps its
clocks on UTC, so routines line up with UTC hour slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# WGS84 bounding box of the city: (south, north), (west, east)
LAT_RANGE = (51.28, 51.69)
LON_RANGE = (-0.51, 0.33)
_CENTRE = np.array([51.513, -0.092])

RESIDENTIAL, OFFICE, LEISURE, TRANSIT = range(4)
LAND_USES = ("residential", "office", "leisure", "transit")
_LAND_USE_SHARES = np.array([0.45, 0.2, 0.2, 0.15])
_DISTRICTS = (10, 3, 5)  # district centres per land use but transit, which follows lines
_DISTRICT_RADIUS = (0.09, 0.02, 0.05)  # degrees from the centre: offices central, homes outside
_DISTRICT_SPREAD = np.array([0.03, 0.012, 0.02, 0.004])  # degrees, std around a centre

POI_CATEGORIES = ("restaurant", "shop", "office", "school", "hospital", "park", "station",
                  "hotel", "bank", "gym", "cinema", "housing", "parking", "museum", "market",
                  "worship")
# expected POI counts per land use, [4, 16]
_POI_RATES = np.array([
    [3, 5, 1, 2, 0.5, 2, 0.5, 0.2, 0.5, 0.5, 0.2, 20, 2, 0.1, 1, 1],
    [8, 4, 25, 0.5, 0.5, 0.5, 1, 2, 4, 1, 0.5, 1, 4, 0.3, 0.3, 0.3],
    [15, 20, 2, 0.5, 0.3, 3, 1, 3, 2, 2, 2, 2, 3, 1, 3, 0.5],
    [4, 4, 1, 0.2, 0.2, 0.3, 6, 1, 1, 0.2, 0.2, 1, 1, 0.1, 0.5, 0.2],
])


@dataclass(frozen=True)
class City:
    """Arrays over the city's L places (index = place number, not loc_id)."""
    loc_ids: np.ndarray  # [L] int64, sparse
    lat: np.ndarray  # [L] float64
    lon: np.ndarray  # [L] float64
    land_use: np.ndarray  # [L] int8
    popularity: np.ndarray  # [L] float64, how many users pick the place, relative
    poi_counts: np.ndarray  # [L, len(POI_CATEGORIES)] int32

    def places_of(self, land_use: int) -> np.ndarray:
        return np.flatnonzero(self.land_use == land_use)

    def table(self) -> pa.Table:
        """locations.parquet; no region_id, so the pipeline clusters lat/lon itself."""
        n, width = self.poi_counts.shape
        pois = pa.ListArray.from_arrays(np.arange(0, n * width + 1, width, dtype=np.int32),
                                        pa.array(self.poi_counts.ravel(), pa.int32()))
        return pa.table({"loc_id": pa.array(self.loc_ids, pa.int64()),
                         "lat": pa.array(self.lat, pa.float64()),
                         "lon": pa.array(self.lon, pa.float64()),
                         "poi_counts": pois})


def make_city(rng: np.random.Generator, loc_ids: np.ndarray) -> City:
    """Places for the given ids; every land use gets at least one place."""
    n = len(loc_ids)
    land_use = np.concatenate([np.arange(4), rng.choice(4, size=n - 4, p=_LAND_USE_SHARES)])
    centres = [_district_centres(rng, use) for use in (RESIDENTIAL, OFFICE, LEISURE)]
    suburbs = centres[RESIDENTIAL]
    lat, lon = np.empty(n), np.empty(n)
    for use in range(4):
        where = np.flatnonzero(land_use == use)
        if use == TRANSIT:
            # stations sit on the line from a random suburb to the centre
            along = rng.random(len(where))[:, None]
            suburb = suburbs[rng.integers(len(suburbs), size=len(where))]
            base = suburb * (1 - along) + _CENTRE * along
        else:
            base = centres[use][rng.integers(len(centres[use]), size=len(where))]
        point = base + rng.normal(0, _DISTRICT_SPREAD[use], size=(len(where), 2))
        lat[where] = np.clip(point[:, 0], *LAT_RANGE)
        lon[where] = np.clip(point[:, 1], *LON_RANGE)
    popularity = rng.lognormal(0.0, 1.0, size=n)
    poi_counts = rng.poisson(_POI_RATES[land_use] * popularity[:, None] ** 0.5).astype(np.int32)
    return City(loc_ids, lat, lon, land_use.astype(np.int8), popularity, poi_counts)


def _district_centres(rng: np.random.Generator, land_use: int) -> np.ndarray:
    """[k, 2] (lat, lon) centres: offices near the centre, homes spread over the suburbs."""
    k, radius = _DISTRICTS[land_use], _DISTRICT_RADIUS[land_use]
    angle = rng.uniform(0, 2 * np.pi, size=k)
    dist = radius * np.sqrt(rng.uniform(0.2, 1.0, size=k))
    # a degree of longitude is shorter than one of latitude at 51.5 degrees north
    return _CENTRE + np.stack([dist * np.sin(angle), dist * np.cos(angle) / 0.62], axis=1)
