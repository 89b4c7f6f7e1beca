"""Undo, for the embedding tables, the gradient scaling DeepSpeed applies for the dense model.

DeepSpeed's `engine.backward` scales the loss by 1/gradient_accumulation_steps (and, under
fp16 with ZeRO, by the loss scale). That is right for the dense gradients, which it
accumulates, unscales and steps once per `gradient_accumulation_steps` micro-batches. The
tables' fused optimizers instead step inside every backward of theirs, so they would see every
micro-batch's gradient shrunk by the accumulation factor and inflated by the (changing) loss
scale. Our choice: each micro-batch steps the tables with that micro-batch's true mean-loss
gradient, the same update it would get without accumulation or loss scaling.

The training step runs the two backwards one after the other (trainer/training/loop.py): the
dense model's first, into a leaf that stands for the tables' output, then, once the gradients
are known to be finite (trainer/training/guard.py), the tables' with `table_gradient` of that
leaf's gradient. The factor undone is the one DeepSpeed's backward actually applied, read off
the gradient it sent into the loss (`watch_loss`), not the one its optimizer reports: DeepSpeed
0.19 scales the loss only for its ZeRO optimizers, and its fp16 optimizer without ZeRO still
reports a scale of 65536 that no gradient was multiplied by.
"""
from __future__ import annotations

import math

import torch


def watch_loss(loss: torch.Tensor) -> list[torch.Tensor]:
    """A list that receives the gradient backward sends into `loss` (register before backward)."""
    seen: list[torch.Tensor] = []
    loss.register_hook(lambda grad: seen.append(grad.detach()))
    return seen


def table_gradient(grad: torch.Tensor, loss_grads: list[torch.Tensor], accumulation: int) -> torch.Tensor:
    """The gradient at the tables' output as DeepSpeed's backward left it -> the micro-batch's true one.

    loss_grads: what `watch_loss` saw, the loss scale over the accumulation steps. Loss scales
    are powers of two, so the scale is recovered exactly even where the loss's own dtype
    (bf16, fp16) rounded the quotient."""
    if not loss_grads:
        return grad
    applied = float(loss_grads[-1].float()) * accumulation  # the loss scale backward applied
    if math.isfinite(applied) and applied > 0:
        applied = 2.0 ** round(math.log2(applied))
    return grad * (accumulation / applied)
