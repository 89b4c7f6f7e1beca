"""The dense gradients of fp32 ZeRO-0 as views of one flat buffer, averaged over ranks in place.

Without ZeRO and low precision DeepSpeed steps a bare torch optimizer, and its gradient
all-reduce (engine.allreduce_gradients -> buffered_allreduce_fallback) concatenates every
gradient into a new buffer each step, all-reduces it and copies each part back: a fresh
allocation of the model's gradient size and two copies per step (torch.cat alone was 13 ms of a
443 ms base_like step on two ranks, docs/training.md). Here the gradients live in one buffer
allocated once, as DDP's gradient_as_bucket_view does: backward accumulates into the views
in place, and one all-reduce of the buffer averages them with no copy. The engine's own
reduction is switched off (engine.enable_backward_allreduce), so the trainer starts the
all-reduce at each accumulation boundary right after the dense backward, runs the finiteness
check and the tables' backward while it travels, and waits for it before it reads the norm.

A parameter that got no gradient in a step keeps zeros, as DeepSpeed's reduction gives it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class FlatGradients:
    """`attach()` before each backward; at each accumulation boundary `start_all_reduce()` after
    backward and `finish_all_reduce()` before the gradients are read (collective)."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None):
        self.params = [p for p in module.parameters() if p.requires_grad]
        dtypes = {(p.dtype, p.device) for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"one dtype and device for every dense parameter, got {sorted(map(str, dtypes))}")
        self.group = group
        self._pending: dist.Work | None = None
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype,
                                  device=self.params[0].device)  # [total numel]
        self.views, start = [], 0
        for p in self.params:
            self.views.append(self.buffer[start:start + p.numel()].view_as(p))
            start += p.numel()

    def attach(self) -> None:
        """Points every parameter's .grad at its view, zeroed, unless it already is (inside an
        accumulation window). engine.step() sets the gradients to None after each step."""
        if all(p.grad is v for p, v in zip(self.params, self.views)):
            return
        self.buffer.zero_()
        for p, v in zip(self.params, self.views):
            p.grad = v

    def start_all_reduce(self) -> None:
        """Starts averaging every rank's accumulated gradients over the group, in place (collective);
        the trainer runs the finiteness check and the tables' backward meanwhile."""
        self._pending = dist.all_reduce(self.buffer, group=self.group, async_op=True)

    def finish_all_reduce(self) -> None:
        """Waits for `start_all_reduce`'s all-reduce; then every gradient is its mean over ranks."""
        self._pending.wait()
        self._pending = None
        self.buffer.div_(dist.get_world_size(self.group))

    def norm(self) -> torch.Tensor:
        """The 2-norm of all the gradients, a 0-dim float32 tensor: one reduction over the buffer."""
        return torch.linalg.vector_norm(self.buffer).float()
