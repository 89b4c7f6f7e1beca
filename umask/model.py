"""UMask: U-SCOPE + adaptive mask + DiT + diffusion composed into one trainable module.

The trainer calls `forward` for the loss and `complete` to fill a user's non-evidence slots.
No process groups here: cross-rank negatives for InfoNCE come in through `gather_negatives`.
"""
from typing import Callable

import torch
from torch import Tensor, nn

from umask.config import ModelConfig
from umask.diffusion import Diffusion
from umask.dit import DiT
from umask.losses import info_nce, reconstruction_loss
from umask.masking import MaskSample, sample_mask
from umask.normalization import register_channel_buffers
from umask.spec import FeatureSpec
from umask.uscope import UScope


def no_extra_negatives(z: Tensor) -> Tensor:
    return z.new_zeros((0, z.shape[1]))


class UMask(nn.Module):
    """The U-MASK model for dense slots [B,T,F] with F = (C+1) + (K+1) + 2 channels.

    The feature spec (umask/spec.py) sizes it: C, K and the dense layout, the slots per day
    (U-SCOPE's days, the hour prior) and per week (the range of time_of_week). T may be any
    window length. gather_negatives(z_long [B,U]) -> [M,U] returns the OTHER ranks' long views
    (the trainer all-gathers and drops its own rows); the default adds none, right on one rank.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, sparse_dim: int, profile_dim: int = 0,
                 gather_negatives: Callable[[Tensor], Tensor] = no_extra_negatives):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.num_categories = spec.num_categories
        self.num_regions = spec.num_regions
        self.channels = spec.layout.num_channels
        self.gather_negatives = gather_negatives
        self.uscope = UScope(self.channels, sparse_dim, cfg.user_dim, spec.slots_per_day, profile_dim)
        self.dit = DiT(self.channels, sparse_dim, cfg.user_dim, cfg.hidden, cfg.depth, cfg.heads,
                       cfg.mlp_ratio, cfg.attention, spec.slots_per_day, cfg.hour_prior, cfg.prior_residual)
        self.diffusion = Diffusion(cfg.diffusion)
        # loss weights, and x_model = (x - channel_shift) / channel_scale from the spec's train
        # statistics (umask/normalization.py), so every holder of the spec normalises alike
        register_channel_buffers(self, spec, cfg.loss)

    def sample_mask(self, dense: Tensor, observed: Tensor, time_of_week: Tensor,
                    generator: torch.Generator, task: Tensor | None = None) -> MaskSample:
        return sample_mask(dense, observed, time_of_week, self.spec, self.cfg.mask, generator, task)

    def forward(self, dense: Tensor, observed: Tensor, time_of_week: Tensor, slot_sparse: Tensor,
                profile: Tensor | None = None, *, generator: torch.Generator,
                mask: MaskSample | None = None) -> dict[str, Tensor]:
        """Training loss for one batch; draws the mask (unless given), step and noise from generator.

        dense [B,T,F] float, observed [B,T] bool, time_of_week [B,T] int, slot_sparse [B,T,E].
        """
        self._check_shapes(dense, observed, time_of_week, slot_sparse)
        if mask is None:
            mask = self.sample_mask(dense, observed, time_of_week, generator)
        scaled, slot_sparse, profile = self._model_inputs(dense, slot_sparse, profile)
        z_short, z_long = self.uscope.views(scaled, slot_sparse, time_of_week, mask.evidence,
                                            self.cfg.short_view_slots, profile)
        # Only target slots are diffused; every other non-evidence slot starts from x0 = 0 so
        # slots outside the target window cannot leak values the evidence does not hold.
        x0 = torch.where(mask.target[..., None], scaled, torch.zeros_like(scaled))
        t = self.diffusion.training_steps(dense.shape[0], generator, dense.device)
        noise = torch.randn(dense.shape, generator=generator, device=generator.device,
                            dtype=scaled.dtype).to(dense.device)
        x_t = self.diffusion.add_noise(x0, t, noise)
        x0_hat = self.dit(x_t, t, z_long, scaled, mask.evidence, time_of_week, slot_sparse)
        scored = mask.target & observed
        reconstruction = reconstruction_loss(x0_hat, scaled, scored, self.loss_weights, self.absolute_error)
        consistency = info_nce(z_short, z_long, self.gather_negatives(z_long),
                               self.cfg.loss.infonce_temperature)
        loss = reconstruction + self.cfg.loss.consistency_weight * consistency
        return {"loss": loss, "reconstruction": reconstruction.detach(),
                "consistency": consistency.detach(), "scored_slots": scored.sum(),
                "evidence_slots": mask.evidence.sum()}

    @torch.no_grad()
    def complete(self, dense: Tensor, evidence: Tensor, time_of_week: Tensor, slot_sparse: Tensor,
                 profile: Tensor | None = None, *, steps: int | None = None,
                 generator: torch.Generator) -> Tensor:
        """Fills every non-evidence slot by DDIM; evidence slots come back bit-exactly; [B,T,F].

        Draws the starting noise [B,T,F] from generator (on its device), then runs
        `complete_from_noise` with `steps` DDIM steps (default: model.diffusion.sample_steps).
        """
        self._check_shapes(dense, evidence, time_of_week, slot_sparse)
        noise = torch.randn(dense.shape, generator=generator, device=generator.device).to(dense.device)
        timesteps = self.diffusion.ddim_timesteps(steps or self.cfg.diffusion.sample_steps)
        return self.complete_from_noise(dense, evidence, time_of_week, slot_sparse, noise, timesteps, profile)

    @torch.no_grad()
    def complete_from_noise(self, dense: Tensor, evidence: Tensor, time_of_week: Tensor, slot_sparse: Tensor,
                            noise: Tensor, timesteps: list[int], profile: Tensor | None = None) -> Tensor:
        """The completion as a deterministic function of the starting noise [B,T,F] float32 and
        the DDIM steps (Diffusion.ddim_timesteps): what the export bundle's program computes."""
        self._check_shapes(dense, evidence, time_of_week, slot_sparse)
        scaled, slot_sparse, profile = self._model_inputs(dense, slot_sparse, profile)
        z_u = self.uscope(scaled, slot_sparse, time_of_week, evidence, profile)  # [B,U]
        evidence_values = torch.where(evidence[..., None], scaled, torch.zeros_like(scaled))

        def predict_x0(x_t: Tensor, t: Tensor) -> Tensor:
            return self.dit(x_t, t, z_u, evidence_values, evidence, time_of_week, slot_sparse)

        completed = self.diffusion.ddim_from_noise(predict_x0, evidence_values, evidence, noise, timesteps)
        # Composite the caller's values, not scaled-and-back ones, so evidence is bit-exact.
        return torch.where(evidence[..., None], dense, completed * self.channel_scale + self.channel_shift)

    @torch.no_grad()
    def user_embedding(self, dense: Tensor, evidence: Tensor, time_of_week: Tensor, slot_sparse: Tensor,
                       profile: Tensor | None = None) -> Tensor:
        """z_u [B,U] from the evidence slots, as the DiT sees it (for export and analysis)."""
        self._check_shapes(dense, evidence, time_of_week, slot_sparse)
        scaled, slot_sparse, profile = self._model_inputs(dense, slot_sparse, profile)
        return self.uscope(scaled, slot_sparse, time_of_week, evidence, profile)

    def param_count(self) -> dict[str, int]:
        """Parameters per part and in total (works on a meta-device model)."""
        parts = {"uscope": self.uscope, "dit": self.dit}
        counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        counts["total"] = sum(counts.values())
        return counts

    def _model_inputs(self, dense: Tensor, slot_sparse: Tensor,
                      profile: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Normalised dense values (x - shift) / scale and the float inputs in the model's dtype:
        the loader gives float32 while DeepSpeed may hold the weights (and these buffers) in
        bf16 or fp16, so the normalisation runs in float32."""
        dtype = self.channel_scale.dtype
        profile = profile.to(dtype) if profile is not None else None
        scaled = (dense.float() - self.channel_shift.float()) / self.channel_scale.float()
        return scaled.to(dtype), slot_sparse.to(dtype), profile

    def _check_shapes(self, dense: Tensor, slots_mask: Tensor, time_of_week: Tensor,
                      slot_sparse: Tensor) -> None:
        if dense.dim() != 3 or dense.shape[-1] != self.channels:
            raise ValueError(f"dense must be [B,T,{self.channels}] (C={self.num_categories}, "
                             f"K={self.num_regions}), got {tuple(dense.shape)}")
        if slots_mask.shape != dense.shape[:2] or slots_mask.dtype != torch.bool:
            raise ValueError(f"masks must be bool [B,T]={tuple(dense.shape[:2])}, got "
                             f"{slots_mask.dtype} {tuple(slots_mask.shape)}")
        if time_of_week.shape != dense.shape[:2] or slot_sparse.shape[:2] != dense.shape[:2]:
            raise ValueError(f"time_of_week and slot_sparse must start with [B,T]={tuple(dense.shape[:2])}")
