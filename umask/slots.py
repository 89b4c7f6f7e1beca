"""Contract events -> slots: one example per (user, window), the input of every U-MASK model.

The one implementation of how events become a model's input, shared by featurize (which
writes the examples of a whole dataset, trainer/data/featurize.py) and by the bundle loader
(which embeds and completes the users of an events file, umask/bundle.py). Everything that
decides what an example means comes from the feature spec (umask/spec.py) and its maps.
Events arrive as umask.contract.NORMALIZED_EVENTS (the contract reader's output).

Per set of events (numpy/pyarrow only, no Python loop per event or per user):
- exact duplicate rows (all six columns, nulls included) are dropped;
- window w of a user covers [origin + w*T*slot_seconds, ...) with origin the Monday
  1970-01-05T00:00Z, so windows are week-aligned when T*slot_seconds is a week; a
  (user, window) with at least one event is one example;
- dense channels per umask.spec.DenseLayout. Category usage is log1p of the slot's app records
  (count) or of their traffic bytes (spec.category_value; null bytes count 0); apps missing
  from the spec's app map fall in the unknown category; location-only records (null app_id)
  count for regions, activity and volume, not for categories. Region shares are over the
  slot's records with a loc_id; install and uninstall events are records like `use`
  (observed, activity, categories, app bag), because an install is evidence of the user's
  interest in the app at that time and the event kind is not a channel of its own;
- regions come from the spec's map; loc_ids it does not list go to region
  stable_hash(loc_id, REGION_SALT) % K (umask.spec.FeatureMaps.region);
- id bags are the distinct raw app_ids and loc_ids of each slot, sorted;
- each user lands in train/val/test/cold by a stable hash of (user_id, split_salt), the same
  in every window and every run.

`partition_events` splits an event stream by a stable hash of user_id into bucket files, so
that a dataset of any size is turned into examples one bounded bucket at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from umask.contract import DEFAULT_PLAUSIBLE, NORMALIZED_EVENTS, EventReader, open_dataset
from umask.errors import UserError
from umask.spec import SHARD_SALT, DenseLayout, FeatureMaps, FeatureSpec, stable_hash

PARTITION_BUFFER_ROWS = 1 << 22  # rows buffered across buckets before a flush (~170 MB)
# staging files are read once, soon after they are written: compressing, dictionary-encoding
# and summarizing them would cost more CPU than the disk traffic it saves
STAGING_WRITE_OPTIONS = dict(compression="none", use_dictionary=False, write_statistics=False)


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


def partition_events(batches: Iterable[pa.RecordBatch], staging: Path, num_shards: int,
                     buffer_rows: int = PARTITION_BUFFER_ROWS,
                     schema: pa.Schema = NORMALIZED_EVENTS) -> tuple[dict[int, Path], int]:
    """Appends each batch's rows to its users' bucket files (bucket_of its user_id column);
    returns ({bucket: file}, rows). schema: the rows' columns (events by default; any table
    keyed by user_id, such as earlier user embeddings, partitions the same way)."""
    staging.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    pending: dict[int, list[pa.RecordBatch]] = {}
    pending_rows = total = 0

    def flush():
        for bucket, parts in pending.items():
            if bucket not in writers:
                writers[bucket] = pq.ParquetWriter(staging / f"bucket-{bucket:05d}.parquet",
                                                   schema, **STAGING_WRITE_OPTIONS)
            writers[bucket].write_table(pa.Table.from_batches(parts, schema))
        pending.clear()

    try:
        for batch in batches:
            for b, part in group_by_bucket(batch, num_shards, schema):
                pending.setdefault(b, []).extend(part.to_batches())
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


def group_by_bucket(batch: pa.RecordBatch, num_shards: int,
                    schema: pa.Schema = NORMALIZED_EVENTS) -> list[tuple[int, pa.Table]]:
    """(bucket, its rows of batch as `schema`) for each bucket the batch's user_ids fall in,
    in increasing bucket order, rows in batch order within a bucket."""
    table = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
    bucket = bucket_of(table.column("user_id").to_numpy(), num_shards)
    counts = np.bincount(bucket, minlength=num_shards)
    ends = np.cumsum(counts)
    if counts.max(initial=0) == table.num_rows:  # one bucket's users (always so with one shard)
        return [(int(bucket[0]), table)] if table.num_rows else []
    # a stable sort of small integers is numpy's radix sort: O(rows)
    order = np.argsort(bucket.astype(np.uint16 if num_shards <= 1 << 16 else np.uint32), kind="stable")
    grouped = table.take(order).combine_chunks()
    return [(int(b), grouped.slice(ends[b] - counts[b], counts[b])) for b in np.flatnonzero(counts)]


def gather_bags(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The concatenated bags of `rows`, where row i owns values[offsets[i]:offsets[i+1]]."""
    starts = offsets[rows]
    counts = offsets[rows + 1] - starts
    out_starts = np.cumsum(counts) - counts
    # position j of the output, inside row k's bag, reads values[starts[k] + (j - out_starts[k])]
    index = np.repeat(starts - out_starts, counts) + np.arange(counts.sum(), dtype=np.int64)
    return values[index]


