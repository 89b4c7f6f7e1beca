"""`u-mask data featurize`: contract events -> per-user training examples (schema.EXAMPLES).

Two phases, so that no process holds the event set in memory:
1. partition: each input share (an events file, or a run of its row groups) is split by a
   stable hash of user_id into data.num_shards buckets, written grouped by bucket with an
   index of each bucket's byte range (trainer/data/shuffle.py), so no file has two writers;
2. featurize: each bucket becomes examples independently, by `featurize_bucket`, a pure
   function of (the bucket's events, feature spec and maps, row group size) -> output files,
   their checksums and the bucket's partial statistics (umask/statistics.py), merged in shard
   order into the spec's `statistics`.
`featurize` (the command) runs both phases as Ray tasks (trainer/data/featurize_ray.py);
`featurize_events` runs them in this process over batches already in hand (tests, and data
to complete).

Everything that decides what an example means comes from the feature spec (umask/spec.py),
built once per run by `build_feature_spec` from data.* and the side tables (the app-to-
category map, the regions: precomputed or fitted here) and written to `<features>/spec/`.

What an example holds and how it is computed is umask/slots.py (`Slots`), the one
implementation the bundle loader shares; this module runs it over a whole dataset. Regions
come from the spec's map, which trainer.data.regions builds here from locations.parquet.

Output, one split per folder so the loader can choose splits by path:
`<features>/split=<split>/shard=<00000>/part-00000.parquet` (row groups of
data.row_group_size examples), `<features>/spec/` and `<features>/manifest.json`, which lists
every file with its rows and sha256, the examples' schema and the config hash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.config import DataConfig, RunConfig, save_config
from umask.contract import NORMALIZED_EVENTS
from trainer.data.regions import build_region_table
from trainer.data.schema import EXAMPLES
from trainer.data.shuffle import partition_into_runs, read_bucket
from umask.spec import SPEC_DIR
from umask.errors import UserError
from umask.slots import PARTITION_BUFFER_ROWS, ExampleRows, Slots
from umask.spec import SPLITS, FeatureMaps, FeatureSpec, file_sha256, save_spec, save_spec_json
from umask.statistics import merge as merge_statistics, new_split_statistics
STAGING = "_staging"
RUN_FILE = "run.json"  # in STAGING: the key (config hash and inputs) of the run it belongs to
MANIFEST = "manifest.json"
# what a previous featurize run leaves in its output folder, removed before a new run
OUTPUTS = (STAGING, SPEC_DIR, "quarantine", MANIFEST, MANIFEST + ".tmp", "config.yaml", "summary.json")

# dictionaries and statistics of the long list columns cost a third of the write time
# and buy nothing: their values are not looked up or filtered on
EXAMPLE_WRITE_OPTIONS = dict(compression="zstd", use_dictionary=["split"],
                             write_statistics=["user_id", "split", "window_start"])

# the data.* keys whose values decide the examples featurize writes
HASHED_SETTINGS = ("source", "invalid_rows", "slot_seconds", "slots", "num_categories", "num_regions",
                   "category_value", "val_fraction", "test_fraction", "cold_fraction", "split_salt",
                   "num_shards", "row_group_size", "plausible_start", "plausible_end")


def build_feature_spec(apps: pa.Table | None, locations: pa.Table | None,
                       cfg: DataConfig) -> tuple[FeatureSpec, FeatureMaps]:
    """The spec of a featurize run: data.* settings, plus the app-to-category map from
    apps.parquet and the regions of locations.parquet (precomputed or fitted here, once)."""
    app_ids, categories = app_map(apps, cfg.num_categories)
    regions = build_region_table(locations, cfg.num_regions)
    spec = dataclasses.replace(
        cfg.feature_spec(), region_source=regions.source,
        region_centroids=tuple(tuple(float(v) for v in c) for c in regions.centroids))
    return spec, FeatureMaps(app_ids, categories, regions.loc_ids, regions.regions)


def app_map(apps: pa.Table | None, num_categories: int) -> tuple[np.ndarray, np.ndarray]:
    """(app_ids [A] int64 sorted, categories [A] int32) of apps.parquet as read_apps returns
    it; a UserError naming the row of a category outside [0, num_categories)."""
    if apps is None:
        return np.empty(0, np.int64), np.empty(0, np.int32)
    app_ids = apps.column("app_id").to_numpy().astype(np.int64)
    categories = apps.column("category_id").to_numpy().astype(np.int32)
    bad = np.flatnonzero((categories < 0) | (categories >= num_categories))
    if len(bad):
        raise UserError(f"apps.parquet: row {bad[0]}: category_id {categories[bad[0]]} is "
                        f"outside [0, {num_categories}) (data.num_categories)")
    order = np.argsort(app_ids, kind="stable")
    return app_ids[order], categories[order]


# --- phase 2: one bucket -> examples ---------------------------------------------------

def featurize_bucket(events: pa.Table, shard: int, spec: FeatureSpec, maps: FeatureMaps,
                     row_group_size: int, out: str | Path,
                     on_written: Callable[[], None] | None = None) -> dict:
    """One bucket's events (NORMALIZED_EVENTS, whole: memory ~ the bucket's events) ->
    split=*/shard=<shard>/part-00000.parquet; returns its report: counts per split, the row
    groups, each file's rows and sha256, and the partial statistics.

    Each file is written under a temporary name and renamed when complete, so a task killed
    mid-write leaves no file that looks finished. on_written() after the first file (faults).
    """
    slots = Slots(events, spec, maps)
    T, F = spec.slots, spec.layout.num_channels
    report = {"shard": shard, "events": slots.events_read, "duplicates_dropped": slots.duplicates,
              "users": {}, "examples": {}, "row_groups": {}, "files": {}, "statistics": {}}
    for split_index in np.flatnonzero(np.bincount(slots.split, minlength=len(SPLITS))).tolist():
        name = SPLITS[split_index]
        lo, hi = np.searchsorted(slots.split, [split_index, split_index + 1])
        relative = f"split={name}/shard={shard:05d}/part-00000.parquet"
        path = Path(out) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        sizes, statistics = [], new_split_statistics(spec)
        with pq.ParquetWriter(partial, EXAMPLES, **EXAMPLE_WRITE_OPTIONS) as writer:
            for e0 in range(lo, hi, row_group_size):
                e1 = min(e0 + row_group_size, hi)
                rows = slots.rows(e0, e1)
                writer.write_table(examples_table(rows, name, T, F))
                statistics.add(rows, spec.sparsity_edges)
                sizes.append(int(e1 - e0))
        os.replace(partial, path)
        if on_written is not None:
            on_written()
        report["examples"][name] = int(hi - lo)
        report["users"][name] = int(np.count_nonzero(np.diff(slots.user_id[lo:hi])) + 1)
        report["row_groups"][name] = sizes
        report["files"][relative] = {"rows": int(hi - lo), "bytes": path.stat().st_size,
                                     "sha256": file_sha256(path)}
        report["statistics"][name] = statistics.to_partial()
    return report


def examples_table(rows: ExampleRows, split: str, T: int, F: int) -> pa.Table:
    """Examples of one split as EXAMPLES rows: per-slot values as fixed-length lists."""
    n = len(rows)
    return pa.Table.from_arrays([
        pa.array(rows.user_id), pa.array([split] * n, pa.string()), pa.array(rows.window_start),
        _fixed_lists(rows.time_of_week, T), _fixed_lists(rows.observed, T), _fixed_lists(rows.dense, T * F),
        _bag_lists(rows.app_values, rows.app_offsets), _fixed_lists(rows.app_lengths, T),
        _bag_lists(rows.loc_values, rows.loc_offsets), _fixed_lists(rows.loc_lengths, T),
    ], schema=EXAMPLES)


def _fixed_lists(values: np.ndarray, per_row: int) -> pa.ListArray:
    """[n, ...] numpy -> n lists of `per_row` flattened values."""
    offsets = np.arange(len(values) + 1, dtype=np.int32) * per_row
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))


def _bag_lists(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    """Each example's ids (all its slots' bags) as one list; offsets [n+1] into values."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))


