"""Non-finite losses and gradients: caught on every rank before any weight moves.

Where weights move in a training step (trainer/training/loop.py):
1. the dense backward (`engine.backward`) only computes gradients; DeepSpeed keeps them;
2. then the tables' backward runs, and their fused optimizers step inside it;
3. then `engine.step()` steps the dense model, at accumulation boundaries.
`NonFiniteGuard.check` runs between 1 and 2 on every micro-batch: each rank contributes whether
its loss, the gradient flowing into the tables, and its own dense parameters' gradients (seen
by tensor hooks as backward produces them) are finite, and one all-reduce gives every rank every
rank's answer, so all ranks decide alike:
- all finite: the tables step.
- a non-finite loss anywhere, or non-finite gradients under fp32/bf16: the tables do not step
  and the optimizer step this micro-batch belongs to is skipped on every rank. DeepSpeed skips
  the dense step itself wherever it has a wrapper that checks (fp16, bf16 with
  check_grad_overflow, ZeRO 1-3 through their gradient norm); for fp32 without ZeRO (a bare
  torch optimizer) `dense_step` keeps that optimizer's step from running, so torch's AdamW
  leaves every weight and moment as it was. train.nonfinite=stop raises a UserError instead,
  naming the users and windows of the batches at fault; under skip, train.nonfinite_patience
  skipped steps in a row stop the run the same way (a diverged model would skip forever).
- fp16 with a finite loss but overflowing (scaled) gradients is the loss scaler's business:
  DeepSpeed skips the step and lowers the scale; the tables do not step either. Counted
  apart, as loss-scale skips.
Under gradient accumulation the tables step per micro-batch (trainer/training/sparse_grad.py):
micro-batches of a skipped step that came before the bad one have stepped the tables already.

Cost: one float32 sum per gradient as backward produces it (`_finite_sum`: finite exactly when
every value is), then one all-reduce of 3 x world_size flags (none on one rank) and one copy to
the host per micro-batch, so each step waits for the device once (the metrics still cross ranks
only on logged steps).
"""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import torch
import torch.distributed as dist

from umask.errors import UserError

_SHOWN_USERS = 8


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one micro-batch's check found, the same on every rank."""
    bad_loss: tuple[int, ...]  # ranks whose loss was not finite
    bad_grads: tuple[int, ...]  # ranks whose dense or table gradients were not finite
    bad_inputs: tuple[int, ...]  # ranks whose batch holds non-finite dense values
    loss_scale_overflow: bool  # fp16: only gradients overflowed, the loss scaler's skip

    @property
    def tables_step(self) -> bool:
        return not (self.bad_loss or self.bad_grads)

    @property
    def nonfinite(self) -> bool:
        """A skip (or stop) of the guard's own, not the fp16 loss scaler's."""
        return not self.tables_step and not self.loss_scale_overflow


