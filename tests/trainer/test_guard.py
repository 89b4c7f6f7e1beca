"""train.nonfinite=stop and the patience of skip, on a real DeepSpeed engine in a spawned gloo rank.

(Skipping, on every ZeRO stage and precision with the real Trainer on two ranks, is
tests/trainer/test_engines.py's.)
"""
from types import SimpleNamespace

import pytest

from gloo_ranks import run_ranks, values

pytestmark = pytest.mark.slow


def _engine():
    import deepspeed
    import torch

    from trainer.config import DeepSpeedConfig
    from trainer.training.deepspeed_config import deepspeed_config

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    engine, *_ = deepspeed.initialize(model=dense, model_parameters=dense.parameters(),
                                      config=deepspeed_config(DeepSpeedConfig(), 2, use_gpu=False))
    return engine


def _batch(bad: bool):
    """Two examples with their users and windows; `bad`: a NaN among the dense inputs."""
    import torch

    dense = torch.ones(2, 4)
    if bad:
        dense[1, 2] = float("nan")
    return SimpleNamespace(user_id=torch.tensor([41, 42]), window_start=torch.tensor([1_700_000_000, 1_700_604_800]),
                           dense=dense)


def _step(engine, guard, step: int, bad: bool):
    """One training step as the loop runs it, on a batch whose loss is NaN when `bad`."""
    batch = _batch(bad)
    loss = engine(batch.dense).pow(2).mean()
    engine.backward(loss)
    guard.check(step, loss, None, batch)
    guard.dense_step()
    return guard.step_outcome(step, batch)


def _policies(rank: int) -> dict:
    import torch

    from trainer.training.guard import NonFiniteGuard
    from umask.errors import UserError

    out = {}
    engine = _engine()
    weights = [p.detach().clone() for p in engine.module.parameters()]
    stop = NonFiniteGuard(engine, "stop", patience=10, fp16=False, bare_fp32=True)
    try:
        _step(engine, stop, 1, bad=True)
    except UserError as err:
        out["stop"] = str(err)
    out["unchanged_after_stop"] = all(torch.equal(a, b) for a, b in zip(weights, engine.module.parameters()))

    engine = _engine()
    patient = NonFiniteGuard(engine, "skip", patience=2, fp16=False, bare_fp32=True)
    out["outcomes"] = [_step(engine, patient, 1, bad=True), _step(engine, patient, 2, bad=False),
                       _step(engine, patient, 3, bad=True)]  # a good step resets the count
    try:
        _step(engine, patient, 4, bad=True)
    except UserError as err:
        out["patience"] = str(err)
    out["finite"] = all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())
    return out


def test_stop_names_the_batch_and_patience_ends_a_run_of_skips():
    out = values(run_ranks(_policies, 1))[0]
    assert out["stop"].startswith("step 1: non-finite input values in the batch of rank 0, non-finite loss on rank 0")
    assert "user 41 window 2023-11-14T22:13Z, user 42 window 2023-11-21T22:13Z (2 examples)" in out["stop"]
    assert "train.nonfinite=stop ended the run" in out["stop"]
    assert out["unchanged_after_stop"]
    assert out["outcomes"] == ["nonfinite", None, "nonfinite"]
    assert out["patience"].startswith("step 4: 2 steps in a row had a non-finite loss or gradients "
                                      "(train.nonfinite_patience=2)")
    assert "user 41" in out["patience"] and out["finite"]
