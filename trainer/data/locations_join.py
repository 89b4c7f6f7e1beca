"""The locations side table at cluster scale: range-partitioned by loc_id and joined by key to
the loc_ids each bucket's events hold, so that no process holds the whole table.

featurize on Ray (trainer/data/featurize_ray.py) runs it as tasks, under `_staging/`:
1. sample, one task per share of locations.parquet (a file, or a run of its row groups, as
   for events): checks the rows (umask.contract.location_share), counts them, and keeps two
   bottom-k samples by regions.sample_keys: loc_ids (for the range boundaries) and located
   places (for k-means); `locations/sample-<s>.parquet`, `locations/share-<s>.json`.
2. plan, one task: the region source (region_id, kmeans or none), the k-means centroids
   fitted on the merged sample (the same fit as the in-process path, regions.fit_centroids),
   and P-1 boundaries that cut loc_ids into P ranges of about data.read_task_rows rows;
   `locations/plan.json`.
3. place, one task per share: each row's region, appended to its range's piece
   `locations/range=<p>/share-<s>.parquet` (loc_id, region, share, row).
4. sort, one task per range: its pieces sorted by loc_id, a repeated loc_id refused naming
   both rows, written as `locations/range-<p>.parquet` (loc_id, region).
Phase 1 writes, per events share, the distinct (loc_id, bucket) pairs it saw, sorted by loc_id
(`loc-keys/unit-<u>.parquet`). Then:
5. join, one task per range: the pairs of its range from every events share, matched to the
   range's rows; writes the regions of each bucket's listed loc_ids as a run
   (`loc-regions/range-<p>`, trainer/data/shuffle.py), so phase 2 of bucket b reads only its
   own segment of each range.
The spec's loc_regions.parquet is the ranges concatenated in order (sorted, since they are
ranges), streamed by umask.spec.write_maps. Loc_ids the table does not list are not joined:
the spec's rule hashes them (umask.spec.FeatureMaps.region), in phase 2 as everywhere.

Memory: a sample or place task holds one read batch and the samples (at most KMEANS_SAMPLE +
BOUNDARY_SAMPLE places); a sort or join task one range (about data.read_task_rows rows, 24
bytes each while sorting) and that range's pairs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.data import shuffle
from trainer.data.regions import KMEANS_SAMPLE, assign_regions, bottom_k, coordinates, fit_centroids, sample_keys
from trainer.data.tasks import Unit, atomic_path, task_facts, task_start, write_json
from umask.contract import ContractError, location_share
from umask.slots import STAGING_WRITE_OPTIONS, distinct_pairs

LOCATIONS = "locations"  # in _staging: the sample, plan, range pieces and ranges
KEYS = "loc-keys"  # in _staging: phase 1's (loc_id, bucket) pairs per events share
REGIONS = "loc-regions"  # in _staging: each bucket's (loc_id, region), per range
BOUNDARY_SAMPLE = 16_384  # loc_ids sampled to cut the ranges
KEY_ROW_GROUP = 1 << 16  # rows per row group of a pairs file: a join task reads its range's groups
PLACES = pa.schema([("loc_id", pa.int64()), ("region", pa.int32()), ("share", pa.int32()), ("row", pa.int64())])
SAMPLE = pa.schema([("key", pa.uint64()), ("loc_id", pa.int64()), ("lat", pa.float64()), ("lon", pa.float64())])
PAIRS = pa.schema([("loc_id", pa.int64()), ("bucket", pa.int32())])
REGION_MAP = pa.schema([("loc_id", pa.int64()), ("region", pa.int32())])


# --- 1. sample ------------------------------------------------------------------------

def sample_task(share: Unit, num_regions: int, staging: str) -> dict:
    """Checks one share of locations.parquet and writes its two samples; returns its report:
    rows, columns read, the poi_counts lengths seen. A region_id beyond num_regions is a
    ContractError naming its file and row."""
    started = task_start()
    folder = Path(staging) / LOCATIONS
    ids_sample = _Sample(BOUNDARY_SAMPLE)
    located_sample = _Sample(KMEANS_SAMPLE)
    columns, rows, lengths = None, 0, set()
    for columns, first_row, batch in location_share(Path(share.path), share.row_groups):
        ids = batch.column("loc_id").to_numpy()
        keys = sample_keys(ids)
        ids_sample.add(keys, ids)
        if "region_id" in columns:
            _check_region_ids(share.path, first_row, batch.column("region_id").to_numpy(), num_regions)
        lat, lon, located = coordinates(batch)
        located_sample.add(keys[located], ids[located], lat[located], lon[located])
        if "poi_counts" in columns:
            lengths |= set(pc.unique(pc.list_value_length(batch.column("poi_counts"))).drop_null().to_pylist())
        rows += batch.num_rows
    for name, sample in (("ids", ids_sample), ("located", located_sample)):
        _write(folder / f"{name}-{share.index:06d}.parquet", sample.table())
    report = {"share": share.index, "rows": rows, "columns": columns, "poi_lengths": sorted(lengths),
              **task_facts(started)}
    write_json(folder / f"share-{share.index:06d}.json", report)
    return report


class _Sample:
    """The k rows of smallest (key, loc_id) seen so far: regions.bottom_k over batches."""

    def __init__(self, k: int):
        self.k = k
        self.columns = [np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0), np.empty(0)]

    def add(self, keys: np.ndarray, ids: np.ndarray, lat: np.ndarray | None = None, lon: np.ndarray | None = None):
        new = [keys, ids, np.zeros(len(ids)) if lat is None else lat, np.zeros(len(ids)) if lon is None else lon]
        merged = [np.concatenate([old, add]) for old, add in zip(self.columns, new)]
        pick = bottom_k(merged[0], merged[1], self.k)
        self.columns = [column[pick] for column in merged]

    def table(self) -> pa.Table:
        return pa.Table.from_arrays([pa.array(c) for c in self.columns], schema=SAMPLE)


def _check_region_ids(path: str, first_row: int, region_ids: np.ndarray, num_regions: int) -> None:
    bad = np.flatnonzero(region_ids >= num_regions)
    if len(bad):
        raise ContractError(f"{path}: row {first_row + int(bad[0])}: region_id {region_ids[bad[0]]} is outside "
                            f"[0, {num_regions}); set data.num_regions to the number of regions")


# --- 2. plan --------------------------------------------------------------------------

def plan_task(reports: list[dict], num_regions: int, rows_per_range: int, staging: str) -> dict:
    """The region source, the k-means centroids and the range boundaries, from the shares'
    reports and samples; written to `locations/plan.json` and returned."""
    started = task_start()
    folder = Path(staging) / LOCATIONS
    _check_shares_agree(reports)
    columns = next((r["columns"] for r in reports if r["columns"]), [])
    rows = sum(r["rows"] for r in reports)
    located = _merged_sample([folder / f"located-{r['share']:06d}.parquet" for r in reports], KMEANS_SAMPLE)
    if rows and "region_id" in columns:
        source, centroids = "region_id", np.empty((0, 3))
    elif located.num_rows:
        source = "kmeans"
        centroids = fit_centroids(located.column("lat").to_numpy(), located.column("lon").to_numpy(), num_regions)
    else:  # no coordinates at all (the Tsinghua data): nothing to fit
        source, centroids = "none", np.empty((0, 3))
    ids = np.sort(_merged_sample([folder / f"ids-{r['share']:06d}.parquet" for r in reports],
                                 BOUNDARY_SAMPLE).column("loc_id").to_numpy())
    ranges = max(1, -(-rows // rows_per_range))
    boundaries = np.unique(ids[[len(ids) * i // ranges for i in range(1, ranges)]]) if len(ids) else ids
    plan = {"source": source, "centroids": centroids.tolist(), "boundaries": boundaries.tolist(), "rows": rows,
            "task": task_facts(started)}
    write_json(folder / "plan.json", plan)
    return plan


def _check_shares_agree(reports: list[dict]) -> None:
    """Every non-empty share read the same columns, and poi_counts has one length throughout."""
    read = [r for r in reports if r["columns"]]
    for report in read[1:]:
        if report["columns"] != read[0]["columns"]:
            raise ContractError(f"locations share {report['share']} has columns {report['columns']}, but share "
                                f"{read[0]['share']} has {read[0]['columns']}; the part files of one table must "
                                "have the same columns")
    lengths = sorted({n for r in reports for n in r["poi_lengths"]})
    if len(lengths) > 1:
        raise ContractError(f"locations.parquet: poi_counts lists have lengths {lengths}; they must all "
                            "have one length")


def _merged_sample(files: list[Path], k: int) -> pa.Table:
    """The bottom-k of the shares' samples, in (key, loc_id) order."""
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else SAMPLE.empty_table()
    pick = bottom_k(table.column("key").to_numpy(), table.column("loc_id").to_numpy(), k)
    return table.take(pa.array(pick, pa.int64()))


