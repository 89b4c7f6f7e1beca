"""Under gradient accumulation the tables must see each micro-batch's true gradient (real engine)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist

from trainer.config import DeepSpeedConfig
from trainer.training.deepspeed_config import deepspeed_config
from trainer.training.sparse_grad import table_gradient, watch_loss


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


def _engine(accumulation: int, **settings):
    import deepspeed

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    cfg = deepspeed_config(DeepSpeedConfig(gradient_accumulation_steps=accumulation, **settings), 8,
                           use_gpu=False)
    cfg["fp16"]["initial_scale_power"] = 8  # a scale the first backward does not overflow at
    engine, *_ = deepspeed.initialize(model=dense, model_parameters=dense.parameters(), config=cfg)
    return engine


@pytest.mark.parametrize("accumulation", [1, 2, 3, 4])
def test_tables_see_the_micro_batch_gradient(one_rank_group, accumulation):
    engine = _engine(accumulation)
    pooled = torch.randn(8, 4, requires_grad=True)  # stands for the tables' output
    expected = torch.autograd.grad(engine.module(pooled).pow(2).mean(), pooled)[0]

    # as the training step does: the dense backward into a leaf standing for the tables' output
    leaf = pooled.detach().requires_grad_()
    loss = engine(leaf).pow(2).mean()
    seen = watch_loss(loss)
    engine.backward(loss)
    torch.testing.assert_close(table_gradient(leaf.grad, seen, accumulation), expected, rtol=1e-6, atol=1e-7)

    # Without the correction the tables would get 1/accumulation of it: the case this guards.
    torch.testing.assert_close(leaf.grad, expected / accumulation, rtol=1e-6, atol=1e-7)


def test_tables_see_the_true_gradient_under_the_fp16_loss_scale(one_rank_group, monkeypatch):
    """The GPU fp16 path's CPU twin: DeepSpeed's fp16 check lifted, a real ZeRO-2 fp16 engine."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)
    engine = _engine(2, zero_stage=2, precision="fp16")
    pooled = torch.randn(8, 4)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    plain.load_state_dict({k: v.float() for k, v in engine.module.state_dict().items()})
    leaf32 = pooled.clone().requires_grad_()
    expected = torch.autograd.grad(plain(leaf32).pow(2).mean(), leaf32)[0]

    leaf = pooled.clone().requires_grad_()
    loss = engine(leaf.half()).float().pow(2).mean()
    seen = watch_loss(loss)
    engine.backward(loss)
    assert float(seen[0]) == 2.0 ** 8 / 2  # the scale DeepSpeed applied, over the accumulation
    torch.testing.assert_close(table_gradient(leaf.grad, seen, 2), expected, rtol=2e-2, atol=1e-4)
