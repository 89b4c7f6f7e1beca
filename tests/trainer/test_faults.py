"""Faults on real Ray, on CPU: killed workers, a crash while checkpointing, a hung rank, a killed driver.

The faults are real: trainer/training/faults.py makes a worker SIGKILL itself or stop forever
at a chosen step (UMASK_FAULTS, passed from the driver to the workers), and the driver test
SIGKILLs a `u-mask train` process it started. Each run is compared with conftest's straight_run,
the same config trained without interruption: the final weights (dense.safetensors and every
table shard) must be equal bit for bit and the loss curve equal to metrics.csv's 6 decimals.
The tolerance is zero because a resumed step repeats the uninterrupted run's floating-point
operations: same world size, thread count and seed, batches from the restored loader position,
and every restored tensor copied exactly.
"""
import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from conftest import CONFIGS, STRAIGHT
from trainer.training.checkpoint import is_complete, latest_checkpoint
from trainer.training.launch import train
from umask.errors import UserError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _losses(run_dir: Path) -> dict[int, str]:
    """metrics.csv's loss per step; a step logged twice (before a crash and after the resume)
    keeps its last row."""
    with (run_dir / "metrics.csv").open() as f:
        return {int(row["step"]): row["loss"] for row in csv.DictReader(f)}


def _final_state(run_dir: Path) -> dict[str, np.ndarray]:
    folder = latest_checkpoint(run_dir)
    tensors = {f"dense:{k}": v for k, v in load_file(folder / "dense.safetensors").items()}
    for path in sorted((folder / "tables").glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return tensors


def _assert_same_run(run_dir: Path, straight: Path) -> None:
    assert _losses(run_dir) == _losses(straight)
    got, want = _final_state(run_dir), _final_state(straight)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert all(is_complete(p) for p in run_dir.glob("checkpoint_*") if p.is_dir())


def test_killed_workers_lose_nothing_after_the_last_checkpoint(tmp_path, tiny_config, straight_run,
                                                              monkeypatch):
    # rank 1 is SIGKILLed after step 6, then (in the restarted group) while it writes the
    # checkpoint of step 8, after its files and before it reports them; the default
    # ray.max_failures (3) lets Ray Train restart the group from the step-4 checkpoint each time
    monkeypatch.setenv("UMASK_FAULTS", "kill@step:6:rank=1,kill@save:8:rank=1")
    result = train(tiny_config("ray.name=killed", *STRAIGHT))
    assert result.error is None and result.metrics["step"] == 8
    run = tmp_path / "runs" / "killed"
    assert sorted(p.name for p in (run / "faults").iterdir()) == [
        "kill@save-8-rank1.fired", "kill@step-6-rank1.fired"]
    assert (run / "logs" / "rank-0.log").read_text().count("resumed at step 4") == 2
    _assert_same_run(run, straight_run)


def test_a_hung_rank_ends_in_an_error_within_the_collective_timeout(tiny_config, monkeypatch):
    monkeypatch.setenv("UMASK_FAULTS", "hang@step:2:rank=1")  # rank 1 stops after step 2, forever
    cfg = tiny_config("ray.name=hung", "train.steps=4", "ray.collective_timeout_s=10", "ray.max_failures=0")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train(cfg)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=600)  # a liveness guard, not a timing assertion: the old code never returned
    assert not thread.is_alive(), "train() still waiting after 600 s"
    error = outcome.get("error")
    assert isinstance(error, UserError), outcome
    assert "on rank 0: step 3: rank 0 waited more than ray.collective_timeout_s=10 s" in str(error)
    assert "a rank is hung or dead" in str(error)


def test_a_killed_driver_resumes_when_the_command_is_rerun(tmp_path, tiny_dataset, straight_run):
    run = tmp_path / "runs" / "driver"
    command = [sys.executable, "-m", "trainer", "train", "--config", str(CONFIGS / "tiny.yaml"),
               f"data.source={tiny_dataset / 'raw'}", f"data.features={tiny_dataset / 'features'}",
               f"ray.storage_path={tmp_path / 'runs'}", "ray.name=driver", *STRAIGHT]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # every rank stops after step 6 (the checkpoint of step 4 is published), so the driver is
    # killed mid-run at a known point; the files the fault leaves say when it is there
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(command, cwd=ROOT, env={**env, "UMASK_FAULTS": "hang@step:6"},
                                  stdout=log, stderr=subprocess.STDOUT)
    started = []
    try:
        markers = [run / "faults" / f"hang@step-6-rank{rank}.fired" for rank in (0, 1)]
        deadline = time.monotonic() + 600  # a liveness guard: fail rather than wait forever
        while not all(m.exists() for m in markers):
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the workers never reached step 6"
            time.sleep(0.5)
        started = psutil.Process(driver.pid).children(recursive=True)  # its embedded Ray
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        # the Ray that driver started mostly goes with it; what lingers is ended by its pid
        _, lingering = psutil.wait_procs(started, timeout=30)
        for process in lingering:
            process.kill()
    assert max(_losses(run)) == 5  # the fault stops the ranks before step 6 is logged

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumed at step 4" in (run / "logs" / "rank-0.log").read_text()
    _assert_same_run(run, straight_run)
