"""Progress the way users expect: rank 0 records every N-th step, the driver shows it.

Each logged figure is a mean over the steps since the previous logged step and over ranks
(trainer/training/loop.py's MetricWindow): the ranks gather their metrics only on logged steps.
Ray Train V2 keeps only metrics that come with a checkpoint, so the run writes its own record:
<run dir>/metrics.csv, one row per logged step, from rank 0 (ProgressLog), and the same figures
to TensorBoard and MLflow (trainer/training/tracking.py).

The driver owns the terminal: `follow_csv` reads the rows rank 0 appends while the training
runs, and the command line shows each one (a progress bar on a terminal, a plain line
otherwise). The workers' own output goes to the run's log files (worker_logs.py).
"""
from __future__ import annotations

import contextlib
import csv
import threading
import time
from pathlib import Path
from typing import Callable


class ProgressLog:
    """Rank 0's record of the logged steps: metrics.csv under the run folder, and the trackers."""

    def __init__(self, run_dir: Path, total_steps: int, log_every: int, is_rank0: bool,
                 start_step: int = 0, trackers=None):
        """trackers: a tracking.Trackers that gets every row too (rank 0 only), or None."""
        self.total_steps = total_steps
        self.log_every = log_every
        self.is_rank0 = is_rank0
        self.start_step = start_step
        self.trackers = trackers
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
        when due(step); other steps pass None. A row holds them, examples_per_s over the
        window, elapsed_s since the loop started and eta_s, the time the remaining steps take
        at the mean pace so far.
        """
        self.window_examples += examples
        if not self.is_rank0 or not self.due(step):
            return
        if metrics is None:
            raise ValueError(f"step {step} is logged: it needs its metrics")
        now = time.perf_counter()
        rate = self.window_examples / max(now - self.window_started, 1e-9)
        per_step = (now - self.started) / max(step - self.start_step, 1)
        # elapsed_s to the millisecond: bench/train_bench.py times steps of about 40 ms by it
        row = {"step": step, **{k: round(float(v), 6) for k, v in metrics.items()},
               "examples_per_s": round(rate, 2), "elapsed_s": round(now - self.started, 3),
               "eta_s": round(per_step * (self.total_steps - step), 1)}
        self._append(row)
        if self.trackers is not None:
            self.trackers.log(step, row)
        self.window_started, self.window_examples = now, 0

    def _append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists()
        if self._columns is None:  # a resumed run keeps the columns the file started with
            self._columns = list(row) if new_file else (_header(self.path) or list(row))
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)


def step_line(row: dict, total_steps: int) -> str:
    """The plain progress line of a metrics.csv row, as the driver prints it off a terminal:
    `step 10/40 loss=0.2390 reconstruction=… consistency=… grad_norm=… data_wait=… examples/s=217.3 eta=5s`."""
    shown = " ".join(f"{k}={float(row[k]):.4f}" for k in ("loss", "reconstruction", "consistency",
                                                          "grad_norm", "data_wait") if row.get(k) not in (None, ""))
    return (f"step {int(float(row['step']))}/{total_steps} {shown} "
            f"examples/s={float(row['examples_per_s']):.1f} eta={float(row.get('eta_s') or 0):.0f}s")


@contextlib.contextmanager
def follow_csv(path: Path, on_row: Callable[[dict[str, str]], None], poll_s: float = 0.25):
    """Calls on_row(row) for each row appended to the CSV at `path` while the block runs, from a
    thread, and once more for the rows that arrived by the end. Rows already in the file when the
    block starts (an earlier run resumed) are skipped. on_row gets the row as strings."""
    path = Path(path)
    start = path.stat().st_size if path.is_file() else 0
    header = _header(path) if start else None
    stop = threading.Event()
    state = {"offset": start, "header": header, "partial": ""}

    def drain() -> None:
        if not path.is_file():
            return
        with path.open(newline="") as f:
            f.seek(state["offset"])
            text = state["partial"] + f.read()
            state["offset"] = f.tell()
        *lines, state["partial"] = text.split("\n")  # the last piece may be a row being written
        for line in lines:
            if not line.strip():
                continue
            values = next(csv.reader([line]))
            if state["header"] is None:
                state["header"] = values
                continue
            on_row(dict(zip(state["header"], values)))

    def loop() -> None:
        while not stop.wait(poll_s):
            drain()

    thread = threading.Thread(target=loop, name="follow-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        drain()


def _header(path: Path) -> list[str] | None:
    with path.open(newline="") as f:
        return next(csv.reader(f), None)
