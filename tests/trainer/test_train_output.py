"""What a training run shows and where its figures go: --verbose brings the libraries' logs
back to the terminal, and MLflow gets the logged steps through its own client.

The quiet default is read in tests/test_demo.py, from the real demo steps.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.training.launch import train
from trainer.training.worker_logs import verbose_from_env

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_verbose_shows_the_libraries_logs_and_writes_no_log_files(tiny_dataset, tmp_path):
    command = [str(BIN / "u-mask"), "train", "--verbose", "--config", str(CONFIGS / "tiny.yaml"),
               f"data.source={tiny_dataset / 'raw'}", f"data.features={tiny_dataset / 'features'}",
               f"ray.storage_path={tmp_path / 'runs'}", "ray.name=loud", "ray.num_workers=1",
               "train.steps=2", "train.log_every=1", "train.checkpoint_every=2"]
    env = {k: v for k, v in os.environ.items() if k != "U_MASK_VERBOSE"}
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output[-3000:]
    # the libraries' lines are back, through Ray's forwarding of the worker's output
    assert "(RayTrainWorker pid=" in output and "Successfully loaded: 'fbgemm_gpu" in output
    assert "[TBE=" in output
    assert "step 2/2 loss=" in output  # and the progress is still there
    assert not (tmp_path / "runs" / "loud" / "logs").exists()


def test_verbose_from_the_environment(monkeypatch):
    for value, verbose in (("1", True), ("true", True), ("on", True), ("0", False), ("", False)):
        monkeypatch.setenv("U_MASK_VERBOSE", value)
        assert verbose_from_env() is verbose
    monkeypatch.delenv("U_MASK_VERBOSE")
    assert verbose_from_env() is False


def test_mlflow_gets_params_and_every_logged_step_and_a_resumed_run_continues_it(
        tiny_config, tmp_path, embedded_ray, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    # MLflow 3 keeps its file store for local use behind this switch; the driver's MLFLOW_*
    # variables reach rank 0 (trainer/training/tracking.py)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path / 'mlruns'}"
    common = ("ray.name=tracked", "ray.num_workers=1", "train.log_every=1", "train.checkpoint_every=2",
              f"tracking.mlflow_uri={store}", "tracking.mlflow_experiment=tests")
    train(tiny_config(*common, "train.steps=2"))
    train(tiny_config(*common, "train.steps=4"))  # resumes

    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["train.batch_size"] == "8" and run.data.params["ray.num_workers"] == "1"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    with (tmp_path / "runs" / "tracked" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([float(r["loss"]) for r in rows])
    assert {"train/grad_norm", "perf/data_wait", "perf/examples_per_s"} <= set(run.data.metrics)
