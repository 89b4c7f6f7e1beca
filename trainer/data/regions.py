"""Locations -> K regions: the lookup featurize uses for the region-share channels.

It takes locations as `umask.contract.read_locations` returns them (unique loc_ids,
coordinates in range or both null); only the range of region_id depends on the config and
is checked here.

A region is either the data owner's precomputed `region_id` (locations.parquet) or, when the
table has none, a cluster of the locations' coordinates found by a small deterministic
k-means (numpy, fixed seed) on the unit sphere, so that clusters do not break at the
antimeridian; its centroids go into the feature spec, so later stages can place new
coordinates without refitting. Locations listed without a usable region (null region_id, or
null/NaN coordinates) map to the "unknown" region K. Loc_ids that the table does not list at
all are not decided here: the spec's rule (umask.spec.FeatureMaps.region) hashes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from umask.errors import UserError
from umask.spec import nearest_centroid, stable_hash, unit_vectors

KMEANS_SEED = 0  # the clustering is part of the data definition: same input, same regions
KMEANS_SAMPLE = 100_000  # centroids are fitted on at most this many locations
SAMPLE_SALT = 0x5A3D_1E55  # sample_keys' salt: which places the k-means sample holds
KMEANS_ITERATIONS = 50


@dataclass(frozen=True)
class RegionTable:
    """Sorted loc_ids and their region in [0, K] (K = unknown), and how they were obtained."""

    loc_ids: np.ndarray  # [L] int64, sorted, unique
    regions: np.ndarray  # [L] int32
    num_regions: int
    source: str  # "region_id", "kmeans" or "none"
    centroids: np.ndarray  # [K, 3] unit-sphere k-means centroids; [0, 3] unless source is kmeans


def build_region_table(locations: pa.Table | None, num_regions: int) -> RegionTable:
    """RegionTable from locations.parquet's (loc_id, lat, lon, region_id?) or from nothing."""
    if locations is None:
        return RegionTable(np.empty(0, np.int64), np.empty(0, np.int32), num_regions, "none",
                           np.empty((0, 3)))
    loc_ids = locations.column("loc_id").to_numpy().astype(np.int64, copy=False)
    order = np.argsort(loc_ids, kind="stable")
    has_region_ids = ("region_id" in locations.column_names
                      and locations.column("region_id").null_count < len(locations))
    if has_region_ids:
        regions, centroids = _precomputed_regions(locations, num_regions), np.empty((0, 3))
        source = "region_id"
    else:
        regions, centroids = _clustered_regions(locations, num_regions)
        # no coordinates at all (the Tsinghua data): nothing was fitted, say so
        source = "kmeans" if len(centroids) else "none"
    return RegionTable(loc_ids[order], regions[order], num_regions, source, centroids)