# --- both phases, in this process ----------------------------------------------------------

def featurize_events(batches: Iterable[pa.RecordBatch], spec: FeatureSpec, maps: FeatureMaps,
                     cfg: DataConfig, out: str | Path,
                     input_report: Callable[[], dict] | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Events (NORMALIZED_EVENTS batches) -> examples, the spec folder and the manifest in
    `out`, both phases in this process (the command runs them as Ray tasks: featurize_ray.py).
    The output is byte for byte the one the Ray tasks write for the same events.

    The spec (build_feature_spec for new data, a checkpoint's for data to complete) decides
    the examples; cfg gives only how they are made: data.num_shards and data.row_group_size.

    `out` should be new or emptied by `prepare_output` (the CLI does so before the reader
    writes its quarantine files there).
    `input_report`, called once the batches are consumed, gives the reader's counts and
    quarantine files for the manifest. on_progress(buckets done, buckets) after each bucket of
    phase 2. Returns the manifest.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_limits(cfg)
    # the Ray tasks' shuffle (trainer/data/shuffle.py), in this process
    runs, _, rows = partition_into_runs(batches, out / STAGING / "runs" / "unit-000000", cfg.num_shards,
                                        PARTITION_BUFFER_ROWS, NORMALIZED_EVENTS)
    reports = []
    for bucket in range(cfg.num_shards):
        reports.append(featurize_bucket(read_bucket(runs, bucket, NORMALIZED_EVENTS), bucket, spec, maps,
                                        cfg.row_group_size, out))
        if on_progress is not None:
            on_progress(len(reports), cfg.num_shards)
    spec = save_spec(out / SPEC_DIR, spec, maps)
    return finish(out, reports, rows, spec, cfg, input_report() if input_report else None)


def finish(out: Path, reports: list[dict], rows: int, spec: FeatureSpec, cfg: DataConfig,
           quarantine: dict | None, run: dict | None = None) -> dict:
    """The end of a run whose map files are in <out>/spec: the buckets' statistics merged in
    shard order into spec.json, the manifest written (atomically), the staging folder removed.
    run: what the Ray run adds to the manifest (its tasks' memory, nodes and times)."""
    reports = sorted(reports, key=lambda r: r["shard"])
    statistics = merge_statistics([r.pop("statistics") for r in reports], spec)
    spec = dataclasses.replace(spec, statistics=statistics)
    save_spec_json(out / SPEC_DIR, spec)
    manifest = _manifest(reports, rows, spec, cfg, quarantine)
    if run is not None:
        manifest["run"] = run
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    # staging goes last: until the manifest exists it marks the folder as featurize's own
    shutil.rmtree(out / STAGING)
    return manifest


def prepare_output(out: Path, resume_key: str | None = None) -> bool:
    """Makes `out` ready for a run; True when it continues an unfinished run.

    An unfinished run (a staging folder whose run.json holds resume_key: the same config hash
    and inputs) is continued: its finished tasks are kept. An unfinished run of another key is
    refused (its pieces must not mix with this config's). Otherwise a previous featurize output
    is emptied; any other non-empty folder is refused.
    """
    if not out.exists():
        out.mkdir(parents=True)
        return False
    entries = set(out.iterdir())
    ours = {p for p in entries if p.name in OUTPUTS or p.name.startswith("split=")}
    earlier_run = (out / MANIFEST).exists() or (out / STAGING).exists()
    if entries and (not earlier_run or entries - ours):
        raise UserError(f"{out}: data.features points at a folder that holds other files than a "
                        "featurize output; refusing to overwrite it (choose an empty or new folder)")
    run_file = out / STAGING / RUN_FILE
    if resume_key is not None and run_file.exists():
        try:
            earlier = json.loads(run_file.read_text()).get("resume_key")
        except (OSError, json.JSONDecodeError):
            earlier = None  # written atomically, so only a foreign edit gets here: start again
        if earlier == resume_key:
            return True
        if earlier is not None:
            raise UserError(f"{out}: holds an unfinished featurize run of other inputs or data.* settings "
                            f"(run key {earlier[:12]}, this run's {resume_key[:12]}); its pieces must not "
                            "mix with this run's. Rerun with the settings it had to finish it, or delete the "
                            "folder (or choose another data.features) to start again")
    for path in ours:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return False


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
    """What this run wrote: counts per split and shard, each file's rows and sha256, the
    examples' schema, the input's fate, and the spec's digest (the layout of the examples is
    the spec's, in spec/spec.json)."""
    total = {key: {s: sum(r[key].get(s, 0) for r in reports) for s in SPLITS}
             for key in ("examples", "users")}
    duplicates = sum(r["duplicates_dropped"] for r in reports)
    return {
        "spec_digest": spec.digest, "spec": SPEC_DIR,
        "examples": total["examples"], "users": total["users"],
        "events": {"read": rows, "duplicates_dropped": duplicates, "featurized": rows - duplicates},
        "schema": EXAMPLES.to_string(show_schema_metadata=False),
        "shards": reports,
        "quarantine": quarantine, "config_hash": config_hash(cfg),
    }


# --- a whole run: what `u-mask data featurize` does ------------------------------------

def featurize(cfg: RunConfig, on_progress: Callable[[str, int, int], None] | None = None,
              verbose: bool = False) -> dict:
    """What `u-mask data featurize` does: data.source -> examples, manifest and the resolved
    config in data.features, invalid rows handled by data.invalid_rows, both phases as Ray
    tasks on the cluster of ray.address (an embedded Ray by default; trainer/data/featurize_ray.py).
    An interrupted run of the same inputs and settings continues where it stopped.
    on_progress(phase, events done, events) as tasks finish. Returns the manifest."""
    from trainer.data.featurize_ray import run

    manifest = run(cfg, on_progress, verbose)
    save_config(cfg, Path(cfg.data.features) / "config.yaml")
    return manifest
