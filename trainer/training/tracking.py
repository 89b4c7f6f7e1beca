"""Experiment trackers fed by rank 0's logged steps: TensorBoard always, MLflow when configured.

Ray Train's documented pattern: the rank 0 worker logs. Every logged step's figures (the
window means of trainer/training/progress.py) go to

- TensorBoard event files in the run folder, through tensorboard's own SummaryWriter
  (torch.utils.tensorboard); `tensorboard --logdir runs` shows every run, `u-mask eval` adds
  its scores to the same folder (trainer/inference/evaluate.py);
- MLflow, when `tracking.mlflow_uri` is set, through MLflow's own client: one MLflow run per
  training run (the id is kept in <run>/mlflow.json, so a resumed run continues it), the
  resolved config as parameters, the figures as metrics at their step. The driver's MLFLOW_*
  environment variables (tokens, MLFLOW_ALLOW_FILE_STORE, ...) are passed on to the workers.

Scalar names: train/{loss,reconstruction,consistency,grad_norm,lr}, perf/{examples_per_s,
data_wait,uvm_cache_hit_rate}, data/out_of_contract_{app,loc} (negative ids seen so far, all
ranks), memory/peak_{rss,hbm}_gb_rank<r> (each worker's peak so far; HBM on GPU only).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

# metrics.csv column -> scalar name; columns not listed keep their name under train/
SCALARS = {
    "loss": "train/loss", "reconstruction": "train/reconstruction", "consistency": "train/consistency",
    "grad_norm": "train/grad_norm", "lr": "train/lr",
    "examples_per_s": "perf/examples_per_s", "data_wait": "perf/data_wait",
    "out_of_contract_app": "data/out_of_contract_app", "out_of_contract_loc": "data/out_of_contract_loc",
    "uvm_cache_hit_rate": "perf/uvm_cache_hit_rate",
}
NOT_SCALARS = ("step", "elapsed_s", "eta_s")
MLFLOW_FILE = "mlflow.json"
# The event file is flushed on a logged step at most this often (and at close): TensorBoard
# itself rereads files every 5 s, and a flush per step cost about 1 ms of a 40 ms tiny step
# with train.log_every=1 (docs/training.md)
FLUSH_S = 2.0


def scalar_name(column: str) -> str:
    if column.startswith("peak_"):  # peak_rss_gb_rank<r>, peak_hbm_gb_rank<r>: each worker's memory
        return f"memory/{column}"
    return SCALARS.get(column, f"train/{column}")


class Trackers:
    """Rank 0's TensorBoard writer and, when configured, MLflow run; `log` once per logged step."""

    def __init__(self, run_dir: Path, tracking, run_name: str, config: dict | None = None):
        """tracking: the TrackingConfig; config: the resolved config as a nested dict (MLflow params)."""
        self.writer = None
        self.mlflow = None
        self._flushed = float("-inf")  # time.monotonic() of the last flush of the event file
        if tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir))
        if tracking.mlflow_uri:
            self.mlflow = MlflowRun(Path(run_dir), tracking.mlflow_uri, tracking.mlflow_experiment,
                                    run_name, config or {})

    def log(self, step: int, row: dict[str, float]) -> None:
        """One logged step's figures (a metrics.csv row) at `step`."""
        scalars = {scalar_name(k): float(v) for k, v in row.items() if k not in NOT_SCALARS}
        if self.writer is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard.summary import scalar

            # one event holding every scalar (add_scalar's events, merged): one hand-off to the
            # writer's thread per logged step instead of one per scalar
            self.writer.file_writer.add_summary(
                Summary(value=[v for name, value in scalars.items() for v in scalar(name, value).value]), step)
            now = time.monotonic()
            if now - self._flushed >= FLUSH_S:  # flush waits for the writer's thread to write
                self.writer.flush()
                self._flushed = now
        if self.mlflow is not None:
            self.mlflow.log(step, scalars)

    def close(self, finished: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.close(finished)


class MlflowRun:
    """One MLflow run through MlflowClient (no global mlflow state in the worker)."""

    def __init__(self, run_dir: Path, uri: str, experiment: str, run_name: str, config: dict):
        try:
            from mlflow import MlflowClient
        except ImportError:
            from umask.errors import UserError

            raise UserError("tracking.mlflow_uri is set but MLflow is not installed: "
                            "pip install 'umask-trainer[mlflow]' (mlflow-skinny)") from None
        self.client = MlflowClient(tracking_uri=uri)
        record = run_dir / MLFLOW_FILE
        known = json.loads(record.read_text()) if record.is_file() else {}
        if known.get("tracking_uri") == uri and known.get("run_id"):
            self.run_id = known["run_id"]  # a resumed run continues its MLflow run
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                             tags={"u_mask.run_dir": str(run_dir)}).info.run_id
        record.write_text(json.dumps({"tracking_uri": uri, "experiment": experiment,
                                      "run_id": self.run_id}, indent=1) + "\n")
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in sorted(_flatten(config).items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "FAILED")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
