"""`u-mask complete`: a checkpoint completes the latest window of given users' events for a task.

The events (a contract dataset, events directory or file) go through the same contract reader
and featurize core as training data, into a temporary folder, under the checkpoint's feature
spec: the same slots and windows, and the app categories and regions of the spec's maps, so a
user's slots are built exactly as the model saw them in training. Nothing is refitted and the
training data need not be on disk; side tables next to the events are not read. Apps the
spec does not list fall in the unknown category, unlisted places in the spec's hashed region.

Per user, the latest window is completed for one task with a fixed cut:
  short, long  the target is the task's longest window (target_max slots) right after the
               user's last observed slot, moved back to end at the window's end if it would
               not fit (then the hidden slots can be compared with what happened);
  cold         everything after the first model.mask.cold_history slots;
--cut SLOT sets the cut for every user instead. Evidence is the model's adaptive mask over the
observed slots before the cut (the same sampler as in training, with this cut and target).

Prints a compact table of the target slots per user and writes completed.parquet: one row per
(user, slot) of the window with the completed dense channels (schema.DenseLayout).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from trainer.data.batch import Batch
from umask.slots import ExampleRows
from umask.spec import SPLITS, DenseLayout, FeatureSpec
from umask.errors import UserError
from trainer.inference.loading import InferenceModel, load_inference_model
from umask.config import MaskConfig

COMPLETED = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("window_start", pa.int64(), nullable=False),  # epoch seconds of slot 0
    pa.field("slot", pa.int32(), nullable=False),
    pa.field("time_of_week", pa.int16(), nullable=False),
    pa.field("observed", pa.bool_(), nullable=False),  # the slot holds a record in the input
    pa.field("evidence", pa.bool_(), nullable=False),  # shown to the model
    pa.field("target", pa.bool_(), nullable=False),  # in the task's target window
    pa.field("dense", pa.list_(pa.float32()), nullable=False),  # [F] completed channels
])
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def latest_windows(events: Path, inference: InferenceModel, workdir: Path) -> ExampleRows:
    """Featurizes `events` into `workdir` and returns each user's latest window, by user id."""
    from umask.contract import EventReader, open_dataset
    from trainer.data.featurize import featurize_events
    from trainer.data.loader import discover, read_row_group

    dataset = open_dataset(events)
    data = replace(inference.cfg.data, num_shards=1, featurize_workers=1)  # a few users: one bucket
    reader = EventReader(dataset, "strict", plausible=data.plausible_range())
    featurize_events(reader.batches(), inference.spec, inference.maps, data, workdir)
    splits = tuple(s for s in SPLITS if (workdir / f"split={s}").is_dir())
    if not splits:
        raise UserError(f"{events}: no events, so no user to complete")
    files = discover(workdir, splits)
    channels = inference.layout.num_channels
    rows = ExampleRows.concat([read_row_group(f, g, inference.spec.slots, channels)
                               for f in files for g in range(f.metadata.num_row_groups)])
    # lexsort: last key first; the last row of each user is then its latest window
    order = np.lexsort((rows.window_start, rows.user_id))
    user_sorted = rows.user_id[order]
    last_of_user = np.flatnonzero(np.append(user_sorted[1:] != user_sorted[:-1], True))
    return rows.take(order[last_of_user])


def task_cut(task: str, observed: Tensor, cfg: MaskConfig, cut: int | None) -> tuple[Tensor, Tensor]:
    """Cut point [B] and target window [B,T] of `task` for each row (module docstring)."""
    batch, slots = observed.shape
    t = torch.arange(slots)
    if task == "cold":
        start = torch.full((batch,), min(cfg.cold_history, slots - 1) if cut is None else cut)
        return start, t >= start[:, None]
    length = min(cfg.task(task).target_max, slots - 1)
    if cut is None:
        last = torch.where(observed, t, torch.full_like(t, -1)).max(1).values  # [B]
        start = (last + 1).clamp(min=1, max=slots - length)
    else:
        start = torch.full((batch,), cut)
    return start, (t >= start[:, None]) & (t < start[:, None] + length)


def complete_windows(inference: InferenceModel, rows: ExampleRows, task: str, cut: int | None,
                     steps: int | None, seed: int) -> dict[str, Tensor]:
    """Completed dense [B,T,F] with the evidence and target masks [B,T] used."""
    from umask.config import TASKS
    from umask.masking import mask_for_window

    slots = rows.observed.shape[1]
    if cut is not None and not 1 <= cut < slots:
        raise UserError(f"--cut {cut}: must be a slot in [1, {slots - 1}]")
    batch = Batch.of_rows(rows)
    model = inference.model
    start, target = task_cut(task, batch.observed, model.cfg.mask, cut)
    generator = torch.Generator().manual_seed(seed)
    tasks = torch.full((len(batch),), TASKS.index(task), dtype=torch.long)
    evidence = mask_for_window(batch.dense, batch.observed, batch.time_of_week, tasks, start, target,
                               inference.spec, model.cfg.mask, generator).evidence
    completed = model.complete(batch.dense, evidence, batch.time_of_week, inference.slot_sparse(batch),
                               steps=steps, generator=generator)
    return {"dense": completed, "evidence": evidence, "target": target, "cut": start}


