"""User embeddings with freshness: z_u per user, what it was computed from, and when.

Downstream models cache these vectors for days (as in Meta's SUM and ERCache), so every row
says which bundle computed it, from which window of the user's data, and when. A row of
`embeddings_schema(U)`:
  user_id          int64
  vector           z_u [U] float32: U-SCOPE over the user's latest window, every observed slot
                   as evidence (umask.model.UMask.user_embedding)
  bundle_version   the bundle's content digest (umask.bundle.bundle_version)
  window_start/end epoch seconds, [start, end) of the window the vector was computed from
  observed_slots   int32, the window's slots with at least one event
  fingerprint      int64, blake2b (8 bytes) of the featurized window: window_start, observed,
                   dense channels and both id bags, exactly what z_u is a function of
  computed_at      UTC timestamp (seconds) of the run that computed the vector

Refresh rule (`embed_users_file` over a file that already holds such rows): a user's row is
recomputed when its bundle_version differs from this bundle's or its fingerprint differs from
that of the user's latest window in the new events; otherwise the old row is kept as it was,
computed_at included. Users that the new events do not mention keep their rows.

`embed_users_file` streams: the events (and the earlier rows) are partitioned by a hash of
user_id into bucket files of about BUCKET_EVENTS events, each bucket is featurized and
embedded on its own in batches, in `processes` spawned processes that each hold the bundle
(its tables included); memory is bounded by a bucket and the tables, not by the file.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import math
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from umask.bundle import Bundle
from umask.contract import EventReader, open_dataset
from umask.errors import UserError
from umask.slots import ExampleRows, Slots, partition_events

BUCKET_EVENTS = 1 << 22  # events per bucket (a few hundred MB of featurize arrays at most)
BATCH_USERS = 512  # users per model call


def embeddings_schema(dim: int) -> pa.Schema:
    """The schema of user embedding rows with vectors of `dim` floats (module docstring)."""
    return pa.schema([
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("bundle_version", pa.string(), nullable=False),
        pa.field("window_start", pa.int64(), nullable=False),
        pa.field("window_end", pa.int64(), nullable=False),
        pa.field("observed_slots", pa.int32(), nullable=False),
        pa.field("fingerprint", pa.int64(), nullable=False),
        pa.field("computed_at", pa.timestamp("s", tz="UTC"), nullable=False),
    ])


def fingerprints(rows: ExampleRows) -> np.ndarray:
    """[n] int64: blake2b (8 bytes, little-endian) of each window's window_start, observed,
    dense and id bags; equal windows give equal fingerprints on every machine.

    Only the observed slots' dense channels are hashed: every channel of a slot without a
    record is 0 (umask/slots.py), so they add nothing but bytes (5x fewer at 20 % observed)."""
    out = np.empty(len(rows), np.int64)
    app, loc = rows.app_offsets, rows.loc_offsets
    for i in range(len(rows)):
        h = hashlib.blake2b(digest_size=8)
        h.update(rows.window_start[i:i + 1].tobytes())
        h.update(rows.observed[i].tobytes())
        h.update(rows.dense[i][rows.observed[i]].tobytes())
        h.update(rows.app_lengths[i].tobytes())
        h.update(rows.app_values[app[i]:app[i + 1]].tobytes())
        h.update(rows.loc_lengths[i].tobytes())
        h.update(rows.loc_values[loc[i]:loc[i + 1]].tobytes())
        out[i] = np.frombuffer(h.digest(), "<i8")[0]
    return out


def embed_rows_table(bundle: Bundle, rows: ExampleRows, batch_size: int = BATCH_USERS,
                     computed_at: int | None = None) -> pa.Table:
    """Embedding rows (module docstring) of decoded windows, in their order; computed_at:
    epoch seconds (default: now)."""
    computed_at = int(time.time()) if computed_at is None else computed_at
    vectors = np.concatenate([bundle.embed_rows(rows.take(np.arange(b, min(b + batch_size, len(rows))))).numpy()
                              for b in range(0, len(rows), batch_size)]) if len(rows) else \
        np.empty((0, bundle.model.cfg.user_dim), np.float32)
    n, dim = len(rows), bundle.model.cfg.user_dim
    return pa.table({
        "user_id": rows.user_id,
        "vector": pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), dim),
        "bundle_version": pa.array([bundle.version] * n, pa.string()),
        "window_start": rows.window_start,
        "window_end": rows.window_start + bundle.spec.window_seconds,
        "observed_slots": rows.observed.sum(axis=1).astype(np.int32),
        "fingerprint": fingerprints(rows),
        "computed_at": pa.array(np.full(n, computed_at), pa.timestamp("s", tz="UTC")),
    }, schema=embeddings_schema(dim))


def embed_users_file(bundle: str | Path, events: str | Path, out: str | Path, processes: int = 1,
                     batch_size: int = BATCH_USERS,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Writes (or refreshes, by the module docstring's rule) `out`, a Parquet file of the
    embedding rows of every user of a contract events dataset, folder or file.

    Streams the events through bucket files in a temporary folder beside `out`; buckets run
    in `processes` processes. progress(users) is called as each bucket finishes, with its
    users. Returns {"users", "recomputed", "kept", "buckets", "seconds"}. Errors are
    UserErrors: an invalid events row (strict contract reader: file, column, row), an `out`
    that is not a file of embedding rows.
    """
    started = time.perf_counter()
    loaded = Bundle(bundle)
    out = Path(out)
    dataset = open_dataset(events)
    total_events = sum(pq.ParquetFile(path).metadata.num_rows for path in dataset.event_files
                       if path.is_file() and path.stat().st_size)
    buckets = max(processes, math.ceil(total_events / BUCKET_EVENTS), 1)
    schema = embeddings_schema(loaded.model.cfg.user_dim)
    previous = out if out.exists() else None
    if previous is not None:
        found = pq.read_schema(previous)
        width = getattr(found.field("vector").type, "list_size", None) if "vector" in found.names else None
        if found.names != schema.names or width != loaded.model.cfg.user_dim:
            raise UserError(f"{out}: exists but is not a file of user embeddings of this bundle's width "
                            f"({loaded.model.cfg.user_dim}); choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    computed_at = int(time.time())
    with tempfile.TemporaryDirectory(prefix=".embed-users-", dir=out.parent) as work:
        work = Path(work)
        reader = EventReader(dataset, "strict", plausible=loaded.plausible)
        event_files, _ = partition_events(reader.batches(), work / "events", buckets)
        old_files = {}
        if previous is not None:
            old_files, _ = partition_events(pq.ParquetFile(previous).iter_batches(), work / "previous",
                                            buckets, schema=schema)
        jobs = [(bucket, event_files.get(bucket), old_files.get(bucket), work / f"part-{bucket:05d}.parquet")
                for bucket in sorted(set(event_files) | set(old_files))]
        counts = {"users": 0, "recomputed": 0, "kept": 0}

        def done(result: dict) -> None:
            for key in counts:
                counts[key] += result[key]
            if progress is not None:
                progress(result["users"])

        if processes <= 1:
            for job in jobs:
                done(_embed_bucket(loaded, *job[1:], batch_size, computed_at))
        else:
            # spawn, not fork: forking a process that runs Arrow's and torch's thread pools can deadlock
            with concurrent.futures.ProcessPoolExecutor(
                    processes, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_open_worker_bundle, initargs=(str(bundle),)) as pool:
                futures = [pool.submit(_embed_bucket_in_worker, *job[1:], batch_size, computed_at)
                           for job in jobs]
                for future in concurrent.futures.as_completed(futures):
                    done(future.result())
        tmp = out.with_name(out.name + ".tmp")
        with pq.ParquetWriter(tmp, schema) as writer:
            for _, _, _, part in jobs:
                if part.exists():
                    writer.write_table(pq.read_table(part, schema=schema))
        os.replace(tmp, out)
    return {**counts, "buckets": len(jobs), "seconds": time.perf_counter() - started}


_WORKER_BUNDLE: Bundle | None = None


def _open_worker_bundle(folder: str) -> None:
    global _WORKER_BUNDLE
    import torch

    torch.set_num_threads(1)  # the processes are the parallelism
    _WORKER_BUNDLE = Bundle(folder, verify=False)  # the parent verified it moments ago


def _embed_bucket_in_worker(*args) -> dict:
    return _embed_bucket(_WORKER_BUNDLE, *args)


def _embed_bucket(bundle: Bundle, events: Path | None, previous: Path | None, out: Path,
                  batch_size: int, computed_at: int) -> dict:
    """One bucket: each user's latest window embedded unless its previous row is still fresh;
    the previous rows of users without events kept. Writes `out`; returns the counts."""
    schema = embeddings_schema(bundle.model.cfg.user_dim)
    old = pq.read_table(previous, schema=schema) if previous is not None else schema.empty_table()
    old = old.take(np.argsort(old.column("user_id").to_numpy(), kind="stable"))
    old_users = old.column("user_id").to_numpy()
    fresh_version = np.asarray(old.column("bundle_version").to_pylist(), dtype=object) == bundle.version
    old_fingerprints = old.column("fingerprint").to_numpy()
    counts = {"users": 0, "recomputed": 0, "kept": 0}
    seen_old = np.zeros(len(old_users), bool)
    with pq.ParquetWriter(out, schema) as writer:
        if events is not None:
            slots = Slots(pq.read_table(events), bundle.spec, bundle.maps, latest_only=True)
            for e0 in range(0, len(slots), batch_size):
                rows = slots.rows(e0, min(e0 + batch_size, len(slots)))
                position = np.minimum(np.searchsorted(old_users, rows.user_id), max(len(old_users) - 1, 0))
                found = (old_users[position] == rows.user_id) if len(old_users) else np.zeros(len(rows), bool)
                seen_old[position[found]] = True
                keep = found.copy()
                keep[found] = fresh_version[position[found]] & (old_fingerprints[position[found]]
                                                                 == fingerprints(rows.take(np.flatnonzero(found))))
                if keep.any():
                    writer.write_table(old.take(position[keep]))
                if (~keep).any():
                    writer.write_table(embed_rows_table(bundle, rows.take(np.flatnonzero(~keep)), batch_size,
                                                        computed_at))
                counts["users"] += len(rows)
                counts["recomputed"] += int((~keep).sum())
                counts["kept"] += int(keep.sum())
        untouched = np.flatnonzero(~seen_old)
        if len(untouched):
            writer.write_table(old.take(untouched))
            counts["users"] += len(untouched)
            counts["kept"] += len(untouched)
    return counts
