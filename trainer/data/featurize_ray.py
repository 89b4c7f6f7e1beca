"""featurize's two phases as Ray tasks, on the cluster of ray.address or an embedded Ray.

The driver plans and waits; the tasks read, write and compute:
- phase 1, one task per input share (an events file, or whole row groups of it up to
  data.read_task_rows rows), reads it with the contract reader and writes its events grouped
  by bucket into a run: one data file and an index of each bucket's byte range
  (`_staging/runs/unit-<u>-<k>`, trainer/data/shuffle.py), then `_staging/units/unit-<u>.json`
  (its report). Phase 1 needs no side table, so its tasks are submitted first;
- beside them, locations.parquet is range-partitioned by loc_id and joined to the (loc_id,
  bucket) pairs phase 1 saw (trainer/data/locations_join.py), and the spec task reads
  apps.parquet and writes the feature spec to `_staging/spec/`; the app map goes on to phase
  2 through Ray's object store, one shared-memory copy per node, never through the driver;
- phase 2, one task per bucket, reads its segment of every run and of the join's runs,
  featurizes the bucket (featurize.featurize_bucket), then writes `_staging/shards/shard-<b>.json`.
Every file is renamed into place once complete, and a task's report is written last, so a
report marks finished work. A rerun with the same inputs and settings (run.json's key) skips
the shares and buckets that have reports: an interrupted run (driver or task killed) resumes.
A task whose worker dies is retried (data.task_retries); outputs depend only on inputs and
settings, so a retry or a resumed run writes the same bytes on any number of nodes. An input
that fits one read task runs the same tasks in the driver's process when no Ray is up and no
ray.address is set (a Ray start would cost more than such a job).

Memory: each task reserves data.task_memory_mb (Ray's `memory` resource, so a node runs only
as many as fit), read buffers are sized from it, and a bucket whose events would not fit is
refused before phase 2 naming data.num_shards. Each task reports its own peak RSS (the
kernel's VmHWM, reset at the task's start) and the manifest's `run` lists them with the
driver's, which holds no events, only counts and file names: per read task its runs and its
rows, and the rows per bucket summed as the reports arrive.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from trainer.config import RunConfig
from trainer.data import locations_join, shuffle
from trainer.data.featurize import (RUN_FILE, STAGING, app_map, check_limits, config_hash, featurize_bucket, finish,
                                    prepare_output)
from trainer.data.tasks import Unit, atomic_path, peak_rss_bytes, plan_units, read_json, task_facts, task_start, write_json
from umask.contract import NORMALIZED_EVENTS, ContractDataset, EventReader, ReadReport, open_dataset, read_apps, table_files
from umask.errors import UserError
from umask.spec import APP_CATEGORIES, LOC_REGIONS, SPEC_DIR, FeatureMaps, load_spec, save_spec_json, write_maps

# peak bytes of phase 2 per event of a bucket (Slots, the examples of a row group, the read
# pieces), measured with bench/featurize_bench.py's data; the refusal of too large buckets uses it
PHASE2_BYTES_PER_EVENT = 400
# phase 1 holds a read batch and its partition buffer: bytes per buffered row, Arrow included
PHASE1_BYTES_PER_ROW = 120
RUNS = "runs"  # in _staging: phase 1's runs (trainer/data/shuffle.py)


def resume_key(cfg: RunConfig, dataset: ContractDataset) -> str:
    """sha256 of the config hash and every input file's path, size and mtime: what a run must
    share with an unfinished one to continue it."""
    files = list(dataset.event_files)
    for table in (dataset.apps, dataset.locations):
        if table is not None:
            files += sorted(table.rglob("*")) if table.is_dir() else [table]
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    return hashlib.sha256(json.dumps([config_hash(cfg.data), stats]).encode()).hexdigest()


# --- the tasks ---------------------------------------------------------------------------

def spec_task(source: str, cfg_data, folder: str, plan: dict | None, ranges: int):
    """Reads apps.parquet and writes the spec folder: the app map, the location map streamed
    range by range (locations_join.range_chunks), spec.json with plan's regions; returns (spec,
    the app map as FeatureMaps), the map staying in the object store for phase 2. When `folder`
    already holds a spec (a resumed run), it is read back instead."""
    folder = Path(folder)
    if (folder / "spec.json").exists():
        spec = load_spec(folder)
        apps = pq.read_table(folder / APP_CATEGORIES)
        return spec, _app_maps(apps.column("app_id").to_numpy(), apps.column("category").to_numpy())
    dataset = open_dataset(source)
    app_ids, categories = app_map(read_apps(dataset, cfg_data.num_categories), cfg_data.num_categories)
    spec = cfg_data.feature_spec()
    if plan is not None:
        spec = dataclasses.replace(spec, region_source=plan["source"],
                                   region_centroids=tuple(tuple(float(v) for v in c) for c in plan["centroids"]))
    tmp = atomic_path(folder)
    files = write_maps(tmp, app_ids, categories, locations_join.range_chunks(folder.parent, ranges))
    spec = dataclasses.replace(spec, files=files)
    save_spec_json(tmp, spec)
    os.replace(tmp, folder)
    return spec, _app_maps(app_ids, categories)


def _app_maps(app_ids, categories) -> FeatureMaps:
    """The maps phase 2 gets from the object store: the apps; each bucket adds its own locations."""
    return dataclasses.replace(FeatureMaps.empty(), app_ids=app_ids, categories=categories)


def partition_task(unit: Unit, root: str, cfg_data, staging: str, buffer_rows: int, with_locations: bool) -> dict:
    """Phase 1 for one input share: its valid events grouped by bucket into runs
    (`runs/unit-<u>-<k>`, trainer/data/shuffle.py), the distinct (loc_id, bucket) pairs it
    saw (`loc-keys/unit-<u>.parquet`) when there is a locations table, then its report
    `units/unit-<u>.json`; returns the report."""
    started = task_start()
    staging = Path(staging)
    quarantine = staging.parent / "quarantine" if cfg_data.invalid_rows == "quarantine" else None
    reader = EventReader(ContractDataset(Path(root), [Path(unit.path)]), cfg_data.invalid_rows, quarantine,
                         batch_rows=min(1 << 20, buffer_rows), plausible=cfg_data.plausible_range())
    batches = reader.file_batches(Path(unit.path), unit.row_groups)
    keys = locations_join.LocationKeys() if with_locations else None
    runs, bucket_rows, rows = shuffle.partition_into_runs(batches, staging / RUNS / f"unit-{unit.index:06d}",
                                                          cfg_data.num_shards, buffer_rows, NORMALIZED_EVENTS,
                                                          keys.add if keys else None)
    pairs = keys.write(staging / locations_join.KEYS / f"unit-{unit.index:06d}.parquet") if keys else 0
    report = {"unit": unit.index, "rows": rows, "runs": runs, "bucket_rows": bucket_rows.tolist(),
              "location_pairs": pairs, "read": reader.report.as_dict(), **task_facts(started)}
    write_json(staging / "units" / f"unit-{unit.index:06d}.json", report)
    return report


def featurize_task(bucket: int, runs: list[str], spec, apps: FeatureMaps, location_runs: list[str],
                   row_group_size: int, out: str) -> dict:
    """Phase 2 for one bucket: its segment of every run, its listed locations' regions (its
    segment of the join's runs), featurize.featurize_bucket, then `shards/shard-<b>.json`."""
    from trainer.training.faults import fault_point

    started = task_start()
    staging = Path(out) / STAGING
    places = shuffle.read_bucket(location_runs, bucket, locations_join.REGION_MAP)
    maps = dataclasses.replace(apps, loc_ids=places.column("loc_id").to_numpy(),
                               regions=places.column("region").to_numpy())
    report = featurize_bucket(shuffle.read_bucket(runs, bucket, NORMALIZED_EVENTS), bucket, spec, maps,
                              row_group_size, out, on_written=lambda: fault_point("bucket", bucket, 0, staging))
    report["task"] = task_facts(started)
    write_json(staging / "shards" / f"shard-{bucket:05d}.json", report)
    return report


