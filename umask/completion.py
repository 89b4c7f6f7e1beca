"""Completing a user's latest window for a task: the cut, the evidence, the output table.

One definition shared by `u-mask complete` (a checkpoint, trainer/inference/complete.py) and
the export bundle's loader (umask/bundle.py), so both hide and show the same slots.

Per user, the window is completed for one task with a fixed cut:
  short, long  the target is the task's longest window (target_max slots) right after the
               user's last observed slot, moved back to end at the window's end if it would
               not fit (then the hidden slots can be compared with what happened);
  cold         everything after the first model.mask.cold_history slots;
a given cut sets it for every user instead. Evidence is the model's adaptive mask over the
observed slots before the cut (the sampler of training, umask.masking.mask_for_window, with
this cut and target), drawn from the caller's generator.
"""
from __future__ import annotations

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
                  spec: FeatureSpec, cfg: MaskConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """The cut [B], target [B,T] and evidence [B,T] of `task` for dense [B,T,F] float32,
    observed [B,T] bool and time_of_week [B,T] int; a UserError for a task or cut that does
    not exist. Draws the evidence from generator."""
    slots = observed.shape[1]
    if task not in TASKS:
        raise UserError(f"task {task!r}: must be one of {', '.join(TASKS)}")
    if cut is not None and not 1 <= cut < slots:
        raise UserError(f"cut {cut}: must be a slot in [1, {slots - 1}]")
    start, target = task_cut(task, observed, cfg, cut)
    tasks = torch.full((len(observed),), TASKS.index(task), dtype=torch.long)
    evidence = mask_for_window(dense, observed, time_of_week, tasks, start, target, spec, cfg, generator).evidence
    return {"cut": start, "target": target, "evidence": evidence}


def completed_table(rows: ExampleRows, dense: Tensor, evidence: Tensor, target: Tensor) -> pa.Table:
    """One COMPLETED row per (user, slot) of rows' windows, with the completed dense [B,T,F]."""
    n, slots = rows.observed.shape
    values = dense.numpy().astype(np.float32)  # [B,T,F]
    return pa.table({
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
