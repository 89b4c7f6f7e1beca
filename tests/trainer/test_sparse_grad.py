"""Under gradient accumulation the tables must see each micro-batch's true gradient (real engine)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist

from trainer.config import DeepSpeedConfig
from trainer.training.deepspeed_config import deepspeed_config
from trainer.training.sparse_grad import unscaled_for_tables


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo group for the module: DeepSpeed caches its groups, so it outlives each test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            del os.environ[key]
        else:
            os.environ[key] = value


def _engine(accumulation: int):
    import deepspeed

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    cfg = deepspeed_config(DeepSpeedConfig(gradient_accumulation_steps=accumulation), 8, use_gpu=False)
    engine, *_ = deepspeed.initialize(model=dense, model_parameters=dense.parameters(), config=cfg)
    return engine


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_tables_see_the_micro_batch_gradient(one_rank_group, accumulation):
    engine = _engine(accumulation)
    pooled = torch.randn(8, 4, requires_grad=True)  # stands for the tables' output
    expected = torch.autograd.grad(engine.module(pooled).pow(2).mean(), pooled)[0]

    engine.backward(engine(unscaled_for_tables(pooled, engine)).pow(2).mean())
    torch.testing.assert_close(pooled.grad, expected, rtol=1e-6, atol=1e-7)

    # Without the correction the tables would get 1/accumulation of it: the case this guards.
    plain = pooled.detach().clone().requires_grad_()
    engine.backward(engine(plain).pow(2).mean())
    torch.testing.assert_close(plain.grad, expected / accumulation, rtol=1e-6, atol=1e-7)
