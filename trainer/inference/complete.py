"""`u-mask complete`: a checkpoint completes the latest window of given users' events for a task.

The events (a contract dataset, events directory or file) go through the same contract reader
and the same events -> examples core as training data (umask/slots.py), under the checkpoint's
feature spec: the same slots and windows, and the app categories and regions of the spec's
maps, so a user's slots are built exactly as the model saw them in training. Nothing is
refitted and the training data need not be on disk; side tables next to the events are not
read. Apps the spec does not list fall in the unknown category, unlisted places in the spec's
hashed region.

The cut, target and evidence of each task are umask/completion.py's, which the export
bundle's loader shares: a forecast of the slots after the user's last record when they fit in
the window, else a backtest of the window's last slots; evidence sampled as in training, or
all the history before the cut (--evidence all); --cut SLOT sets the cut for every user.

Prints, per user, which it is and what the model saw, then the target slots; writes
completed.parquet: one row per (user, slot) of the window with the completed dense channels,
named in the file's metadata (umask.completion.dense_labels).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from trainer.data.batch import Batch
from trainer.inference.loading import InferenceModel, load_inference_model
from umask.completion import completed_table, task_evidence
from umask.errors import UserError
from umask.slots import ExampleRows, latest_windows
from umask.spec import DenseLayout, FeatureSpec

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def complete_windows(inference: InferenceModel, rows: ExampleRows, task: str, cut: int | None,
                     steps: int | None, seed: int, evidence: str = "sampled") -> dict[str, Tensor]:
    """Completed dense [B,T,F] with the evidence and target masks [B,T] and cuts [B] used."""
    batch = Batch.of_rows(rows)
    model = inference.model
    generator = torch.Generator().manual_seed(seed)
    masks = task_evidence(batch.dense, batch.observed, batch.time_of_week, task, cut, inference.spec,
                          model.cfg.mask, generator, evidence)
    completed = model.complete(batch.dense, masks["evidence"], batch.time_of_week, inference.slot_sparse(batch),
                               steps=steps, generator=generator)
    return {"dense": completed, **masks}


def readable(rows: ExampleRows, result: dict[str, Tensor], spec: FeatureSpec, task: str,
             evidence_rule: str = "sampled", show: int | None = None) -> str:
    """Per user (the first `show` users; None: all): what is completed and from what (forecast
    or backtest, the target slots, the evidence the model saw), then each target slot's top
    categories, region, activity, volume."""
    layout = spec.layout
    lines = []
    shown = len(rows) if show is None else min(show, len(rows))
    for b in range(shown):
        observed, evidence = rows.observed[b], result["evidence"][b].numpy()
        target = result["target"][b].numpy()
        cut = int(result["cut"][b])
        start = datetime.fromtimestamp(int(rows.window_start[b]), timezone.utc)
        slots = np.flatnonzero(target)
        hidden = int((observed & target).sum())
        last = int(np.flatnonzero(observed).max()) if observed.any() else -1
        what = (f"a backtest of slots {slots.min()}-{slots.max()} ({hidden} observed slots there are hidden "
                "from the model; 'true cat' shows them)" if hidden else
                f"a forecast of slots {slots.min()}-{slots.max()}, after the last record (slot {last})")
        lines.append(f"user {rows.user_id[b]}, week of {start:%Y-%m-%d %H:%M}Z, task {task}: {what}")
        lines.append(f"  evidence: {int(evidence.sum())} of the {int(observed[:cut].sum())} observed slots "
                     f"before slot {cut}, " + ("all of them" if evidence_rule == "all" else "sampled as in training"))
        lines.append("  slot  time       seen  predicted categories (log1p count)  true cat  "
                     "region  activity  volume  (log1p events, bytes)")
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
    if shown < len(rows):
        lines.append(f"... and {len(rows) - shown} more users in completed.parquet (--show sets how many print)")
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
                        cut: int | None = None, steps: int | None = None, seed: int = 0,
                        evidence: str = "sampled", show: int | None = None) -> Completion:
    """What `u-mask complete` does: the checkpoint (a checkpoint or run folder) completes each
    user's latest window of `events` for `task`, written to `<out>/completed.parquet`
    (umask.completion: forecast or backtest; evidence "sampled" or "all"). The readable table
    covers the first `show` users (None: all)."""
    inference = load_inference_model(checkpoint)
    diffusion = inference.cfg.model.diffusion
    if steps is not None and not 1 <= steps <= diffusion.train_steps:
        raise UserError(f"--steps {steps}: must be in [1, model.diffusion.train_steps="
                        f"{diffusion.train_steps}]")
    rows = latest_windows(events, inference.spec, inference.maps, inference.cfg.data.plausible_range())
    result = complete_windows(inference, rows, task, cut, steps, seed, evidence)
    path = Path(out) / "completed.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(completed_table(rows, result["dense"], result["evidence"], result["target"], inference.spec),
                   path)
    return Completion(readable(rows, result, inference.spec, task, evidence, show), path, len(rows),
                      inference.step)
