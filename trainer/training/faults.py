"""Fault injection, for fire drills and the fault tests: real faults at chosen points of a run.

The driver passes UMASK_FAULTS on to the workers (trainer/training/launch.py). It is a comma
separated list of ACTION@POINT:STEP[:rank=R], for example

    UMASK_FAULTS="kill@step:6:rank=1,kill@save:8:rank=1"   u-mask train ...

- ACTION: `kill` sends SIGKILL to the worker's own process (as the OOM killer or a lost node
  would end it: no cleanup runs); `hang` stops the worker where it is, forever (a stuck rank).
- POINT: `step` after optimizer step STEP; `save` in the checkpoint of step STEP, after this
  rank wrote its files and before it reports them to Ray Train; `bucket` in featurize's phase-2
  task of bucket STEP, after it wrote its first split file (trainer/data/featurize_ray.py).
- rank=R: only on that rank; without it, on every rank.
Each fault fires once per run: before it acts it leaves <run>/faults/<fault>-rank<r>.fired,
so the worker group Ray Train restarts does not meet it again. The file also tells a fire
drill that the fault happened.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import time
from pathlib import Path

ENV = "UMASK_FAULTS"
_SPEC = re.compile(r"(kill|hang)@(step|save|bucket):(\d+)(?::rank=(\d+))?")


@dataclasses.dataclass(frozen=True)
class Fault:
    action: str
    point: str
    step: int
    rank: int | None

    @property
    def name(self) -> str:
        return f"{self.action}@{self.point}-{self.step}"


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = _SPEC.fullmatch(item)
        if match is None:
            raise ValueError(f"{ENV}: {item!r} is not ACTION@POINT:STEP[:rank=R] "
                             "(kill|hang, step|save|bucket), for example kill@step:6:rank=1")
        action, point, step, rank = match.groups()
        faults.append(Fault(action, point, int(step), None if rank is None else int(rank)))
    return faults


def fault_point(point: str, step: int, rank: int, run_dir: Path) -> None:
    """Fires the faults UMASK_FAULTS names for this point, step and rank (nothing when unset)."""
    text = os.environ.get(ENV)
    if not text:
        return
    for fault in parse_faults(text):
        if (fault.point, fault.step) != (point, step) or fault.rank not in (None, rank):
            continue
        marker = Path(run_dir) / "faults" / f"{fault.name}-rank{rank}.fired"
        if marker.exists():
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"pid {os.getpid()}\n")
        print(f"fault injected: {fault.action} at {point} {step} on rank {rank} (pid {os.getpid()})", flush=True)
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # hang
            time.sleep(3600)
