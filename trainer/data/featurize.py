"""`u-mask data featurize`: contract events -> per-user training examples (schema.EXAMPLES).

Two phases, so that no stage holds the event set in memory:
1. partition: the event stream is split by a stable hash of user_id into data.num_shards
   buckets, each appended (one row group per buffer flush) to its own staging Parquet file;
2. featurize: each bucket becomes examples independently, by `featurize_bucket`, a pure
   function of (bucket file, feature spec and maps, row group size) -> output files. The
   buckets run in data.featurize_workers local processes (not yet as Ray tasks).

Everything that decides what an example means comes from the feature spec (umask/spec.py),
built once per run by `build_feature_spec` from data.* and the side tables (the app-to-
category map, the regions: precomputed or fitted here) and written to `<features>/spec/`.

Per bucket (numpy/pyarrow only, no Python loop per event or per user):
- exact duplicate rows (all six columns, nulls included) are dropped;
- window w of a user covers [origin + w*T*slot_seconds, ...) with origin the Monday
  1970-01-05T00:00Z, so windows are week-aligned when T*slot_seconds is a week; a
  (user, window) with at least one event is one example;
- dense channels per umask.spec.DenseLayout. Category usage is log1p of the slot's app records
  (count) or of their traffic bytes (data.category_value; null bytes count 0); apps missing
  from apps.parquet fall in the unknown category; location-only records (null app_id) count
  for regions, activity and volume, not for categories. Region shares are over the slot's
  records with a loc_id; install and uninstall events are records like `use` (observed,
  activity, categories, app bag), because an install is evidence of the user's interest
  in the app at that time and the event kind is not a channel of its own;
- regions come from the spec's map (trainer.data.regions builds it); loc_ids absent from
  locations.parquet (or every loc_id when there is no such table) go to region
  stable_hash(loc_id, REGION_SALT) % K (umask.spec.FeatureMaps.region), so the same
  place always lands in the same region and unlisted places still spread over K regions
  instead of piling up in "unknown" (which is kept for listed places without a region);
- id bags are the distinct raw app_ids and loc_ids of each slot, sorted;
- each user lands in train/val/test/cold by a stable hash of (user_id, data.split_salt),
  the same in every window and every run.

Output, one split per folder so the loader can choose splits by path:
`<features>/split=<split>/shard=<00000>/part-00000.parquet` (row groups of
data.row_group_size examples), `<features>/spec/` and `<features>/manifest.json`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.config import DataConfig, RunConfig, save_config
from umask.contract import NORMALIZED_EVENTS, EventReader, open_dataset, read_apps, read_locations
from trainer.data.regions import build_region_table
from trainer.data.schema import EXAMPLES, SPEC_DIR
from umask.errors import UserError
from umask.spec import SHARD_SALT, SPLITS, DenseLayout, FeatureMaps, FeatureSpec, save_spec, stable_hash

PARTITION_BUFFER_ROWS = 1 << 22  # rows buffered across buckets before a flush (~170 MB)
STAGING = "_staging"
MANIFEST = "manifest.json"
# what a previous featurize run leaves in its output folder, removed before a new run
OUTPUTS = (STAGING, SPEC_DIR, "quarantine", MANIFEST, MANIFEST + ".tmp", "config.yaml", "summary.json")

# staging files are read once, soon after they are written: compressing, dictionary-encoding
# and summarizing them would cost more CPU than the disk traffic it saves
STAGING_WRITE_OPTIONS = dict(compression="none", use_dictionary=False, write_statistics=False)
# dictionaries and statistics of the long list columns cost a third of the write time
# and buy nothing: their values are not looked up or filtered on
EXAMPLE_WRITE_OPTIONS = dict(compression="zstd", use_dictionary=["split"],
                             write_statistics=["user_id", "split", "window_start"])

# the data.* keys whose values decide the examples featurize writes
HASHED_SETTINGS = ("source", "invalid_rows", "slot_seconds", "slots", "num_categories", "num_regions",
                   "category_value", "val_fraction", "test_fraction", "cold_fraction", "split_salt",
                   "num_shards", "row_group_size", "plausible_start", "plausible_end")


def bucket_of(user_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard (bucket) [n] int64 in [0, num_shards) of user ids [n]: stable_hash(user, SHARD_SALT)."""
    return (stable_hash(user_ids, SHARD_SALT) % np.uint64(num_shards)).astype(np.int64)