def row_offsets(lengths: np.ndarray) -> np.ndarray:
    """[n+1] offsets of each row's bag in the flat values, from per-slot lengths [n, T]."""
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths.sum(axis=1, dtype=np.int64), out=offsets[1:])
    return offsets


@dataclass
class ExampleRows:
    """n decoded examples, columnar; bags flat with per-slot lengths (row-major over [n, T])."""

    user_id: np.ndarray  # [n] int64
    window_start: np.ndarray  # [n] int64
    split: np.ndarray  # [n] int64
    time_of_week: np.ndarray  # [n, T] int16
    observed: np.ndarray  # [n, T] bool
    dense: np.ndarray  # [n, T, F] float32
    app_values: np.ndarray  # [sum(app_lengths)] int64
    app_lengths: np.ndarray  # [n, T] int32
    loc_values: np.ndarray  # [sum(loc_lengths)] int64
    loc_lengths: np.ndarray  # [n, T] int32

    def __len__(self) -> int:
        return self.user_id.shape[0]

    @cached_property
    def app_offsets(self) -> np.ndarray:
        return row_offsets(self.app_lengths)

    @cached_property
    def loc_offsets(self) -> np.ndarray:
        return row_offsets(self.loc_lengths)

    def take(self, rows: np.ndarray) -> ExampleRows:
        """The examples at `rows`, in that order (a copy, so batches never alias the block)."""
        rows = np.asarray(rows, dtype=np.int64)
        return ExampleRows(
            user_id=self.user_id[rows],
            window_start=self.window_start[rows],
            split=self.split[rows],
            time_of_week=self.time_of_week[rows],
            observed=self.observed[rows],
            dense=self.dense[rows],
            app_values=gather_bags(self.app_values, self.app_offsets, rows),
            app_lengths=self.app_lengths[rows],
            loc_values=gather_bags(self.loc_values, self.loc_offsets, rows),
            loc_lengths=self.loc_lengths[rows],
        )

    @staticmethod
    def concat(parts: list[ExampleRows]) -> ExampleRows:
        """The examples of `parts` one after another; bags stay batch-major because each part's are."""
        if len(parts) == 1:
            return parts[0]
        return ExampleRows(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                              for f in fields(ExampleRows)})


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

    def take(self, keep: np.ndarray) -> "_Events":
        """The events where keep [N] bool is True (users and their splits unchanged)."""
        return _Events(rank=self.rank[keep], ts=self.ts[keep], app=self.app[keep],
                       app_valid=self.app_valid[keep], loc=self.loc[keep], loc_valid=self.loc_valid[keep],
                       traffic=self.traffic[keep], users=self.users, user_split=self.user_split,
                       duplicates=self.duplicates)