# --- the driver ----------------------------------------------------------------------------

def run(cfg: RunConfig, on_progress: Callable[[str, int, int], None] | None = None,
        verbose: bool = False) -> dict:
    """Both phases on Ray into data.features; returns the manifest. on_progress(phase, events
    done, events) as tasks finish, phase "read" (phase 1) or "featurize" (phase 2).

    An input that fits one read task (data.read_task_rows) with no Ray running and no
    ray.address runs the same tasks in this process: Ray's start-up (10-20 s) would cost more
    than the work, and the output is the same bytes."""
    import ray

    from trainer.training.cluster import check_cluster, cluster_address, join_cluster
    from trainer.training.launch import start_embedded_ray, stop_embedded_ray

    check_limits(cfg.data)
    # the cluster answers and takes our token, and data.features is absolute (featurize writes
    # nothing under ray.storage_path, so that key is not asked to be)
    check_cluster(dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, storage_path="/")))
    # tasks run in other working directories, on other nodes: absolute paths only
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, source=str(Path(cfg.data.source).resolve()), features=str(Path(cfg.data.features).resolve())))
    data, out = cfg.data, Path(cfg.data.features)
    dataset = open_dataset(data.source)
    units = plan_units(dataset.event_files, data.read_task_rows)
    _check_task_memory(data, units)
    key = resume_key(cfg, dataset)
    staging = out / STAGING
    if not prepare_output(out, key):
        staging.mkdir(parents=True, exist_ok=True)
        write_json(staging / RUN_FILE, {"resume_key": key, "config_hash": config_hash(data)})
    joined = cluster_address(cfg.ray.address)
    if not ray.is_initialized() and joined is None and sum(u.rows for u in units) <= data.read_task_rows:
        return _run_tasks(cfg, dataset, units, out, on_progress, _InProcess())
    started_ray = not ray.is_initialized()
    if started_ray:
        if joined:
            join_cluster(*joined, log_to_driver=verbose)
        else:
            start_embedded_ray(data.featurize_workers, verbose)
    try:
        return _run_tasks(cfg, dataset, units, out, on_progress, _RayTasks(data))
    finally:
        if started_ray and not joined:
            stop_embedded_ray()
        elif started_ray:
            ray.shutdown()


