"""Undo, for the embedding tables, the gradient scaling DeepSpeed applies for the dense model.

DeepSpeed's `engine.backward` scales the loss by 1/gradient_accumulation_steps (and by the
fp16 loss scale). That is right for the dense gradients, which it accumulates, unscales and
steps once per `gradient_accumulation_steps` micro-batches. The tables' fused optimizers
instead step inside every backward, so they would see every micro-batch's gradient shrunk by
the accumulation factor and inflated by the (changing) loss scale. Our choice: each
micro-batch steps the tables with that micro-batch's true mean-loss gradient, the same update
it would get without accumulation or loss scaling. `unscaled_for_tables` is the identity in
forward and multiplies the gradient flowing into the tables by accumulation / loss scale.
"""
from __future__ import annotations

from typing import Callable

import torch


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: Callable[[], float]) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # the factor is read at backward time: the fp16 loss scale may have changed since forward
        return grad * ctx.factor(), None


def unscaled_for_tables(pooled: torch.Tensor, engine) -> torch.Tensor:
    """`pooled` (the tables' output) unchanged; its gradient undoes the engine's loss scaling."""
    accumulation = engine.gradient_accumulation_steps()

    def factor() -> float:
        return accumulation / _loss_scale(engine)

    return _ScaleGrad.apply(pooled, factor)


def _loss_scale(engine) -> float:
    # fp16 engines expose the dynamic scale on their optimizer; fp32 and bf16 use none
    if not engine.fp16_enabled():
        return 1.0
    return float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 1.0)))
