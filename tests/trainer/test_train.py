"""Two real Ray workers train the tiny model: gloo, TorchRec-sharded tables, a DeepSpeed engine."""
import csv
import json
from pathlib import Path

import pytest
import numpy as np
from safetensors.numpy import load_file

from trainer.inference.loading import load_inference_model
from trainer.training.launch import train

pytestmark = pytest.mark.slow


def _losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open() as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


def _tables(checkpoint: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for path in sorted((checkpoint / "tables").glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return tensors


def test_two_workers_shard_tables_and_learn(tmp_path, tiny_config, embedded_ray):
    cfg = tiny_config("ray.name=learn", "train.steps=30", "train.log_every=1",
                      "train.checkpoint_every=15",
                      "embeddings.app.sharding_types=[table_wise]",
                      "embeddings.loc.sharding_types=[column_wise]", "embeddings.loc.column_shard_dim=8")
    result = train(cfg)
    assert result.error is None
    run_dir = tmp_path / "runs" / "learn"

    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["app"]["sharding_type"] == "table_wise" and len(plan["app"]["ranks"]) == 1
    assert plan["loc"]["sharding_type"] == "column_wise" and sorted(set(plan["loc"]["ranks"])) == [0, 1]

    # the plan as printed, and each worker's peak memory, each rank's own
    assert "app (4,096 x 16): table_wise" in (run_dir / "plan.txt").read_text()
    with (run_dir / "metrics.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    assert all(0.2 < float(last[f"peak_rss_gb_rank{r}"]) < 16 for r in (0, 1)), last

    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < 0.8 * first, losses

    checkpoints = sorted(p for p in (run_dir).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # steps 15 and 30
    at_15, at_30 = _tables(checkpoints[0]), _tables(checkpoints[1])
    weights = [k for k in at_15 if "weight" in k and "optimizer" not in k]
    assert {k.split(":")[1].split(".")[-2] for k in weights} >= {"app", "loc"}
    for key in weights:
        changed_rows = (at_15[key] != at_30[key]).any(axis=1).sum()
        assert 0 < changed_rows < at_15[key].shape[0], key  # looked-up rows moved, the rest did not

    # the trained checkpoint loads for inference (rank 0's dense.safetensors, both ranks' tables)
    loaded = load_inference_model(run_dir)
    assert loaded.step == 30 and loaded.checkpoint == checkpoints[1]


def test_resume_continues_with_the_same_losses(tmp_path, tiny_config, embedded_ray, straight_run):
    common = ("train.log_every=1", "train.checkpoint_every=4")  # straight_run's (conftest.py)
    train(tiny_config("ray.name=resumed", "train.steps=4", *common))
    result = train(tiny_config("ray.name=resumed", "train.steps=8", *common))
    assert result.error is None
    straight, resumed = _losses(straight_run), _losses(tmp_path / "runs" / "resumed")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step


def test_one_worker_trains(tmp_path, tiny_config, embedded_ray):
    result = train(tiny_config("ray.name=single", "ray.num_workers=1", "train.steps=3",
                               "train.log_every=1", "train.checkpoint_every=3"))
    assert result.error is None and result.metrics["step"] == 3
    assert sorted(_losses(tmp_path / "runs" / "single")) == [1, 2, 3]
