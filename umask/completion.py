"""Completing a user's latest window for a task: the cut, the evidence, the output table.

One definition shared by `u-mask complete` (a checkpoint, trainer/inference/complete.py) and
the export bundle's loader (umask/bundle.py), so both hide and show the same slots.

Per user, the latest window (the week holding the user's last record) is completed for one
task with a fixed cut:
  short, long  the target is the task's longest window (target_max slots) right after the
               user's last record: a forecast, when it fits in the window. When the last record
               is too close to the window's end, the target is the window's last target_max
               slots instead: a backtest, whose observed target slots are hidden from the model
               and can be compared with what happened (most users of an export that runs to its
               last day are backtests);
  cold         everything after the first model.mask.cold_history slots;
a given cut sets it for every user instead. Evidence: with evidence="sampled" (the default)
the model's adaptive mask over the observed slots before the cut, the sampler of training
(umask.masking.mask_for_window, with this cut and target) drawn from the caller's generator,
so the model sees the share of the history it was trained to complete from; with "all",
every observed slot before the cut.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from umask.config import TASKS, MaskConfig
from umask.errors import UserError
from umask.masking import mask_for_window
from umask.slots import ExampleRows
from umask.spec import FeatureSpec

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


def task_cut(task: str, observed: Tensor, cfg: MaskConfig, cut: int | None) -> tuple[Tensor, Tensor]:
    """Cut point [B] int64 and target window [B,T] bool of `task` for each row of observed [B,T]
    (module docstring)."""
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


def task_evidence(dense: Tensor, observed: Tensor, time_of_week: Tensor, task: str, cut: int | None,
                  spec: FeatureSpec, cfg: MaskConfig, generator: torch.Generator,
                  evidence: str = "sampled") -> dict[str, Tensor]:
    """The cut [B], target [B,T] and evidence [B,T] of `task` for dense [B,T,F] float32,
    observed [B,T] bool and time_of_week [B,T] int; a UserError for a task, cut or evidence
    rule that does not exist. evidence "sampled" draws it from generator, "all" takes every
    observed slot before the cut (module docstring)."""
    if evidence not in ("sampled", "all"):
        raise UserError(f"evidence {evidence!r}: must be 'sampled' or 'all'")
    slots = observed.shape[1]
    if task not in TASKS:
        raise UserError(f"task {task!r}: must be one of {', '.join(TASKS)}")
    if cut is not None and not 1 <= cut < slots:
        raise UserError(f"cut {cut}: must be a slot in [1, {slots - 1}]")
    start, target = task_cut(task, observed, cfg, cut)
    if evidence == "all":
        shown = observed & (torch.arange(slots) < start[:, None])
    else:
        tasks = torch.full((len(observed),), TASKS.index(task), dtype=torch.long)
        shown = mask_for_window(dense, observed, time_of_week, tasks, start, target, spec, cfg, generator).evidence
    return {"cut": start, "target": target, "evidence": shown}


def completed_table(rows: ExampleRows, dense: Tensor, evidence: Tensor, target: Tensor,
                    spec: FeatureSpec) -> pa.Table:
    """One COMPLETED row per (user, slot) of rows' windows, with the completed dense [B,T,F].

    The schema's metadata labels `dense` from the spec: b"umask.dense_channels" holds the F
    channel names as a JSON list (DenseLayout.channel_names), b"umask.spec_digest" the spec's
    digest, and the dense field's own metadata the same names."""
    n, slots = rows.observed.shape
    values = dense.numpy().astype(np.float32)  # [B,T,F]
    table = pa.table({
        "user_id": np.repeat(rows.user_id, slots),
        "window_start": np.repeat(rows.window_start, slots),
        "slot": np.tile(np.arange(slots, dtype=np.int32), n),
        "time_of_week": rows.time_of_week.reshape(-1).astype(np.int16),
        "observed": rows.observed.reshape(-1),
        "evidence": evidence.numpy().reshape(-1),
        "target": target.numpy().reshape(-1),
        "dense": pa.FixedSizeListArray.from_arrays(values.reshape(-1), values.shape[2]).cast(
            pa.list_(pa.float32())),
    }, schema=COMPLETED)
    return table.replace_schema_metadata(dense_labels(spec)).cast(labelled_schema(spec))


def dense_labels(spec: FeatureSpec) -> dict[bytes, bytes]:
    """completed.parquet's schema metadata: the dense channels' names and the spec's digest."""
    return {b"umask.dense_channels": json.dumps(spec.layout.channel_names()).encode(),
            b"umask.spec_digest": spec.digest.encode()}


def labelled_schema(spec: FeatureSpec) -> pa.Schema:
    """COMPLETED with the dense channels named, on the schema and on the dense field."""
    names = json.dumps(spec.layout.channel_names()).encode()
    fields = [f.with_metadata({b"channels": names}) if f.name == "dense" else f for f in COMPLETED]
    return pa.schema(fields, metadata=dense_labels(spec))