class _RayTasks:
    """Runs featurize's tasks as Ray tasks: data.task_memory_mb reserved, data.task_retries
    retries of a dead worker, dealt out over the nodes.

    Placement: Ray's SPREAD is best effort, and a core worker reuses a leased worker for the
    next task of the same kind, so short tasks can all land on the first node that answers.
    The tasks of a phase are therefore dealt round-robin over the alive nodes, each node
    weighted by how many tasks it can run at once (its CPUs, and its memory over
    data.task_memory_mb), with a soft node affinity: a node that dies or cannot take the task
    any more hands it to another. A cluster with no node that can take a task yet (an
    autoscaling one at zero workers) gets SPREAD, so that the demand scales it up."""

    def __init__(self, data):
        from trainer.training.faults import ENV as FAULTS

        self.task_memory = data.task_memory_mb * 2**20
        self.options = dict(num_cpus=1, memory=self.task_memory, max_retries=data.task_retries)
        if os.environ.get(FAULTS):  # fire drills and the fault tests (trainer/training/faults.py)
            self.options["runtime_env"] = {"env_vars": {FAULTS: os.environ[FAULTS]}}

    def spec(self, *args):
        """(spec, a handle on the app map that the featurize tasks take): the map stays in the object store."""
        import ray

        spec_ref, apps_ref = ray.remote(spec_task).options(num_returns=2, scheduling_strategy="SPREAD",
                                                           **self.options).remote(*args)
        return _get(spec_ref, "writing the feature spec (apps.parquet and the location ranges)"), apps_ref

    def put(self, value):
        """A handle on value in the object store, to pass to many tasks without copying it to each."""
        import ray

        return ray.put(value)

    def call(self, function, args: tuple, describe: str):
        """function(*args) as one task; its result."""
        import ray

        return _get(ray.remote(function).options(scheduling_strategy="SPREAD", **self.options).remote(*args),
                    describe)

    def map(self, function, jobs: dict, describe: Callable) -> Iterator:
        """(key, result) of function(*jobs[key]) for every key, as they finish. As many tasks
        as the cluster runs at once are submitted now and one more as each finishes, so that a
        task submitted meanwhile by another map (the side tables' passes, beside phase 1)
        waits for one task to end, not for a whole phase."""
        import ray

        remote = ray.remote(function)
        placements, slots = self.placements()
        waiting = list(jobs.items())

        def submit(count: int) -> dict:
            batch, waiting[:] = waiting[:count], waiting[count:]
            return {remote.options(scheduling_strategy=next(placements), **self.options).remote(*args): key
                    for key, args in batch}

        first = submit(len(waiting) if slots is None else slots)
        return _as_completed(first, describe, lambda: submit(1))

    def placements(self) -> tuple[Iterator, int | None]:
        """(scheduling strategies to give the tasks in turn, how many tasks the cluster runs at
        once): soft affinities to the alive nodes, each node as often as the tasks it can run at
        once; SPREAD and no limit when no node can run one (an autoscaler then sees the demand)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        capacity = {}
        for node in ray.nodes():
            resources = node.get("Resources", {})
            at_once = min(int(resources.get("CPU", 0)), int(resources.get("memory", 0) // self.task_memory))
            if node.get("Alive") and at_once >= 1:
                capacity[node["NodeID"]] = at_once
        if not capacity:
            return itertools.repeat("SPREAD"), None
        # interleaved (a, b, a, b, a ...) rather than one node's share first, so that the first
        # tasks start on every node
        turns = sorted((turn, node) for node, at_once in capacity.items() for turn in range(at_once))
        return itertools.cycle([NodeAffinitySchedulingStrategy(node, soft=True) for _, node in turns]), len(turns)


class _InProcess:
    """The same tasks, one after another in this process (map's run as they are consumed)."""

    def spec(self, *args):
        return spec_task(*args)

    def put(self, value):
        return value

    def call(self, function, args: tuple, describe: str):
        return function(*args)

    def map(self, function, jobs: dict, describe: Callable) -> Iterator:
        return ((key, function(*args)) for key, args in jobs.items())


def _run_tasks(cfg: RunConfig, dataset: ContractDataset, units: list[Unit], out: Path,
               on_progress: Callable[[str, int, int], None] | None, runner) -> dict:
    data, staging = cfg.data, out / STAGING
    with_locations = dataset.locations is not None

    # phase 1 starts first: it needs neither the side tables nor the spec
    buffer_rows = max(1 << 16, data.task_memory_mb * 2**20 // 2 // PHASE1_BYTES_PER_ROW)
    done_units = {u.index: read_json(staging / "units" / f"unit-{u.index:06d}.json") for u in units}
    todo = {u: (u, str(dataset.root), data, str(staging), buffer_rows, with_locations)
            for u in units if done_units[u.index] is None}
    reading = runner.map(partition_task, todo, lambda u: f"reading {u.where()}")

    # meanwhile the side tables: locations range-partitioned (trainer/data/locations_join.py),
    # then the spec; on Ray from a thread of their own, so that phase 1 keeps being fed (in
    # this process they simply run first: the phase-1 tasks run as `reading` is consumed)
    def side_tables() -> tuple:
        plan, location_tasks = _locations(runner, dataset, data, staging) if with_locations else (None, {})
        ranges = len(plan["boundaries"]) + 1 if plan else 0
        return plan, ranges, location_tasks, *runner.spec(str(data.source), data, str(staging / SPEC_DIR), plan, ranges)

    # the driver keeps each share's small facts and the bucket sizes, not its per-bucket lists
    bucket_rows = np.zeros(data.num_shards, np.int64)

    def kept(report: dict) -> dict:
        bucket_rows[:] += report.pop("bucket_rows")
        return report

    done_units = {index: kept(report) for index, report in done_units.items() if report is not None}
    total_rows = sum(u.rows for u in units)
    done_rows = sum(u.rows for u in units if u.index in done_units)
    with ThreadPoolExecutor(1, thread_name_prefix="featurize-side-tables") as pool:
        side = pool.submit(side_tables) if isinstance(runner, _RayTasks) else None
        plan, ranges, location_tasks, spec, apps = side_tables() if side is None else (None,) * 5
        for unit, report in reading:
            done_units[unit.index] = kept(report)
            done_rows += unit.rows
            if on_progress:
                on_progress("read", done_rows, total_rows)
            if side is not None and side.done() and side.exception() is not None:
                raise side.exception()  # a bad side table stops the run now, not after phase 1
        if side is not None:
            plan, ranges, location_tasks, spec, apps = side.result()
    unit_reports = [done_units[u.index] for u in units]

    # the join: each bucket's listed loc_ids with their regions, one run per range
    location_runs = []
    if with_locations:
        joined = {p: read_json(staging / locations_join.REGIONS / f"range-{p:05d}.json") for p in range(ranges)}
        key_files = [str(staging / locations_join.KEYS / f"unit-{u.index:06d}.parquet") for u in units]
        todo = {p: (p, plan["boundaries"], key_files, data.num_shards, str(staging))
                for p in range(ranges) if joined[p] is None}
        joined.update(runner.map(locations_join.join_task, todo, lambda p: f"joining location range {p}"))
        location_runs = [joined[p]["run"] for p in range(ranges)]
        location_tasks["join"] = [joined[p] for p in range(ranges)]

    # phase 2
    _check_bucket_memory(data, bucket_rows)
    runs = runner.put([run for report in unit_reports for run in report["runs"]])
    done_shards = {b: read_json(staging / "shards" / f"shard-{b:05d}.json") for b in range(data.num_shards)}
    todo = {b: (b, runs, spec, apps, location_runs, data.row_group_size, str(out))
            for b in range(data.num_shards) if done_shards[b] is None}
    total_events = int(bucket_rows.sum())
    done_events = int(sum(bucket_rows[b] for b in range(data.num_shards) if done_shards[b] is not None))
    for bucket, report in runner.map(featurize_task, todo, lambda b: f"featurizing bucket {b} ({bucket_rows[b]} events "
                                                        f"from the runs in {staging / RUNS})"):
        done_shards[bucket] = report
        done_events += int(bucket_rows[bucket])
        if on_progress:
            on_progress("featurize", done_events, total_events)

    reports = [done_shards[b] for b in range(data.num_shards)]
    facts = ("peak_rss_mb", "node", "pid", "seconds")
    tasks = {"read": [{"unit": r["unit"], "rows": r["rows"], **{k: r[k] for k in facts}} for r in unit_reports],
             **{phase: [{k: r[k] for k in facts} for r in done] for phase, done in location_tasks.items()},
             "featurize": [{"shard": r["shard"], "events": r["events"], **r.pop("task")} for r in reports]}
    out_spec = out / SPEC_DIR
    out_spec.mkdir(exist_ok=True)
    for name in (APP_CATEGORIES, LOC_REGIONS):
        shutil.copyfile(staging / SPEC_DIR / name, out_spec / name)
    run = {"on_ray": isinstance(runner, _RayTasks), "task_memory_mb": data.task_memory_mb,
           "driver_peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
           "nodes": len({t["node"] for phase in tasks.values() for t in phase}), "location_ranges": ranges,
           "tasks": tasks}
    return finish(out, reports, sum(r["rows"] for r in unit_reports), spec, data,
                  _merged_read_reports([r["read"] for r in unit_reports]), run)


def _locations(runner, dataset: ContractDataset, data, staging: Path) -> tuple[dict, dict]:
    """Passes 1-4 of locations_join (sample, plan, place, sort) unless a resumed run's spec
    exists (then they finished); returns (the plan, the tasks' reports by pass)."""
    folder = staging / locations_join.LOCATIONS
    plan = read_json(folder / "plan.json")
    if plan is not None and (staging / SPEC_DIR / "spec.json").exists():
        return plan, {}
    shares = plan_units(table_files(dataset.locations), data.read_task_rows)
    where = lambda s: f"reading locations {s.where()}"
    sampled = dict(runner.map(locations_join.sample_task,
                              {s: (s, data.num_regions, str(staging)) for s in shares}, where))
    reports = [sampled[s] for s in shares]
    plan = runner.call(locations_join.plan_task, (reports, data.num_regions, data.read_task_rows, str(staging)),
                       "planning the location ranges and regions")
    placed = dict(runner.map(locations_join.place_task, {s: (s, plan, data.num_regions, str(staging)) for s in shares},
                             where))
    ranges = len(plan["boundaries"]) + 1
    pieces = {p: [str(folder / f"range={p:05d}" / f"share-{s.index:06d}.parquet")
                  for s in shares if str(p) in placed[s]["ranges"]] for p in range(ranges)}
    sorted_ranges = dict(runner.map(locations_join.sort_task,
                                    {p: (p, pieces[p], shares, str(staging)) for p in range(ranges)},
                                    lambda p: f"sorting location range {p}"))
    return plan, {"locations_sample": reports, "locations_plan": [plan.pop("task")],
                  "locations_place": [placed[s] for s in shares],
                  "locations_sort": [sorted_ranges[p] for p in range(ranges)]}


def _as_completed(refs: dict, describe: Callable, more: Callable[[], dict] = dict):
    """(item, result) of each task as it finishes, topping up with more() (new refs) after each;
    a failure is one UserError naming the task's input (a UserError from the task keeps its own
    message, which names file and row)."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    pending = dict(refs)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        item = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except RayTaskError as err:
            cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
            if isinstance(cause, UserError):
                raise UserError(f"featurize {describe(item)}: {cause}") from None
            raise UserError(f"featurize failed {describe(item)}: {type(cause).__name__}: "
                            f"{' '.join(str(cause).split())[:500]}") from None
        except RayError as err:
            raise UserError(f"featurize failed {describe(item)} after data.task_retries retries: "
                            f"{' '.join(str(err).split())[:500]}") from None
        pending.update(more())
        yield item, result


def _get(ref, what: str):
    import ray
    from ray.exceptions import RayError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise UserError(f"featurize failed {what}: {' '.join(str(err).split())[:500]}") from None
    except RayError as err:
        raise UserError(f"featurize failed {what}: {' '.join(str(err).split())[:500]}") from None


def _merged_read_reports(reports: list[dict]) -> dict:
    """The reader's counts over all shares (ReadReport.as_dict form), quarantine files sorted."""
    merged = ReadReport().as_dict()
    for report in reports:
        for key in ("files", "empty_files_skipped", "rows_read", "rows_valid", "rows_quarantined"):
            merged[key] += report[key]
        for reason, n in report["by_reason"].items():
            merged["by_reason"][reason] = merged["by_reason"].get(reason, 0) + n
        merged["quarantine_files"] += report["quarantine_files"]
    merged["by_reason"] = dict(sorted(merged["by_reason"].items()))
    merged["quarantine_files"] = sorted(merged["quarantine_files"])
    return merged


def _check_task_memory(data, units: list[Unit]) -> None:
    """Refuses, before any task runs, settings whose average bucket cannot fit a task."""
    expected = sum(u.rows for u in units) / data.num_shards * PHASE2_BYTES_PER_EVENT
    if expected > data.task_memory_mb * 2**20:
        raise UserError(_bucket_message(data, expected))


def _check_bucket_memory(data, bucket_rows) -> None:
    largest = int(max(bucket_rows, default=0)) * PHASE2_BYTES_PER_EVENT
    if largest > data.task_memory_mb * 2**20:
        raise UserError(_bucket_message(data, largest))


def _bucket_message(data, need: float) -> str:
    shards = int(data.num_shards * need / (data.task_memory_mb * 2**20)) + 1
    return (f"a featurize bucket would need about {need / 2**20:.0f} MB, more than data.task_memory_mb="
            f"{data.task_memory_mb}: raise data.num_shards to {shards} or more (smaller buckets), "
            "or data.task_memory_mb")
