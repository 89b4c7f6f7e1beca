"""The dense gradients as views of one buffer, averaged in place (trainer/training/flat_grads.py),
on two real gloo ranks against the gradients each rank computes the plain way."""
import numpy as np
import pytest

from gloo_ranks import run_ranks, values

pytestmark = pytest.mark.slow


def _model():
    import torch

    torch.manual_seed(0)  # the same weights on both ranks
    return torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(2, 2)})


def _loss(model, rank: int, micro: int):
    import torch

    x = torch.arange(6, dtype=torch.float32).view(2, 3) * (rank + 1) + micro  # differs per rank
    return model["used"](x).pow(2).sum()


def _flat_against_plain(rank: int) -> dict:
    import torch
    import torch.distributed as dist

    from trainer.training.flat_grads import FlatGradients

    plain = _model()
    for micro in range(2):  # two micro-batches accumulated, then averaged over ranks
        _loss(plain, rank, micro).backward()
    expected = {}
    for name, p in plain.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        expected[name] = (grad / dist.get_world_size()).tolist()

    model = _model()
    flat = FlatGradients(model)
    out = {"expected": expected, "steps": []}
    for step in range(2):
        for micro in range(2):
            flat.attach()
            _loss(model, rank, micro).backward()
        flat.start_all_reduce()
        flat.finish_all_reduce()
        out["steps"].append({"grads": {name: p.grad.tolist() for name, p in model.named_parameters()},
                             "views": all(p.grad.data_ptr() >= flat.buffer.data_ptr() for p in model.parameters()),
                             "norm": float(flat.norm()),
                             "plain_norm": float(torch.nn.utils.get_total_norm(
                                 [p.grad for p in model.parameters()]))})
        for p in model.parameters():  # what engine.step() does after the optimizer's step
            p.grad = None
    return out


def test_gradients_are_the_mean_over_ranks_of_each_ranks_accumulated_ones():
    out = values(run_ranks(_flat_against_plain, 2))
    for rank in (0, 1):
        expected = out[rank]["expected"]
        assert out[rank]["expected"] == out[0]["expected"]  # both ranks agree on the mean
        assert expected["unused.weight"] == [[0.0, 0.0], [0.0, 0.0]]  # no gradient: zeros, as DeepSpeed gives
        for step in out[rank]["steps"]:  # the second step starts from zeros again after the reset
            assert step["views"]
            for name, grad in step["grads"].items():
                np.testing.assert_allclose(grad, expected[name], rtol=1e-6, err_msg=f"rank {rank} {name}")
            assert step["norm"] == pytest.approx(step["plain_norm"], rel=1e-6)