def completed_table(rows: ExampleRows, result: dict[str, Tensor]) -> pa.Table:
    n, slots = rows.observed.shape
    dense = result["dense"].numpy().astype(np.float32)  # [B,T,F]
    return pa.table({
        "user_id": np.repeat(rows.user_id, slots),
        "window_start": np.repeat(rows.window_start, slots),
        "slot": np.tile(np.arange(slots, dtype=np.int32), n),
        "time_of_week": rows.time_of_week.reshape(-1).astype(np.int16),
        "observed": rows.observed.reshape(-1),
        "evidence": result["evidence"].numpy().reshape(-1),
        "target": result["target"].numpy().reshape(-1),
        "dense": pa.FixedSizeListArray.from_arrays(dense.reshape(-1), dense.shape[2]).cast(
            pa.list_(pa.float32())),
    }, schema=COMPLETED)


def readable(rows: ExampleRows, result: dict[str, Tensor], spec: FeatureSpec, task: str) -> str:
    """Per user: a header line, then each target slot's top categories, region, activity, volume."""
    layout = spec.layout
    lines = []
    for b in range(len(rows)):
        observed, evidence = rows.observed[b], result["evidence"][b].numpy()
        start = datetime.fromtimestamp(int(rows.window_start[b]), timezone.utc)
        lines.append(f"user {rows.user_id[b]}  week of {start:%Y-%m-%d %H:%M}Z  task {task}  cut slot "
                     f"{int(result['cut'][b])}  evidence {int(evidence.sum())} of {int(observed.sum())} "
                     "observed slots")
        lines.append("  slot  time       seen  predicted categories (log1p count)  true cat  "
                     "region  activity  volume")
        for t in np.flatnonzero(result["target"][b].numpy()):
            values = result["dense"][b, t]
            categories = values[layout.category]
            top = torch.topk(categories, 3)
            names = "  ".join(f"{_category(int(i), layout):>4} {float(v):4.2f}"
                              for v, i in zip(top.values, top.indices))
            truth = (_category(int(rows.dense[b, t, layout.category].argmax()), layout)
                     if observed[t] else "-")
            day, second = divmod(int(rows.time_of_week[b, t]) * spec.slot_seconds, 86400)
            lines.append(f"  {t:4d}  {WEEKDAYS[day]} {second // 3600:02d}:{second % 3600 // 60:02d}  "
                         f"{'yes' if observed[t] else 'no':>4}  {names:<34}  {truth:>8}  "
                         f"{_region(int(values[layout.region].argmax()), layout):>6}  "
                         f"{float(values[layout.activity]):8.2f}  {float(values[layout.volume]):6.2f}")
    return "\n".join(lines)


def _category(index: int, layout: DenseLayout) -> str:
    return "unk" if index == layout.num_categories else f"c{index}"


def _region(index: int, layout: DenseLayout) -> str:
    return "unk" if index == layout.num_regions else f"r{index}"


@dataclass(frozen=True)
class Completion:
    """What complete_checkpoint did: the readable table of the target slots, and the
    completed.parquet it wrote, for how many users, with the checkpoint of which step."""
    readable: str
    path: Path
    users: int
    step: int


def complete_checkpoint(checkpoint: str | Path, events: str | Path, task: str, out: str | Path,
                        cut: int | None = None, steps: int | None = None, seed: int = 0) -> Completion:
    """What `u-mask complete` does: the checkpoint (a checkpoint or run folder) completes each
    user's latest window of `events` for `task`, written to `<out>/completed.parquet`."""
    inference = load_inference_model(checkpoint)
    diffusion = inference.cfg.model.diffusion
    if steps is not None and not 1 <= steps <= diffusion.train_steps:
        raise UserError(f"--steps {steps}: must be in [1, model.diffusion.train_steps="
                        f"{diffusion.train_steps}]")
    with tempfile.TemporaryDirectory(prefix="umask-complete-") as workdir:
        rows = latest_windows(Path(events), inference, Path(workdir))
    result = complete_windows(inference, rows, task, cut, steps, seed)
    path = Path(out) / "completed.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(completed_table(rows, result), path)
    return Completion(readable(rows, result, inference.spec, task), path, len(rows), inference.step)