def range_of(loc_ids: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Range [n] int64 in [0, P) of loc_ids [n]: range p holds boundaries[p-1] <= id < boundaries[p]."""
    return np.searchsorted(boundaries, loc_ids, side="right")


# --- 3. place -------------------------------------------------------------------------

def place_task(share: Unit, plan: dict, num_regions: int, staging: str) -> dict:
    """Each row of one locations share with its region, into its range's piece; returns the
    rows per range."""
    started = task_start()
    folder = Path(staging) / LOCATIONS
    boundaries = np.asarray(plan["boundaries"], np.int64)
    centroids = np.asarray(plan["centroids"], np.float64).reshape(-1, 3)
    writers, rows = {}, {}
    try:
        for _, first_row, batch in location_share(Path(share.path), share.row_groups):
            ids = batch.column("loc_id").to_numpy()
            regions = region_of_rows(batch, plan["source"], centroids, num_regions)
            ranges = range_of(ids, boundaries)
            file_rows = first_row + np.arange(len(ids), dtype=np.int64)
            for p in np.unique(ranges).tolist():
                mine = ranges == p
                if p not in writers:
                    path = folder / f"range={p:05d}" / f"share-{share.index:06d}.parquet"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = atomic_path(path)
                    writers[p] = (pq.ParquetWriter(tmp, PLACES, **STAGING_WRITE_OPTIONS), tmp, path)
                    rows[p] = 0
                writers[p][0].write_table(pa.Table.from_arrays(
                    [pa.array(ids[mine]), pa.array(regions[mine]), pa.array(np.full(mine.sum(), share.index, np.int32)),
                     pa.array(file_rows[mine])], schema=PLACES))
                rows[p] += int(mine.sum())
    finally:
        for writer, _, _ in writers.values():
            writer.close()
    for _, tmp, path in writers.values():
        os.replace(tmp, path)
    report = {"share": share.index, "ranges": {str(p): n for p, n in sorted(rows.items())}, **task_facts(started)}
    write_json(folder / f"placed-{share.index:06d}.json", report)
    return report


def region_of_rows(batch: pa.RecordBatch, source: str, centroids: np.ndarray, num_regions: int) -> np.ndarray:
    """Region [n] int32 in [0, K] of checked locations rows: region_id, else the nearest
    k-means centroid of located places; K (unknown) for the others. The rule of
    regions.build_region_table, row by row."""
    if source == "region_id":
        return batch.column("region_id").to_numpy().astype(np.int32)
    return assign_regions(*coordinates(batch), centroids, num_regions)


# --- 4. sort --------------------------------------------------------------------------

def sort_task(index: int, pieces: list[str], shares: list[Unit], staging: str) -> dict:
    """Range `index`'s pieces sorted by loc_id into `locations/range-<p>.parquet`; a ContractError
    naming both rows when a loc_id repeats."""
    started = task_start()
    folder = Path(staging) / LOCATIONS
    table = pq.read_table(pieces, schema=PLACES) if pieces else PLACES.empty_table()
    ids = table.column("loc_id").to_numpy()
    order = np.lexsort((table.column("row").to_numpy(), table.column("share").to_numpy(), ids))
    ids = ids[order]
    repeated = np.flatnonzero(ids[1:] == ids[:-1])
    if len(repeated):
        first, again = order[repeated[0]], order[repeated[0] + 1]
        share, row = table.column("share").to_numpy(), table.column("row").to_numpy()
        where, first_where = shares[share[again]].path, shares[share[first]].path
        also = f"row {row[first]}" if first_where == where else f"{first_where}, row {row[first]}"
        raise ContractError(f"{where}: row {row[again]}, column 'loc_id': duplicate loc_id {ids[repeated[0]]} "
                            f"(also at {also})")
    _write(folder / f"range-{index:05d}.parquet", pa.Table.from_arrays(
        [pa.array(ids), pa.array(table.column("region").to_numpy()[order])], schema=REGION_MAP))
    report = {"range": index, "rows": len(ids), **task_facts(started)}
    write_json(folder / f"range-{index:05d}.json", report)
    return report


def range_chunks(staging: Path, ranges: int):
    """(loc_ids, regions) of each range in order: the whole map, sorted, one range at a time."""
    for p in range(ranges):
        table = pq.read_table(staging / LOCATIONS / f"range-{p:05d}.parquet")
        yield table.column("loc_id").to_numpy(), table.column("region").to_numpy()


# --- phase 1's pairs and 5. join ------------------------------------------------------

class LocationKeys:
    """The distinct (loc_id, bucket) pairs of the segments passed to `add` (phase 1's runs)."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, bucket: int, events: pa.Table) -> None:
        """Records the distinct loc_ids of one bucket's events (one sort of the segment's ids)."""
        ids = np.unique(events.column("loc_id").drop_null().to_numpy())
        self.parts.append((ids, np.full(len(ids), bucket, np.int32)))

    def write(self, path: Path) -> int:
        """Writes the pairs sorted by (loc_id, bucket); returns how many."""
        ids, buckets = distinct_pairs(np.concatenate([p[0] for p in self.parts] or [np.empty(0, np.int64)]),
                                      np.concatenate([p[1] for p in self.parts] or [np.empty(0, np.int32)]))
        table = pa.Table.from_arrays([pa.array(ids, pa.int64()), pa.array(buckets, pa.int32())], schema=PAIRS)
        _write(path, table, row_group_size=KEY_ROW_GROUP, compression="zstd", write_statistics=["loc_id"])
        return len(ids)


def join_task(index: int, boundaries: list[int], key_files: list[str], num_buckets: int, staging: str) -> dict:
    """Range `index` joined to the pairs of its loc_ids from every events share: the run
    `loc-regions/range-<p>` (trainer/data/shuffle.py) whose segment b holds bucket b's listed
    loc_ids in the range with their regions (REGION_MAP), sorted by loc_id."""
    started = task_start()
    staging = Path(staging)
    lo = boundaries[index - 1] if index > 0 else None
    hi = boundaries[index] if index < len(boundaries) else None
    bounds = ([("loc_id", ">=", lo)] if lo is not None else []) + ([("loc_id", "<", hi)] if hi is not None else [])
    parts = [pq.read_table(f, schema=PAIRS, filters=bounds or None) for f in key_files]
    pairs = pa.concat_tables(parts) if parts else PAIRS.empty_table()
    ids, buckets = distinct_pairs(pairs.column("loc_id").to_numpy(), pairs.column("bucket").to_numpy())
    listed = pq.read_table(staging / LOCATIONS / f"range-{index:05d}.parquet")
    listed_ids, listed_regions = listed.column("loc_id").to_numpy(), listed.column("region").to_numpy()
    pos = np.minimum(np.searchsorted(listed_ids, ids), max(len(listed_ids) - 1, 0))
    found = listed_ids[pos] == ids if len(listed_ids) else np.zeros(len(ids), bool)
    ids, buckets, regions = ids[found], buckets[found], listed_regions[pos[found]]
    order = np.lexsort((ids, buckets))
    ids, buckets, regions = ids[order], buckets[order], regions[order]
    starts = np.searchsorted(buckets, np.arange(num_buckets + 1))
    segments = ((b, pa.Table.from_arrays([pa.array(ids[starts[b]:starts[b + 1]]),
                                          pa.array(regions[starts[b]:starts[b + 1]])], schema=REGION_MAP))
                for b in np.flatnonzero(np.diff(starts)).tolist())
    run = staging / REGIONS / f"range-{index:05d}"
    shuffle.write_run(run, segments, num_buckets, REGION_MAP)
    report = {"range": index, "run": str(run), "pairs": int(found.sum()), **task_facts(started)}
    write_json(staging / REGIONS / f"range-{index:05d}.json", report)
    return report


def _write(path: Path, table: pa.Table, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    pq.write_table(table, tmp, **({**STAGING_WRITE_OPTIONS, **options}))
    os.replace(tmp, path)
