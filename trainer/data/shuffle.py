"""featurize's shuffle files: a writer's rows grouped by bucket in one data file, beside an
index of each bucket's byte range and rows, so that a read task writes two files (not one
per bucket: at 10^11 events, 12,500 read tasks times 33,000 buckets would be 4 * 10^8 files)
and a bucket's task reads its segment of each file with two seeks. This is the layout of
Spark's sort-based shuffle (a data file and an index of R+1 offsets per map task,
IndexShuffleBlockResolver).

A run `<prefix>` is
- `<prefix>.arrow`: one Arrow IPC stream (schema, batches, end marker) per non-empty bucket,
  back to back, in bucket order; uncompressed, since it is read once soon after;
- `<prefix>.index`: int64 [2R+1]: the byte offsets [R+1] of the buckets' segments, then the
  rows [R] of each bucket. It is renamed into place after the data file, so an index marks a
  complete run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa

from trainer.data.tasks import atomic_path
from umask.slots import group_by_bucket


def write_run(prefix: Path, segments: Iterable[tuple[int, pa.Table]], num_buckets: int,
              schema: pa.Schema) -> np.ndarray:
    """Writes the run `prefix` of segments (bucket, rows as `schema`), given in increasing
    bucket order; returns its rows per bucket [num_buckets] int64."""
    offsets = np.zeros(num_buckets + 1, np.int64)
    rows = np.zeros(num_buckets, np.int64)
    data, index = prefix.with_suffix(".arrow"), prefix.with_suffix(".index")
    data.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(data)
    position, next_bucket = 0, 0
    with open(tmp, "wb") as out:
        for bucket, table in segments:
            offsets[next_bucket:bucket + 1] = position  # empty buckets before it: empty ranges
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, schema) as writer:
                writer.write_table(table)
            segment = sink.getvalue()
            out.write(segment)
            position += segment.size
            rows[bucket] = table.num_rows
            next_bucket = bucket + 1
        offsets[next_bucket:] = position
    os.replace(tmp, data)
    tmp = atomic_path(index)
    np.concatenate([offsets, rows]).tofile(tmp)
    os.replace(tmp, index)
    return rows


def read_segment(prefix: str | Path, bucket: int) -> pa.Table | None:
    """Bucket `bucket`'s rows of the run `prefix`, or None when it has none."""
    prefix = Path(prefix)
    with open(prefix.with_suffix(".index"), "rb") as index:
        index.seek(8 * bucket)
        start, end = np.frombuffer(index.read(16), np.int64)
    if end == start:
        return None
    with open(prefix.with_suffix(".arrow"), "rb") as data:
        data.seek(int(start))
        return pa.ipc.open_stream(data.read(int(end - start))).read_all()


def read_bucket(prefixes: Iterable[str | Path], bucket: int, schema: pa.Schema) -> pa.Table:
    """Bucket `bucket`'s rows of every run, in run order (schema's empty table when none)."""
    parts = [t for t in (read_segment(p, bucket) for p in prefixes) if t is not None]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def run_rows(prefix: str | Path, num_buckets: int) -> np.ndarray:
    """Rows per bucket [num_buckets] int64 of the run `prefix`, from its index."""
    return np.fromfile(Path(prefix).with_suffix(".index"), np.int64)[num_buckets + 1:]


def partition_into_runs(batches: Iterable[pa.RecordBatch], prefix: Path, num_buckets: int, buffer_rows: int,
                        schema: pa.Schema,
                        on_segment: Callable[[int, pa.Table], None] | None = None) -> tuple[list[str], np.ndarray, int]:
    """Batches grouped by bucket (umask.slots.bucket_of their user_id) into runs
    `<prefix>-<k>`, one each time buffer_rows rows are held and one at the end; returns
    (the runs, rows per bucket [num_buckets] over all runs, rows). on_segment(bucket, rows)
    sees each segment as it is written."""
    runs, rows_per_bucket, total = [], np.zeros(num_buckets, np.int64), 0
    pending: dict[int, list[pa.Table]] = {}
    held = 0

    def segments():
        for bucket in sorted(pending):
            table = pa.concat_tables(pending[bucket])
            if on_segment is not None:
                on_segment(bucket, table)
            yield bucket, table

    def flush():
        run = prefix.with_name(f"{prefix.name}-{len(runs):04d}")
        rows_per_bucket[:] += write_run(run, segments(), num_buckets, schema)
        runs.append(str(run))
        pending.clear()

    for batch in batches:
        for bucket, part in group_by_bucket(batch, num_buckets, schema):
            pending.setdefault(bucket, []).append(part)
        held += batch.num_rows
        total += batch.num_rows
        if held >= buffer_rows:
            flush()
            held = 0
    if pending or not runs:
        flush()
    return runs, rows_per_bucket, total