def split_of(user_ids: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Index into SPLITS [n] int8 of each user: a uniform draw u in [0, 1) (the top 53 bits of
    stable_hash(user, split_salt)) against the spec's fractions."""
    u = (stable_hash(user_ids, spec.split_salt) >> np.uint64(11)) * 2.0**-53
    edges = np.cumsum([spec.val_fraction, spec.test_fraction, spec.cold_fraction])
    # u < val -> val (1), < val+test -> test (2), < val+test+cold -> cold (3), else train (0)
    return ((np.searchsorted(edges, u, side="right") + 1) % 4).astype(np.int8)


def build_feature_spec(apps: pa.Table | None, locations: pa.Table | None,
                       cfg: DataConfig) -> tuple[FeatureSpec, FeatureMaps]:
    """The spec of a featurize run: data.* settings, plus the app-to-category map from
    apps.parquet and the regions of locations.parquet (precomputed or fitted here, once)."""
    if apps is None:
        app_ids, categories = np.empty(0, np.int64), np.empty(0, np.int32)
    else:
        app_ids = apps.column("app_id").to_numpy().astype(np.int64)
        categories = apps.column("category_id").to_numpy().astype(np.int32)
        bad = np.flatnonzero((categories < 0) | (categories >= cfg.num_categories))
        if len(bad):
            raise UserError(f"apps.parquet: row {bad[0]}: category_id {categories[bad[0]]} is "
                            f"outside [0, {cfg.num_categories}) (data.num_categories)")
        order = np.argsort(app_ids, kind="stable")
        app_ids, categories = app_ids[order], categories[order]
    regions = build_region_table(locations, cfg.num_regions)
    spec = dataclasses.replace(
        cfg.feature_spec(), region_source=regions.source,
        region_centroids=tuple(tuple(float(v) for v in c) for c in regions.centroids))
    return spec, FeatureMaps(app_ids, categories, regions.loc_ids, regions.regions)


# --- phase 1: partition by user --------------------------------------------------------

def partition_events(batches: Iterable[pa.RecordBatch], staging: Path, num_shards: int,
                     buffer_rows: int = PARTITION_BUFFER_ROWS) -> tuple[dict[int, Path], int]:
    """Appends each batch's rows to its users' bucket files; returns ({bucket: file}, rows)."""
    staging.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    pending: dict[int, list[pa.RecordBatch]] = {}
    pending_rows = total = 0

    def flush():
        for bucket, parts in pending.items():
            if bucket not in writers:
                writers[bucket] = pq.ParquetWriter(staging / f"bucket-{bucket:05d}.parquet",
                                                   NORMALIZED_EVENTS, **STAGING_WRITE_OPTIONS)
            writers[bucket].write_table(pa.Table.from_batches(parts, NORMALIZED_EVENTS))
        pending.clear()

    try:
        for batch in batches:
            batch = pa.Table.from_batches([batch]).select(NORMALIZED_EVENTS.names).cast(NORMALIZED_EVENTS)
            bucket = bucket_of(batch.column("user_id").to_numpy(), num_shards)
            # a stable sort of small integers is numpy's radix sort: O(rows)
            order = np.argsort(bucket.astype(np.uint16 if num_shards <= 1 << 16 else np.uint32),
                               kind="stable")
            counts = np.bincount(bucket, minlength=num_shards)
            ends = np.cumsum(counts)
            # a batch of one bucket's users (always so with one shard) needs no regrouping
            grouped = batch if counts.max() == batch.num_rows else batch.take(order).combine_chunks()
            for b in np.flatnonzero(counts):
                part = grouped.slice(ends[b] - counts[b], counts[b])
                pending.setdefault(int(b), []).extend(part.to_batches())
            pending_rows += batch.num_rows
            total += batch.num_rows
            if pending_rows >= buffer_rows:
                flush()
                pending_rows = 0
        flush()
    finally:
        for writer in writers.values():
            writer.close()
    return {b: staging / f"bucket-{b:05d}.parquet" for b in sorted(writers)}, total


# --- phase 2: one bucket -> examples ---------------------------------------------------

@dataclass
class _Events:
    """A bucket's deduplicated events in (split, user, ts) order, as numpy columns [N]."""
    rank: np.ndarray  # user's index into `users`
    ts: np.ndarray
    app: np.ndarray  # 0 where null
    app_valid: np.ndarray
    loc: np.ndarray  # 0 where null
    loc_valid: np.ndarray
    traffic: np.ndarray  # float64, 0 where null
    users: np.ndarray  # [U] the bucket's distinct user_ids, ascending
    user_split: np.ndarray  # [U] index into SPLITS
    duplicates: int


def featurize_bucket(bucket_file: str | Path, shard: int, spec: FeatureSpec, maps: FeatureMaps,
                     row_group_size: int, out: str | Path) -> dict:
    """One bucket's events -> split=*/shard=<shard>/part-00000.parquet; returns its report."""
    table = pq.read_table(bucket_file)
    events = _sorted_unique_events(table, spec)
    layout = spec.layout
    T, span, origin = spec.slots, spec.window_seconds, spec.window_origin

    window = np.floor_divide(events.ts - origin, span)
    slot = (events.ts - origin - window * span) // spec.slot_seconds
    starts = np.ones(len(events.ts), bool)
    starts[1:] = (events.rank[1:] != events.rank[:-1]) | (window[1:] != window[:-1])
    example = np.cumsum(starts) - 1  # [N] example index of each event
    first = np.flatnonzero(starts)  # [E] first event of each example
    flat_slot = example * T + slot  # [N] index into the bucket's E*T slots, non-decreasing

    app_slot, app_ids = _distinct_pairs(flat_slot[events.app_valid], events.app[events.app_valid])
    loc_slot, loc_ids = _distinct_pairs(flat_slot[events.loc_valid], events.loc[events.loc_valid])
    channels = _SlotRecords(
        flat_slot=flat_slot, traffic=events.traffic,
        app_slot=flat_slot[events.app_valid],
        category=maps.category(events.app[events.app_valid], spec),
        category_value=(events.traffic[events.app_valid] if spec.category_value == "bytes" else None),
        loc_slot=flat_slot[events.loc_valid], region=maps.region(events.loc[events.loc_valid], spec))

    example_split = events.user_split[events.rank[first]]  # [E], ascending
    report = {"shard": shard, "events": len(table), "duplicates_dropped": events.duplicates,
              "users": {}, "examples": {}, "row_groups": {}}
    for split_index in np.flatnonzero(np.bincount(example_split, minlength=len(SPLITS))).tolist():
        name = SPLITS[split_index]
        lo, hi = np.searchsorted(example_split, [split_index, split_index + 1])
        path = Path(out) / f"split={name}" / f"shard={shard:05d}" / "part-00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        sizes = []
        with pq.ParquetWriter(path, EXAMPLES, **EXAMPLE_WRITE_OPTIONS) as writer:
            for e0 in range(lo, hi, row_group_size):
                e1 = min(e0 + row_group_size, hi)
                dense, observed = channels.dense(e0, e1, T, layout)
                writer.write_table(pa.Table.from_arrays([
                    pa.array(events.users[events.rank[first[e0:e1]]]),
                    pa.array([name] * (e1 - e0), pa.string()),
                    pa.array(origin + window[first[e0:e1]] * span),
                    _fixed_lists(_time_of_week(window[first[e0:e1]], spec), T),
                    _fixed_lists(observed, T),
                    _fixed_lists(dense, T * layout.num_channels),
                    *_bags(app_slot, app_ids, e0, e1, T),
                    *_bags(loc_slot, loc_ids, e0, e1, T),
                ], schema=EXAMPLES))
                sizes.append(int(e1 - e0))
        report["examples"][name] = int(hi - lo)
        report["users"][name] = int(np.count_nonzero(np.diff(events.rank[first[lo:hi]])) + 1)
        report["row_groups"][name] = sizes
    return report


def _sorted_unique_events(table: pa.Table, spec: FeatureSpec) -> _Events:
    user, _ = _column_values(table.column("user_id"))
    ts, _ = _column_values(table.column("ts"))
    by_user = np.argsort(user)
    sorted_users = user[by_user]
    new_user = np.empty(len(user), bool)
    new_user[:1] = True
    np.not_equal(sorted_users[1:], sorted_users[:-1], out=new_user[1:])
    rank_by_user = np.cumsum(new_user) - 1  # [N] dense user index of the rows in by_user order
    users = sorted_users[new_user]
    user_split = split_of(users, spec)
    order, rank, ts = _split_user_time_order(user_split[rank_by_user], rank_by_user,
                                             ts[by_user], by_user)

    (app, app_valid), (loc, loc_valid), (traffic, traffic_valid), (event, _) = (
        _column_values(table.column(name)) for name in ("app_id", "loc_id", "traffic_bytes", "event"))
    keep = _first_of_identical_rows(rank, ts, order, (app, app_valid, loc, loc_valid, traffic,
                                                      traffic_valid, event))
    kept = order[keep]
    return _Events(rank=rank[keep], ts=ts[keep], app=app[kept], app_valid=app_valid[kept],
                   loc=loc[kept], loc_valid=loc_valid[kept], traffic=traffic[kept].astype(np.float64),
                   users=users, user_split=user_split, duplicates=int(len(keep) - len(kept)))


def _column_values(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """values [N] (0 where null) and validity [N] bool of a numeric column; cheaper than fill_null."""
    array = column.combine_chunks()
    dtype = np.dtype(array.type.to_pandas_dtype())
    values = np.frombuffer(array.buffers()[1], dtype, len(array), array.offset * dtype.itemsize)
    if array.null_count == 0:
        return values, np.ones(len(array), bool)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return np.where(valid, values, 0), valid


def _split_user_time_order(split: np.ndarray, rank: np.ndarray, ts: np.ndarray,
                           rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorts rows by (split, user rank, ts): (row order, rank, ts), each [N] in that order.

    The inputs are [N] arrays in any common order; `rows` holds their table row indices.
    """
    row_bits = (len(ts) - 1).bit_length()
    ts_min, ts_max = (int(ts.min()), int(ts.max())) if len(ts) else (0, 0)
    rank_bits, ts_bits = int(rank.max(initial=0)).bit_length(), (ts_max - ts_min).bit_length()
    if rank_bits + ts_bits + row_bits > 62:
        order = np.lexsort((ts, rank, split))
        return rows[order], rank[order], ts[order]
    # all four fields pack into one uint64, so a plain sort (several times faster than an
    # argsort or lexsort) orders the rows, and the sorted keys give back rank and ts
    u64 = np.uint64
    key = ((split.astype(u64) << u64(62)) | (rank.astype(u64) << u64(ts_bits + row_bits))
           | ((ts - ts_min).astype(u64) << u64(row_bits)) | rows.astype(u64))
    key.sort()
    order = (key & u64((1 << row_bits) - 1)).astype(np.int64)
    rank = ((key >> u64(ts_bits + row_bits)) & u64((1 << rank_bits) - 1)).astype(np.int64)
    ts = ((key >> u64(row_bits)) & u64((1 << ts_bits) - 1)).astype(np.int64) + ts_min
    return order, rank, ts


def _first_of_identical_rows(rank: np.ndarray, ts: np.ndarray, order: np.ndarray,
                             columns: tuple[np.ndarray, ...]) -> np.ndarray:
    """keep mask [N] over rows sorted by (user, ts): False for exact repeats of an earlier row.

    rank and ts are already in sorted order; the other columns are in table order and are
    read through `order`. Identical rows share (user, ts), so only runs of equal (user, ts)
    are compared on the other columns; such runs are rare, so the full sort touches few rows.
    """
    keep = np.ones(len(ts), bool)
    same = (rank[1:] == rank[:-1]) & (ts[1:] == ts[:-1])  # [N-1]: row i+1 continues row i's run
    if not same.any():
        return keep
    in_run = np.zeros(len(ts), bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    rows = np.flatnonzero(in_run)
    run = np.cumsum(np.concatenate([[True], ~same]))[rows]
    fields = [column[order[rows]] for column in columns]
    by_content = np.lexsort((*fields, run))
    repeat = run[by_content][1:] == run[by_content][:-1]
    for field in fields:
        repeat &= field[by_content][1:] == field[by_content][:-1]
    keep[rows[by_content][1:][repeat]] = False
    return keep


def _distinct_pairs(slot: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (slot, id) pairs sorted by slot, then id: [P] each."""
    if len(ids) == 0:
        return slot, ids
    lo = int(ids.min())
    id_span = int(ids.max()) - lo + 1
    if (int(slot.max()) + 1) * id_span < 1 << 62:
        # both fit in one int64: a plain sort (far faster than lexsort) orders the pairs
        key = np.sort(slot * id_span + (ids - lo))
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]
        return key // id_span, key % id_span + lo
    order = np.lexsort((ids, slot))
    slot, ids = slot[order], ids[order]
    new = np.concatenate([[True], (slot[1:] != slot[:-1]) | (ids[1:] != ids[:-1])])
    return slot[new], ids[new]


@dataclass
class _SlotRecords:
    """Per-record slot indices and values; `dense` aggregates a range of examples."""
    flat_slot: np.ndarray  # [N] all records
    traffic: np.ndarray  # [N]
    app_slot: np.ndarray  # [Na] records with an app_id
    category: np.ndarray  # [Na] in [0, C]
    category_value: np.ndarray | None  # [Na] bytes, or None to count records
    loc_slot: np.ndarray  # [Nl] records with a loc_id
    region: np.ndarray  # [Nl] in [0, K]

    def dense(self, e0: int, e1: int, T: int, layout: DenseLayout) -> tuple[np.ndarray, np.ndarray]:
        """dense [n, T, F] float32 and observed [n, T] bool for examples [e0, e1)."""
        n, lo, hi = e1 - e0, e0 * T, e1 * T
        C1, K1 = layout.num_categories + 1, layout.num_regions + 1
        r0, r1 = np.searchsorted(self.flat_slot, [lo, hi])
        slots = self.flat_slot[r0:r1] - lo
        records = np.bincount(slots, minlength=n * T)  # [n*T]
        bytes_ = np.bincount(slots, weights=self.traffic[r0:r1], minlength=n * T)
        a0, a1 = np.searchsorted(self.app_slot, [lo, hi])
        weights = None if self.category_value is None else self.category_value[a0:a1]
        usage = np.bincount((self.app_slot[a0:a1] - lo) * C1 + self.category[a0:a1],
                            weights=weights, minlength=n * T * C1)  # [n*T*C1]
        l0, l1 = np.searchsorted(self.loc_slot, [lo, hi])
        located = np.bincount(self.loc_slot[l0:l1] - lo, minlength=n * T)
        in_region = np.bincount((self.loc_slot[l0:l1] - lo) * K1 + self.region[l0:l1],
                                minlength=n * T * K1).reshape(n * T, K1)

        dense = np.empty((n * T, layout.num_channels), np.float32)
        dense[:, layout.category] = np.log1p(usage.reshape(n * T, C1))
        dense[:, layout.region] = in_region / np.maximum(located, 1)[:, None]
        dense[:, layout.activity] = np.log1p(records)
        dense[:, layout.volume] = np.log1p(bytes_)
        return dense.reshape(n, T, -1), (records > 0).reshape(n, T)


def _time_of_week(window: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """[E, T] int16: slot of the week (0 = Monday 00:00 UTC) of every slot of each window."""
    starts = (spec.window_origin + window[:, None] * spec.window_seconds
              + np.arange(spec.slots) * spec.slot_seconds)  # [E, T] epoch seconds
    return spec.time_of_week(starts)


def _fixed_lists(values: np.ndarray, per_row: int) -> pa.ListArray:
    """[n, ...] numpy -> n lists of `per_row` flattened values."""
    offsets = np.arange(len(values) + 1, dtype=np.int32) * per_row
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))


def _bags(pair_slot: np.ndarray, pair_ids: np.ndarray, e0: int, e1: int,
          T: int) -> tuple[pa.ListArray, pa.ListArray]:
    """ids (flattened per example) and per-slot lengths [n, T] for examples [e0, e1)."""
    p0, p1 = np.searchsorted(pair_slot, [e0 * T, e1 * T])
    lengths = np.bincount(pair_slot[p0:p1] - e0 * T, minlength=(e1 - e0) * T).astype(np.int32)
    per_example = lengths.reshape(e1 - e0, T).sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(per_example)]).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(pair_ids[p0:p1], pa.int64()))
    return ids, _fixed_lists(lengths.reshape(e1 - e0, T), T)