class NonFiniteGuard:
    """One rank's guard over an engine's dense parameters; `check` is collective.

    `step_outcome()` (after the accumulation boundary's engine.step) says whether the optimizer
    step was skipped, and why: None, "nonfinite" or "loss_scale".
    """

    def __init__(self, engine, policy: str, patience: int, fp16: bool, bare_fp32: bool):
        self.engine = engine
        self.policy = policy
        self.patience = patience
        self.fp16 = fp16
        self.bare_fp32 = bare_fp32  # fp32 without ZeRO: DeepSpeed steps a bare torch optimizer
        self._local_sum: torch.Tensor | None = None  # this micro-batch's dense gradients summed, on the device
        self._window: str | None = None  # the current optimizer step's skip reason so far
        self.consecutive = 0  # guard skips in a row
        for param in engine.module.parameters():
            if param.requires_grad:
                param.register_hook(self._observe)

    def _observe(self, grad: torch.Tensor) -> None:
        total = _finite_sum(grad)
        self._local_sum = total if self._local_sum is None else self._local_sum + total

    def check(self, step: int, loss: torch.Tensor, table_grad: torch.Tensor | None, batch) -> Verdict:
        """After the dense backward, before the tables step (collective: every rank, every micro-batch).

        Raises UserError under train.nonfinite=stop, or when the patience is used up."""
        rank, world = dist.get_rank(), dist.get_world_size()
        device = loss.device
        grads = torch.zeros((), dtype=torch.float32, device=device)
        if table_grad is not None:
            grads = grads + _finite_sum(table_grad)
        if self._local_sum is not None:
            grads = grads + self._local_sum.to(device)
        self._local_sum = None
        sums = torch.stack([_finite_sum(loss.detach()), grads, _finite_sum(batch.dense)])  # [3]
        flags = torch.zeros(world, 3, dtype=torch.float32, device=device)
        flags[rank] = (~torch.isfinite(sums)).float()
        if world > 1:
            dist.all_reduce(flags)
        per_rank = flags.tolist()
        verdict = Verdict(bad_loss=tuple(r for r in range(world) if per_rank[r][0]),
                          bad_grads=tuple(r for r in range(world) if per_rank[r][1]),
                          bad_inputs=tuple(r for r in range(world) if per_rank[r][2]),
                          loss_scale_overflow=False)
        if verdict.bad_grads and not verdict.bad_loss and self.fp16:
            verdict = dataclasses.replace(verdict, loss_scale_overflow=True)
        if verdict.nonfinite:
            self._window = "nonfinite"
            if self.policy == "stop":
                raise UserError(self._describe(step, verdict, batch, rank) + "; train.nonfinite=stop "
                                "ended the run (no weight took this step: resume from the latest checkpoint "
                                "after fixing the cause, or set train.nonfinite=skip)")
        elif verdict.loss_scale_overflow and self._window is None:
            self._window = "loss_scale"
        if not verdict.tables_step:
            print(f"{self._describe(step, verdict, batch, rank)}; the step is skipped on every rank", flush=True)
        return verdict

    def dense_step(self) -> None:
        """engine.step(), at every micro-batch; at an accumulation boundary of a skipped step a bare
        fp32 optimizer (no ZeRO, no fp16/bf16 wrapper to check for it) takes no step: the engine
        still clips, clears the gradients and counts the step, but torch's AdamW is not called,
        so every weight and moment stays as it was. DeepSpeed's wrappers skip it themselves."""
        if self._window is None or not self.bare_fp32 or not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return
        optimizer = self.engine.optimizer
        optimizer.step = lambda *args, **kwargs: None  # shadows the class's step for this call only
        try:
            self.engine.step()
        finally:
            del optimizer.step

    def step_outcome(self, step: int, batch) -> str | None:
        """After the boundary's engine.step(): why this optimizer step was skipped, or None."""
        reason, self._window = self._window, None
        if reason is None and getattr(self.engine.optimizer, "overflow", False):
            # DeepSpeed found an overflow no rank's local gradients showed (a sum that overflowed
            # in the reduction); the dense step was skipped, the tables had stepped already
            print(f"step {step}: DeepSpeed skipped the dense step for an overflow in the reduced "
                  "gradients; the tables stepped", flush=True)
            reason = "loss_scale"
        if reason == "nonfinite":
            self.consecutive += 1
            if self.consecutive >= self.patience:
                raise UserError(f"step {step}: {self.consecutive} steps in a row had a non-finite loss or "
                                f"gradients (train.nonfinite_patience={self.patience}), the last one's batch "
                                f"on rank {dist.get_rank()}: {describe_batch(batch)}; the model has probably "
                                "diverged: lower deepspeed.lr or embeddings.lr and resume from a checkpoint")
        else:
            self.consecutive = 0
        return reason

    @staticmethod
    def _describe(step: int, verdict: Verdict, batch, rank: int) -> str:
        """What was not finite where; names this rank's batch if it is a culprit: a batch with
        non-finite inputs, or, when no batch has any, a batch whose loss or gradients were not
        finite (other ranks' rows reach every rank's loss as InfoNCE negatives)."""
        what = []
        if verdict.bad_inputs:
            what.append(f"non-finite input values in the batch of rank {_ranks(verdict.bad_inputs)}")
        if verdict.bad_loss:
            what.append(f"non-finite loss on rank {_ranks(verdict.bad_loss)}")
        if verdict.bad_grads:
            kind = "overflowing fp16 gradients" if verdict.loss_scale_overflow else "non-finite gradients"
            what.append(f"{kind} on rank {_ranks(verdict.bad_grads)}")
        line = f"step {step}: {', '.join(what)}"
        culprits = verdict.bad_inputs or tuple(sorted(set(verdict.bad_loss) | set(verdict.bad_grads)))
        if rank in culprits:
            line += f"; this rank's batch: {describe_batch(batch)}"
        return line


def _finite_sum(values: torch.Tensor) -> torch.Tensor:
    """A 0-dim float32 sum of `values` (any float dtype, summed in float32) that is finite exactly
    when every value is, short of a float32 overflow of the sum (about 3.4e38, a gradient already
    past any use): NaN propagates and inf + -inf is NaN (IEEE 754). One read of the tensor, where
    `isfinite(x).all()` writes a boolean of x's size first and reads it back (12.7 ms against
    0.35 ms for 5 M values on one core here)."""
    return values.sum(dtype=torch.float32)


def _ranks(ranks: tuple[int, ...]) -> str:
    return ", ".join(map(str, ranks))


def describe_batch(batch) -> str:
    """The users and windows of a batch, for a message: 'users 3, 17 (2 examples), windows ...'."""
    users = [int(u) for u in batch.user_id.tolist()]
    starts = [int(s) for s in batch.window_start.tolist()]
    pairs = list(dict.fromkeys(zip(users, starts)))
    shown = ", ".join(f"user {u} window {_iso(s)}" for u, s in pairs[:_SHOWN_USERS])
    more = f" and {len(pairs) - _SHOWN_USERS} more" if len(pairs) > _SHOWN_USERS else ""
    return f"{shown}{more} ({len(users)} examples)"


def _iso(epoch_seconds: int) -> str:
    return datetime.fromtimestamp(epoch_seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
