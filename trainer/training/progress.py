"""Progress the way users expect: a line every N steps on rank 0, and the same figures in a CSV.

Each logged figure is a mean over the steps since the previous logged step and over ranks
(trainer/training/loop.py's MetricWindow): the ranks gather their metrics only on logged steps.
Ray Train V2 keeps only metrics that come with a checkpoint, so the run writes its own record:
<run dir>/metrics.csv, one row per logged step, from rank 0.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path


class ProgressLog:
    """Rank 0's progress line (step, loss, examples/s, ETA) and metrics.csv under the run folder."""

    def __init__(self, run_dir: Path, total_steps: int, log_every: int, is_rank0: bool, start_step: int = 0):
        self.total_steps = total_steps
        self.log_every = log_every
        self.is_rank0 = is_rank0
        self.start_step = start_step
        self.started = time.perf_counter()
        self.window_started = self.started
        self.window_examples = 0
        self.path = Path(run_dir) / "metrics.csv"
        self._columns: list[str] | None = None

    def due(self, step: int) -> bool:
        """Whether step `step` (1-based) is logged: every log_every-th step and the last one.

        The same answer on every rank, so all ranks reduce their metrics on these steps.
        """
        return step % self.log_every == 0 or step == self.total_steps

    def step(self, step: int, examples: int, metrics: dict[str, float] | None) -> None:
        """Records step `step` (1-based) that consumed `examples` examples on all ranks together.

        `metrics` (means over the steps since the last logged one, over ranks) are needed only
        when due(step); other steps pass None.
        """
        self.window_examples += examples
        if not self.is_rank0 or not self.due(step):
            return
        if metrics is None:
            raise ValueError(f"step {step} is logged: it needs its metrics")
        now = time.perf_counter()
        rate = self.window_examples / max(now - self.window_started, 1e-9)
        per_step = (now - self.started) / max(step - self.start_step, 1)
        eta = per_step * (self.total_steps - step)
        row = {"step": step, **{k: round(float(v), 6) for k, v in metrics.items()},
               "examples_per_s": round(rate, 2), "elapsed_s": round(now - self.started, 2)}
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"step {step}/{self.total_steps} {shown} examples/s={rate:.1f} eta={eta:.0f}s", flush=True)
        self._append(row)
        self.window_started, self.window_examples = now, 0

    def _append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists()
        if self._columns is None:
            self._columns = list(row)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
