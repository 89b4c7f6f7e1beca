"""The runs in a storage path: what each holds, its latest checkpoint, and its loss curve.

Light on purpose (no torch, no Ray): `u-mask runs` and the closing lines of `u-mask train` read
only the run folder's files:
  config.yaml      the resolved config (train.steps)
  metrics.csv      rank 0's logged steps (trainer/training/progress.py)
  checkpoint_*/    each with state.json (step, world size, run)
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class RunSummary:
    """One run folder: its name, the step and loss of its last logged step, the steps it was
    configured for, its latest checkpoint (None before the first) and when it last changed."""
    name: str
    path: Path
    step: int | None  # the last logged step, None before the first
    loss: float | None
    steps: int | None  # train.steps of its config.yaml
    checkpoint: Path | None
    checkpoint_step: int | None
    modified: float  # epoch seconds: the newest of config.yaml, metrics.csv and checkpoints


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The run's checkpoint folder with the highest step (state.json) and that step; None when
    the run has none yet. Unreadable state.json files are skipped here; loading one names them."""
    best = None
    for folder in Path(run_dir).glob("checkpoint_*"):
        step = _step(folder / "state.json")
        if step is not None and (best is None or (step, folder.name) > (best[1], best[0].name)):
            best = (folder, step)
    return best


def summarize_run(run_dir: Path) -> RunSummary | None:
    """The run in `run_dir`, or None when the folder is not a run (no config.yaml)."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    rows = read_metrics(run_dir / "metrics.csv")
    last = rows[-1] if rows else {}
    checkpoint = latest_checkpoint(run_dir)
    times = [p.stat().st_mtime for p in (config, run_dir / "metrics.csv") if p.is_file()]
    if checkpoint:
        times.append(checkpoint[0].stat().st_mtime)
    return RunSummary(
        name=run_dir.name, path=run_dir,
        step=int(float(last["step"])) if last.get("step") else None,
        loss=float(last["loss"]) if last.get("loss") not in (None, "") else None,
        steps=_configured_steps(config),
        checkpoint=checkpoint[0] if checkpoint else None,
        checkpoint_step=checkpoint[1] if checkpoint else None,
        modified=max(times))


def list_runs(storage: Path) -> list[RunSummary]:
    """Every run folder directly under `storage`, newest first."""
    storage = Path(storage)
    if not storage.is_dir():
        return []
    runs = [summarize_run(p) for p in storage.iterdir() if p.is_dir()]
    return sorted((r for r in runs if r is not None), key=lambda r: r.modified, reverse=True)


def read_metrics(path: Path) -> list[dict[str, str]]:
    """metrics.csv's rows (strings by column); [] when there is none yet."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(metrics: Path, out: Path) -> Path | None:
    """Draws loss, reconstruction and consistency against the step from metrics.csv into the
    PNG `out`; None when there is no logged step. A resumed run's rows are drawn in step order."""
    rows = read_metrics(metrics)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {int(float(r["step"])): r for r in rows}  # a resumed run may log a step again
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for column in ("loss", "reconstruction", "consistency"):
        if column in rows[0]:
            ax.plot(steps, [float(by_step[s][column]) for s in steps], marker="." if len(steps) < 50 else None,
                    label=column)
    ax.set_xlabel("step")
    ax.set_ylabel("window mean over ranks")
    if all(float(by_step[s][c]) > 0 for s in steps for c in ("loss", "reconstruction", "consistency")
           if c in rows[0]):
        ax.set_yscale("log")  # the parts differ by orders of magnitude
    ax.set_title(f"{Path(metrics).parent.name}: training loss")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _step(state: Path) -> int | None:
    try:
        step = json.loads(state.read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _configured_steps(config: Path) -> int | None:
    try:
        steps = (yaml.safe_load(config.read_text()) or {}).get("train", {}).get("steps")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None