def kmeans_regions(lat: np.ndarray, lon: np.ndarray, k: int,
                   seed: int = KMEANS_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(region [N] int32 in [0, k), centroids [k, 3]) for (lat, lon) [N] in degrees:
    k-means++ (Arthur & Vassilvitskii, 2007) then Lloyd iterations on the unit sphere."""
    return kmeans(unit_vectors(lat, lon), k, seed)


def kmeans(points: np.ndarray, k: int, seed: int = KMEANS_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(cluster [N] int32 in [0, k), centroids [k, D]) of points [N, D] float64 under squared
    Euclidean distance: k-means++ then Lloyd iterations, deterministic for a seed, fitted on at
    most KMEANS_SAMPLE points. Also clusters the Tsinghua import's POI profiles."""
    rng = np.random.default_rng(seed)
    dims = points.shape[1]
    sample = points if len(points) <= KMEANS_SAMPLE else points[
        np.sort(rng.choice(len(points), KMEANS_SAMPLE, replace=False))]
    centroids = _kmeans_plus_plus(sample, k, rng)  # [k, D]
    assignment = nearest_centroid(sample, centroids)
    for _ in range(KMEANS_ITERATIONS):
        sums = np.stack([np.bincount(assignment, weights=sample[:, d], minlength=k)
                         for d in range(dims)], axis=1)  # [k, D]
        counts = np.bincount(assignment, minlength=k)
        # an emptied cluster keeps its old centroid rather than collapsing to the origin
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        new_assignment = nearest_centroid(sample, centroids)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
    return nearest_centroid(points, centroids), centroids


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


def _clustered_regions(locations: pa.Table, num_regions: int) -> tuple[np.ndarray, np.ndarray]:
    for name in ("lat", "lon"):
        if name not in locations.column_names:
            raise UserError(f"locations.parquet: has neither region_id nor `{name}`; "
                            "regions need one or the other")
    loc_ids = locations.column("loc_id").to_numpy().astype(np.int64, copy=False)
    lat, lon, located = coordinates(locations)
    if not located.any():  # every listed place is in the unknown region; nothing to fit
        return np.full(len(lat), num_regions, np.int32), np.empty((0, 3))
    ids = loc_ids[located]
    pick = bottom_k(sample_keys(ids), ids, KMEANS_SAMPLE)
    centroids = fit_centroids(lat[located][pick], lon[located][pick], num_regions)
    return assign_regions(lat, lon, located, centroids, num_regions), centroids


def coordinates(locations: pa.Table | pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat [n], lon [n] float64 degrees, NaN where null; located [n] bool: both set)."""
    lat = locations.column("lat").cast(pa.float64()).fill_null(np.nan).to_numpy()
    lon = locations.column("lon").cast(pa.float64()).fill_null(np.nan).to_numpy()
    return lat, lon, np.isfinite(lat) & np.isfinite(lon)


def assign_regions(lat: np.ndarray, lon: np.ndarray, located: np.ndarray, centroids: np.ndarray,
                   num_regions: int) -> np.ndarray:
    """Region [n] int32 of places: the nearest of centroids [K, 3] for located ones, K (unknown)
    for the others and for all when there are no centroids. The one rule of both featurize paths."""
    regions = np.full(len(lat), num_regions, np.int32)
    if len(centroids) and located.any():
        regions[located] = nearest_centroid(unit_vectors(lat[located], lon[located]), centroids)
    return regions


def sample_keys(loc_ids: np.ndarray) -> np.ndarray:
    """[n] uint64 keys that order places at random but the same way in any process:
    stable_hash(loc_id, SAMPLE_SALT). The k-means sample is the located places of smallest key,
    so it does not depend on the order or the split of the table's files."""
    return stable_hash(loc_ids, SAMPLE_SALT)


def bottom_k(keys: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Indices [min(n, k)] of the rows of smallest (key, id), in that order; keys, ids [n]."""
    if len(keys) > k:  # only rows whose key can be among the k smallest need the full sort
        candidates = np.flatnonzero(keys <= np.partition(keys, k - 1)[k - 1])
    else:
        candidates = np.arange(len(keys))
    return candidates[np.lexsort((ids[candidates], keys[candidates]))][:k]


def fit_centroids(lat: np.ndarray, lon: np.ndarray, k: int) -> np.ndarray:
    """k-means centroids [k, 3] on the unit sphere of the sample places (lat, lon) [n] in
    degrees, in sample order (bottom_k's): the fit both featurize paths share."""
    return kmeans(unit_vectors(lat, lon), k)[1]


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = np.empty((k, points.shape[1]))
    centroids[0] = points[rng.integers(len(points))]
    closest = ((points - centroids[0]) ** 2).sum(axis=1)  # [N] squared distance to nearest
    for i in range(1, k):
        total = closest.sum()
        # fewer distinct points than k: the remaining centroids repeat existing points
        pick = rng.choice(len(points), p=closest / total) if total > 0 else rng.integers(len(points))
        centroids[i] = points[pick]
        closest = np.minimum(closest, ((points - centroids[i]) ** 2).sum(axis=1))
    return centroids
