"""What the commands show while they work: a progress bar on a terminal, plain lines elsewhere.

On a terminal, long work shows a tqdm bar (done/total, rate, ETA). Off a terminal (CI, job
logs, a pipe), a bar would be noise, so work prints a plain line at most every `every_s`
seconds and none at all when it ends sooner: the command's own closing line follows anyway.
Training has its own display (TrainingDisplay): one plain line per logged step off a terminal,
as the README shows, and a bar with the loss on a terminal.

Light on purpose: tqdm only, so `u-mask --help` and `u-mask config` stay cheap.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of `label`, in `unit`s: `update(done, total)` as work completes; use as a context."""

    def __init__(self, label: str, unit: str, stream: TextIO | None = None, every_s: float = 30.0):
        self.label, self.unit = label, unit
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.bar = None
        self.interactive = is_terminal(self.stream)
        self.started = time.perf_counter()
        self.last_line = self.started

    def update(self, done: int, total: int | None = None) -> None:
        if self.interactive:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.label, unit=f" {self.unit}", file=self.stream,
                                dynamic_ncols=True, leave=False)
            if total is not None and self.bar.total != total:
                self.bar.total = total
            self.bar.update(done - self.bar.n)
            return
        now = time.perf_counter()
        if now - self.last_line < self.every_s or (total is not None and done >= total):
            return
        self.last_line = now
        elapsed = now - self.started
        if total:
            eta = elapsed / max(done, 1) * (total - done)
            print(f"{self.label}: {done}/{total} {self.unit} ({100 * done / total:.0f}%), "
                  f"{done / max(elapsed, 1e-9):,.0f} {self.unit}/s, {elapsed:.0f}s elapsed, eta {eta:.0f}s",
                  file=self.stream, flush=True)
        else:
            print(f"{self.label}: {done} {self.unit}, {elapsed:.0f}s elapsed", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrainingDisplay:
    """The driver's view of rank 0's logged steps (metrics.csv rows): a bar with the loss on a
    terminal, else one line per logged step (trainer.training.progress.step_line)."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO | None = None,
                 plan: Path | None = None):
        """plan: the run's plan.txt (rank 0 writes it before the first step): shown before the
        first row, so the run starts by saying where each table went and why."""
        self.total_steps = total_steps
        self.plan = plan
        self.stream = stream or sys.stdout
        self.interactive = is_terminal(self.stream)
        self.bar = None
        self.rows = 0
        self.warned_ids = False
        if self.interactive:  # shown at once: starting Ray and the workers takes a while
            from tqdm import tqdm

            # the ETA is rank 0's (eta_s: its pace since the loop started), not tqdm's, which
            # would count starting Ray and the workers as if it were training
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit=" step",
                            file=self.stream, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def row(self, row: dict[str, str]) -> None:
        """One metrics.csv row, as strings by column (trainer.training.progress.follow_csv)."""
        from trainer.training.progress import step_line

        self.rows += 1
        if self.rows == 1 and self.plan is not None and self.plan.is_file():
            self._print(self.plan.read_text().rstrip("\n"))
        step = int(float(row["step"]))
        off_contract = sum(float(row.get(k) or 0) for k in ("out_of_contract_app", "out_of_contract_loc"))
        if off_contract and not self.warned_ids:
            self.warned_ids = True
            self._print(f"warning: {off_contract:.0f} negative (off-contract) ids so far "
                        f"(app {float(row.get('out_of_contract_app') or 0):.0f}, "
                        f"loc {float(row.get('out_of_contract_loc') or 0):.0f}); they are hashed like "
                        "any id and counted in metrics.csv")
        if not self.interactive:
            print(step_line(row, self.total_steps), file=self.stream, flush=True)
            return
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(f"loss={float(row['loss']):.4f}, examples/s={float(row['examples_per_s']):.0f}, "
                                 f"eta={float(row.get('eta_s') or 0):.0f}s", refresh=True)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
