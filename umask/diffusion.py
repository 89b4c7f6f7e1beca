"""Gaussian diffusion over a user's dense slot tensor: noise schedule, forward noising, DDIM.

Method section 4. The network predicts x0 directly; sampling is deterministic DDIM (eta = 0)
on a few evenly spaced steps, with evidence slots reset to their observed values after every
step and composited into the output, so evidence comes back bit-exactly.

Random numbers are drawn on the generator's device and moved to the data's, so one CPU
generator gives the same draws whether the model runs on CPU or GPU.
"""
import math
from typing import Callable

import torch
from torch import Tensor

from umask.config import DiffusionConfig

# The last betas of the cosine schedule blow up near t = T; clipping follows Nichol & Dhariwal.
MAX_BETA = 0.999


def alphas_cumprod(cfg: DiffusionConfig) -> Tensor:
    """abar_t for t = 0..train_steps-1 (float64 on the CPU, decreasing from about 1 toward 0).

    On the CPU whatever the default device, so a model built on "meta" still has its schedule."""
    steps = cfg.train_steps
    if cfg.schedule == "linear":
        betas = torch.linspace(cfg.linear_beta_start, cfg.linear_beta_end, steps, dtype=torch.float64,
                               device="cpu")
    else:
        s = cfg.cosine_offset
        t = torch.arange(steps + 1, dtype=torch.float64, device="cpu")
        f = torch.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    return torch.cumprod(1 - betas, dim=0)


class Diffusion:
    """The schedule and its two uses: noising for training, DDIM for completion.

    Not an nn.Module on purpose: the schedule must stay float32 (or better) when DeepSpeed
    casts the model to bf16/fp16, which would round 1 - abar_t to 0 at small t.
    """

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.abar = alphas_cumprod(cfg)  # float64, on the CPU
        self._abar = self.abar.tolist()  # the same values as Python floats, for DDIM
        self._abar_on_device: dict[torch.device, Tensor] = {}

    def abar_on(self, device: torch.device) -> Tensor:
        """The schedule as float32 on `device`, copied there once."""
        device = torch.device(device)
        if device not in self._abar_on_device:
            self._abar_on_device[device] = self.abar.float().to(device)
        return self._abar_on_device[device]

    def training_steps(self, batch: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """Training steps t ~ U{0..train_steps-1} on `device`, or, with cfg.train_on_sample_steps,
        uniform over ddim_timesteps(cfg.sample_steps); [B] int64."""
        if self.cfg.train_on_sample_steps:
            steps = torch.tensor(self.ddim_timesteps(self.cfg.sample_steps))
            pick = torch.randint(0, len(steps), (batch,), generator=generator, device=generator.device)
            return steps[pick.cpu()].to(device)
        return torch.randint(0, self.cfg.train_steps, (batch,), generator=generator,
                             device=generator.device).to(device)

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise in float32, returned in x0's dtype;
        x0, noise [B,T,F], t [B]."""
        abar = self.abar_on(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))  # [B,1,1]
        return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(x0.dtype)

    def ddim_timesteps(self, steps: int) -> list[int]:
        """The `steps` schedule steps DDIM visits, evenly spaced from train_steps - 1 down to 0."""
        if not 1 <= steps <= self.cfg.train_steps:
            raise ValueError(f"steps must be in [1, {self.cfg.train_steps}], got {steps}")
        return torch.linspace(self.cfg.train_steps - 1, 0, steps, device="cpu").round().long().tolist()

    @torch.no_grad()
    def ddim_from_noise(self, predict_x0: Callable[[Tensor, Tensor], Tensor], evidence_values: Tensor,
                        evidence: Tensor, noise: Tensor, timesteps: list[int]) -> Tensor:
        """Deterministic DDIM (eta = 0) from x_T = noise [B,T,F] over `timesteps` (ddim_timesteps).

        predict_x0(x_t, t) -> x0_hat, both [B,T,F], t [B]; the update runs in float32
        whatever dtype the predictor computes in. Evidence slots of the result are
        evidence_values exactly (as float32). The schedule enters as Python floats, so
        torch.export traces this loop into a graph with constants (no data-dependent reads).
        """
        keep = evidence[..., None]  # [B,T,1]
        known = evidence_values.float()
        x = torch.where(keep, known, noise.float())
        for i, step in enumerate(timesteps):
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            x0_hat = predict_x0(x.to(evidence_values.dtype), t).float()
            abar = self._abar[step]
            abar_prev = self._abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            eps_hat = (x - abar ** 0.5 * x0_hat) / (1 - abar) ** 0.5
            x = abar_prev ** 0.5 * x0_hat + (1 - abar_prev) ** 0.5 * eps_hat
            x = torch.where(keep, known, x)
        return x
