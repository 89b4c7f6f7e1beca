"""The GPU path of `u-mask train`: nccl, bf16 DeepSpeed, row-wise sharded tables. Run with -m gpu."""
import json

import pytest
import torch

from trainer.training.launch import train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_gpu_workers_train_with_row_wise_tables(tmp_path, tiny_config):
    import ray

    workers = min(torch.cuda.device_count(), 2)
    ray.init(num_gpus=workers, num_cpus=workers + 1, _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        result = train(tiny_config("ray.name=gpu", "ray.use_gpu=true", f"ray.num_workers={workers}",
                                   "train.steps=10", "train.checkpoint_every=10",
                                   "embeddings.app.sharding_types=[row_wise]"))
    finally:
        ray.shutdown()
    assert result.error is None and result.metrics["step"] == 10
    plan = json.loads((tmp_path / "runs" / "gpu" / "plan.json").read_text())
    assert plan["app"]["sharding_type"] == "row_wise"
