"""Gaussian diffusion over a user's dense slot tensor: noise schedule, forward noising, DDIM.

Random numbers are drawn on the generator's device and moved to the data's, so one CPU
generator gives the same draws whether the model runs on CPU or GPU.

Method section 4. The network predicts x0 directly; sampling is deterministic DDIM (eta = 0)
on a few evenly spaced steps, with evidence slots reset to their observed values after every
step and composited into the output, so evidence comes back bit-exactly.
"""
import math
from typing import Callable

import torch
from torch import Tensor, nn

from umask.config import DiffusionConfig

# The last betas of the cosine schedule blow up near t = T; clipping follows Nichol & Dhariwal.
MAX_BETA = 0.999


def alphas_cumprod(cfg: DiffusionConfig) -> Tensor:
    """abar_t for t = 0..train_steps-1 (float64, decreasing from about 1 toward 0)."""
    steps = cfg.train_steps
    if cfg.schedule == "linear":
        betas = torch.linspace(cfg.linear_beta_start, cfg.linear_beta_end, steps, dtype=torch.float64)
    else:
        s = cfg.cosine_offset
        f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    return torch.cumprod(1 - betas, dim=0)


class Diffusion(nn.Module):
    """Holds the schedule as a buffer so it follows the model across devices and dtypes."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("abar", alphas_cumprod(cfg).float(), persistent=False)

    def training_steps(self, batch: int, generator: torch.Generator) -> Tensor:
        """Training steps t ~ U{0..train_steps-1}; [B] int64."""
        return torch.randint(0, self.cfg.train_steps, (batch,), generator=generator,
                             device=generator.device).to(self.abar.device)

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0 [B,T,F], t [B]."""
        abar = self.abar[t].view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    @torch.no_grad()
    def ddim_sample(self, predict_x0: Callable[[Tensor, Tensor], Tensor], evidence_values: Tensor,
                    evidence: Tensor, steps: int, generator: torch.Generator) -> Tensor:
        """Completes evidence_values [B,T,F] where evidence [B,T] is False.

        predict_x0(x_t, t) -> x0_hat, both [B,T,F], t [B]. Evidence slots of the result are
        evidence_values exactly.
        """
        if not 1 <= steps <= self.cfg.train_steps:
            raise ValueError(f"steps must be in [1, {self.cfg.train_steps}], got {steps}")
        keep = evidence[..., None]  # [B,T,1]
        x = torch.randn(evidence_values.shape, generator=generator, device=generator.device,
                        dtype=evidence_values.dtype).to(evidence_values.device)
        x = torch.where(keep, evidence_values, x)
        timesteps = torch.linspace(self.cfg.train_steps - 1, 0, steps).round().long().tolist()
        for i, step in enumerate(timesteps):
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            x0_hat = predict_x0(x, t)
            abar = self.abar[step]
            abar_prev = self.abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones_like(abar)
            eps_hat = (x - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
            x = abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps_hat
            x = torch.where(keep, evidence_values, x)
        return x
