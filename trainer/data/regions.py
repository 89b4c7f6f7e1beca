"""Locations -> K regions: the lookup featurize uses for the region-share channels.

It takes locations as `trainer.data.contract.read_locations` returns them (unique loc_ids,
coordinates in range or both null); only the range of region_id depends on the config and
is checked here.

A region is either the data owner's precomputed `region_id` (locations.parquet) or, when the
table has none, a cluster of the locations' coordinates found by a small deterministic
k-means (numpy, fixed seed) on the unit sphere, so that clusters do not break at the
antimeridian. Locations listed without a usable region (null region_id, or null/NaN
coordinates) map to the "unknown" region K. Loc_ids that the table does not list at all are
not decided here: `RegionTable.lookup` returns ABSENT for them and featurize hashes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from umask.errors import UserError

ABSENT = -1  # lookup result for a loc_id the locations table does not list
KMEANS_SEED = 0  # the clustering is part of the data definition: same input, same regions
KMEANS_SAMPLE = 100_000  # centroids are fitted on at most this many locations
KMEANS_ITERATIONS = 50
ASSIGN_CHUNK = 1 << 20  # locations per distance block: [chunk, K] floats at a time


@dataclass(frozen=True)
class RegionTable:
    """Sorted loc_ids and their region in [0, K] (K = unknown); picklable for workers."""

    loc_ids: np.ndarray  # [L] int64, sorted, unique
    regions: np.ndarray  # [L] int32
    num_regions: int
    source: str  # "region_id", "kmeans" or "none": how the regions were obtained

    def lookup(self, loc_ids: np.ndarray) -> np.ndarray:
        """Region in [0, K] of each loc_id, or ABSENT when the table does not list it."""
        if len(self.loc_ids) == 0:
            return np.full(len(loc_ids), ABSENT, np.int32)
        pos = np.minimum(np.searchsorted(self.loc_ids, loc_ids), len(self.loc_ids) - 1)
        found = self.loc_ids[pos] == loc_ids
        return np.where(found, self.regions[pos], ABSENT).astype(np.int32)


def build_region_table(locations: pa.Table | None, num_regions: int) -> RegionTable:
    """RegionTable from locations.parquet's (loc_id, lat, lon, region_id?) or from nothing."""
    if locations is None:
        return RegionTable(np.empty(0, np.int64), np.empty(0, np.int32), num_regions, "none")
    loc_ids = locations.column("loc_id").to_numpy().astype(np.int64, copy=False)
    order = np.argsort(loc_ids, kind="stable")
    has_region_ids = ("region_id" in locations.column_names
                      and locations.column("region_id").null_count < len(locations))
    if has_region_ids:
        regions = _precomputed_regions(locations, num_regions)
        source = "region_id"
    else:
        regions = _clustered_regions(locations, num_regions)
        source = "kmeans"
    return RegionTable(loc_ids[order], regions[order], num_regions, source)


def kmeans_regions(lat: np.ndarray, lon: np.ndarray, k: int, seed: int = KMEANS_SEED) -> np.ndarray:
    """Region in [0, k) for each (lat, lon) in degrees: k-means++ then Lloyd on the unit sphere."""
    points = _unit_vectors(lat, lon)  # [N, 3]
    rng = np.random.default_rng(seed)
    sample = points if len(points) <= KMEANS_SAMPLE else points[
        np.sort(rng.choice(len(points), KMEANS_SAMPLE, replace=False))]
    centroids = _kmeans_plus_plus(sample, k, rng)  # [k, 3]
    assignment = _nearest(sample, centroids)
    for _ in range(KMEANS_ITERATIONS):
        sums = np.stack([np.bincount(assignment, weights=sample[:, d], minlength=k)
                         for d in range(3)], axis=1)  # [k, 3]
        counts = np.bincount(assignment, minlength=k)
        # an emptied cluster keeps its old centroid rather than collapsing to the origin
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        new_assignment = _nearest(sample, centroids)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
    return _nearest(points, centroids).astype(np.int32)


def _precomputed_regions(locations: pa.Table, num_regions: int) -> np.ndarray:
    column = locations.column("region_id")
    listed = column.is_valid().to_numpy(zero_copy_only=False)
    raw = column.fill_null(0).to_numpy().astype(np.int64)
    bad = np.flatnonzero(listed & ((raw < 0) | (raw >= num_regions)))
    if len(bad):
        row = int(bad[0])
        raise UserError(f"locations.parquet: row {row}: region_id {raw[row]} is outside "
                        f"[0, {num_regions}); set data.num_regions to the number of regions")
    return np.where(listed, raw, num_regions).astype(np.int32)


def _clustered_regions(locations: pa.Table, num_regions: int) -> np.ndarray:
    for name in ("lat", "lon"):
        if name not in locations.column_names:
            raise UserError(f"locations.parquet: has neither region_id nor `{name}`; "
                            "regions need one or the other")
    lat = locations.column("lat").cast(pa.float64()).fill_null(np.nan).to_numpy()
    lon = locations.column("lon").cast(pa.float64()).fill_null(np.nan).to_numpy()
    located = np.isfinite(lat) & np.isfinite(lon)
    regions = np.full(len(lat), num_regions, np.int32)
    if located.any():
        regions[located] = kmeans_regions(lat[located], lon[located], num_regions)
    return regions


def _unit_vectors(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    lat_r, lon_r = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(lat_r) * np.cos(lon_r), np.cos(lat_r) * np.sin(lon_r),
                     np.sin(lat_r)], axis=1)  # [N, 3]


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = np.empty((k, 3))
    centroids[0] = points[rng.integers(len(points))]
    closest = ((points - centroids[0]) ** 2).sum(axis=1)  # [N] squared distance to nearest
    for i in range(1, k):
        total = closest.sum()
        # fewer distinct points than k: the remaining centroids repeat existing points
        pick = rng.choice(len(points), p=closest / total) if total > 0 else rng.integers(len(points))
        centroids[i] = points[pick]
        closest = np.minimum(closest, ((points - centroids[i]) ** 2).sum(axis=1))
    return centroids


def _nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    out = np.empty(len(points), np.int64)
    norms = (centroids ** 2).sum(axis=1)  # [K]
    for start in range(0, len(points), ASSIGN_CHUNK):
        block = points[start:start + ASSIGN_CHUNK]
        # |p - c|^2 without the per-point |p|^2, which does not change the argmin: [chunk, K]
        out[start:start + ASSIGN_CHUNK] = np.argmin(norms - 2.0 * block @ centroids.T, axis=1)
    return out