# --- both phases -------------------------------------------------------------------------

def featurize_events(batches: Iterable[pa.RecordBatch], spec: FeatureSpec, maps: FeatureMaps,
                     cfg: DataConfig, out: str | Path,
                     input_report: Callable[[], dict] | None = None) -> dict:
    """Events (NORMALIZED_EVENTS batches) -> examples, the spec folder and the manifest in `out`.

    The spec (build_feature_spec for new data, a checkpoint's for data to complete) decides
    the examples; cfg gives only how they are made: data.num_shards, data.featurize_workers
    and data.row_group_size.

    `out` should be new or emptied by `prepare_output` (the CLI does so before the reader
    writes its quarantine files there).
    `input_report`, called once the batches are consumed, gives the reader's counts and
    quarantine files for the manifest. Returns the manifest.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_limits(cfg)
    bucket_files, rows = partition_events(batches, out / STAGING, cfg.num_shards)
    jobs = [(str(path), bucket, spec, maps, cfg.row_group_size, str(out))
            for bucket, path in bucket_files.items()]
    workers = min(cfg.featurize_workers, len(jobs))
    if workers <= 1:
        reports = [featurize_bucket(*job) for job in jobs]
    else:
        # spawn, not fork: forking a process that runs Arrow's thread pools can deadlock
        with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            reports = list(pool.map(featurize_bucket, *zip(*jobs)))
    spec = save_spec(out / SPEC_DIR, spec, maps)
    manifest = _manifest(reports, rows, spec, cfg, input_report() if input_report else None)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    # staging goes last: until the manifest exists it marks the folder as featurize's own
    shutil.rmtree(out / STAGING)
    return manifest


def prepare_output(out: Path) -> None:
    """Empties a previous featurize output folder; refuses any other non-empty folder."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    entries = set(out.iterdir())
    ours = {p for p in entries if p.name in OUTPUTS or p.name.startswith("split=")}
    earlier_run = (out / MANIFEST).exists() or (out / STAGING).exists()
    if entries and (not earlier_run or entries - ours):
        raise UserError(f"{out}: data.features points at a folder that holds other files than a "
                        "featurize output; refusing to overwrite it (choose an empty or new folder)")
    for path in ours:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def config_hash(cfg: DataConfig) -> str:
    """sha256 of the data settings that decide the examples (not where they go, how fast they
    are made or how the loader reads them)."""
    settings = {key: getattr(cfg, key) for key in HASHED_SETTINGS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def check_limits(cfg: DataConfig) -> None:
    """Settings the example schema cannot hold, refused before any data is touched.

    load_config already refuses them; this covers a DataConfig built in code.
    """
    problems = cfg.problems()
    if problems:
        raise UserError("; ".join(f"data.{key}: {message}" for key, message in problems))


def _manifest(reports: list[dict], rows: int, spec: FeatureSpec, cfg: DataConfig,
              quarantine: dict | None) -> dict:
    """What this run wrote: counts per split and shard, the input's fate, and the spec's digest
    (the layout of the examples is the spec's, in spec/spec.json)."""
    total = {key: {s: sum(r[key].get(s, 0) for r in reports) for s in SPLITS}
             for key in ("examples", "users")}
    duplicates = sum(r["duplicates_dropped"] for r in reports)
    return {
        "spec_digest": spec.digest, "spec": SPEC_DIR,
        "examples": total["examples"], "users": total["users"],
        "events": {"read": rows, "duplicates_dropped": duplicates, "featurized": rows - duplicates},
        "shards": sorted(reports, key=lambda r: r["shard"]),
        "quarantine": quarantine, "config_hash": config_hash(cfg),
    }


# --- a whole run: what `u-mask data featurize` does ------------------------------------

def featurize(cfg: RunConfig) -> dict:
    """What `u-mask data featurize` does: data.source -> examples, manifest and the resolved
    config in data.features, invalid rows handled by data.invalid_rows. Returns the manifest."""
    data, out = cfg.data, Path(cfg.data.features)
    check_limits(data)
    dataset = open_dataset(data.source)
    prepare_output(out)
    reader = EventReader(dataset, data.invalid_rows,
                         out / "quarantine" if data.invalid_rows == "quarantine" else None,
                         plausible=data.plausible_range())
    spec, maps = build_feature_spec(read_apps(dataset, data.num_categories), read_locations(dataset), data)
    manifest = featurize_events(reader.batches(), spec, maps, data, out, reader.report.as_dict)
    save_config(cfg, out / "config.yaml")
    return manifest
