"""What a person sees in `make demo`: the Makefile's demo steps, run as make runs them, and read.

The steps come from the Makefile's `demo` recipe itself, run one by one as `u-mask`
subprocesses (the real program, an embedded Ray of its own, 2 workers) in a scratch folder
with a copy of configs/, on fewer synthetic users so that it takes about a minute. Their
stdout and stderr are read together, as a terminal shows them: the line budget, every
progress line, the closing lines with the next commands, and none of the libraries' noise.
Then what the run left: TensorBoard scalars (read back with tensorboard's own reader), the
loss curve, the per-rank log files that took the libraries' lines, and `u-mask runs`.

Each subprocess is waited for, and killed through its own handle if it overruns.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USERS = 400  # the demo synthesizes 2000; fewer make the same steps quicker
MAX_LINES = 40  # what issue 14 allows `make demo` to print, make's echo of each command included
NOISE = ("Successfully loaded", "PlacementGroupCleaner", "Failed to query", "PreemptionWatcher",
         "core_worker", "[TBE=", "is_fx_tracing", "deepspeed_shm_comm_op", "Token authentication",
         "Started a local Ray instance", "Traceback", "FutureWarning")

pytestmark = pytest.mark.slow


def demo_steps() -> list[str]:
    """The shell lines of the Makefile's demo recipe, as make would run them here."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("demo:")))
    steps = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        steps.append(line.strip().replace("$(U_MASK)", "u-mask").replace("$(DEMO)", "data/demo"))
    return steps


def run(command: list[str], cwd: Path, env: dict, timeout: float = 600) -> tuple[int, str]:
    """Runs `command` with stdout and stderr in one stream, as a terminal shows them."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"{command} ran past {timeout} s:\n{output[-3000:]}") from None
    return process.returncode, output


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Runs the demo steps in a scratch folder; returns (folder, the printed lines)."""
    folder = tmp_path_factory.mktemp("demo")
    shutil.copytree(REPO / "configs", folder / "configs")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("U_MASK_VERBOSE", None)
    printed = []
    for step in demo_steps():
        step = step.replace("--users 2000", f"--users {USERS}")
        printed.append(f".venv/bin/{step}")  # make echoes each command before running it
        code, output = run(step.split(), folder, env)
        printed += output.splitlines()
        assert code == 0, "\n".join(printed[-60:])
    return folder, printed


def test_the_demo_runs_every_step_of_the_makefile():
    steps = demo_steps()
    assert [s.split()[1:3] for s in steps] == [["data", "synth"], ["data", "featurize"], ["data", "summary"],
                                               ["train", "--config"], ["eval", "--checkpoint"]]


def test_a_person_sees_few_lines_progress_and_what_to_do_next(demo):
    folder, printed = demo
    text = "\n".join(printed)
    assert len(printed) <= MAX_LINES, text
    for noise in NOISE:
        assert noise not in text, (noise, text)

    progress = [line for line in printed if re.match(r"step \d+/40 loss=", line)]
    assert [int(re.match(r"step (\d+)/", line).group(1)) for line in progress] == list(range(5, 41, 5)), text
    assert all(re.search(r"examples/s=[\d.]+ eta=\d+s$", line) for line in progress)

    train_end = printed.index(next(line for line in printed if line.startswith("done in")))
    assert re.match(r"done in \d+ s: step 40/40, loss [\d.]+; checkpoint runs/demo/checkpoint_", printed[train_end])
    closing = printed[train_end + 1:]
    assert "loss curve runs/demo/loss.png" in closing[0] and "tensorboard --logdir runs" in closing[0]
    assert closing[1] == "next:"
    assert closing[2] == "  u-mask eval --checkpoint runs/demo --split test --out runs/demo/eval-test"
    assert closing[3].startswith("  u-mask complete --checkpoint runs/demo --events data/demo/raw --task short")
    resume = next(line for line in closing if "train.steps=80" in line)
    assert resume.startswith("  u-mask train --config configs/tiny.yaml ray.name=demo train.steps=80")

    # the eval closes the demo: its table, then the report and the plots, last
    assert printed[-1].startswith("wrote runs/demo/eval-test/report.json")
    for name in ("report.md", "short.png", "long.png", "cold.png"):
        assert name in printed[-1]
    table = printed.index(next(line for line in printed if line.startswith("category_mrr, test ")))
    assert [line.split()[0] for line in printed[table + 1:table + 4]] == ["short", "long", "cold"]
    for task in ("short", "long", "cold"):
        assert (folder / "runs/demo/eval-test" / f"{task}.png").read_bytes()[:4] == b"\x89PNG"


def test_the_run_folder_holds_tensorboard_scalars_the_loss_curve_and_the_library_logs(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = demo
    run_dir = folder / "runs" / "demo"
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/reconstruction", "train/consistency", "train/grad_norm", "train/lr",
            "perf/examples_per_s", "perf/data_wait", "data/out_of_contract_app",
            "data/out_of_contract_loc"} <= scalars
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in rows]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    # `u-mask eval` put its scores beside them, at the checkpoint's step
    mrr = events.Scalars("eval_test/short/umask/category_mrr")
    assert [e.step for e in mrr] == [40] and 0 < mrr[0].value <= 1

    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    for rank in (0, 1):  # the libraries' lines went to the rank's log file
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert "Successfully loaded" in log and "[TBE=" in log


def test_runs_lists_the_demo_run(demo):
    folder, _ = demo
    code, output = run([str(BIN / "u-mask"), "runs", "--storage", "runs"], folder, dict(os.environ))
    assert code == 0
    header, line = output.splitlines()[:2]
    assert header.split()[:3] == ["run", "step", "loss"]
    assert line.split()[:2] == ["demo", "40/40"] and "runs/demo/checkpoint_" in line