class Slots:
    """A set of events cut into examples, in (split, user, window) order; `rows` decodes them.

    table: NORMALIZED_EVENTS rows of any users in any order. latest_only keeps only each
    user's latest window (the one holding its last event), as embedding and completion use.
    """

    def __init__(self, table: pa.Table, spec: FeatureSpec, maps: FeatureMaps, latest_only: bool = False):
        self.spec = spec
        self.events_read = len(table)
        events = _sorted_unique_events(table, spec)
        self.duplicates = events.duplicates
        span, origin = spec.window_seconds, spec.window_origin
        window = np.floor_divide(events.ts - origin, span)
        if latest_only and len(window):
            # a user's events are contiguous and in time order: its last one is in its latest window
            last = np.flatnonzero(np.append(events.rank[1:] != events.rank[:-1], True))
            keep = window == np.repeat(window[last], np.diff(np.concatenate([[-1], last])))
            events = events.take(keep)
            window = window[keep]
        T = spec.slots
        slot = (events.ts - origin - window * span) // spec.slot_seconds
        starts = np.ones(len(events.ts), bool)
        starts[1:] = (events.rank[1:] != events.rank[:-1]) | (window[1:] != window[:-1])
        example = np.cumsum(starts) - 1  # [N] example index of each event
        first = np.flatnonzero(starts)  # [E] first event of each example
        flat_slot = example * T + slot  # [N] index into the E*T slots, non-decreasing

        self._app_pairs = distinct_pairs(flat_slot[events.app_valid], events.app[events.app_valid])
        self._loc_pairs = distinct_pairs(flat_slot[events.loc_valid], events.loc[events.loc_valid])
        self._records = _SlotRecords(
            flat_slot=flat_slot, traffic=events.traffic,
            app_slot=flat_slot[events.app_valid],
            category=maps.category(events.app[events.app_valid], spec),
            category_value=(events.traffic[events.app_valid] if spec.category_value == "bytes" else None),
            loc_slot=flat_slot[events.loc_valid], region=maps.region(events.loc[events.loc_valid], spec))
        self._window = window[first]  # [E]
        self.user_id = events.users[events.rank[first]]  # [E], ascending within a split
        self.split = events.user_split[events.rank[first]].astype(np.int64)  # [E], ascending
        self.window_start = origin + self._window * span  # [E] epoch seconds of slot 0

    def __len__(self) -> int:
        return len(self.user_id)

    def rows(self, e0: int, e1: int) -> ExampleRows:
        """Examples [e0, e1) decoded: dense [n,T,F], observed, time_of_week and the id bags."""
        T = self.spec.slots
        dense, observed = self._records.dense(e0, e1, T, self.spec.layout)
        app_values, app_lengths = _bags(*self._app_pairs, e0, e1, T)
        loc_values, loc_lengths = _bags(*self._loc_pairs, e0, e1, T)
        return ExampleRows(user_id=self.user_id[e0:e1], window_start=self.window_start[e0:e1],
                           split=self.split[e0:e1],
                           time_of_week=_time_of_week(self._window[e0:e1], self.spec),
                           observed=observed, dense=dense, app_values=app_values,
                           app_lengths=app_lengths, loc_values=loc_values, loc_lengths=loc_lengths)


def _bags(pair_slot: np.ndarray, pair_ids: np.ndarray, e0: int, e1: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """ids of examples [e0, e1) (all bags one after another) and per-slot lengths [n, T] int32."""
    p0, p1 = np.searchsorted(pair_slot, [e0 * T, e1 * T])
    lengths = np.bincount(pair_slot[p0:p1] - e0 * T, minlength=(e1 - e0) * T).astype(np.int32)
    return pair_ids[p0:p1].astype(np.int64, copy=False), lengths.reshape(e1 - e0, T)


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


def distinct_pairs(slot: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (slot, id) pairs sorted by slot, then id: [P] each, of non-negative
    integers [N] each (featurize also pairs loc_ids with buckets this way)."""
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


def latest_windows(events: str | Path, spec: FeatureSpec, maps: FeatureMaps,
                   plausible: tuple[int, int] = DEFAULT_PLAUSIBLE) -> ExampleRows:
    """Each user's latest window of a contract events dataset, folder or file, by user id.

    Read in one piece with the strict contract reader (an invalid row is a UserError naming
    file, column and row); meant for files that fit in memory. plausible: [start, end) epoch
    seconds of a valid ts, as the training data was read with.
    """
    batches = list(EventReader(open_dataset(events), "strict", plausible=plausible).batches())
    if not batches:
        raise UserError(f"{events}: no events, so no user")
    slots = Slots(pa.Table.from_batches(batches, NORMALIZED_EVENTS), spec, maps, latest_only=True)
    rows = slots.rows(0, len(slots))
    return rows.take(np.argsort(rows.user_id, kind="stable"))
