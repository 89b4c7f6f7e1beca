"""The learned baseline: a masked-autoencoder transformer over U-MASK's slot tokens.

`model.backbone: mae` trains this instead of U-MASK, through the same `u-mask train` path
(Ray, DeepSpeed, the TorchRec tables), so `u-mask eval --baseline-checkpoint RUN` can set a
plain learned model of the same width and depth beside the diffusion model. It is the
BERT4Rec / AETN family (Sun et al. 2019, "BERT4Rec: Sequential Recommendation with
Bidirectional Encoder Representations from Transformer"; Zhao et al. 2020, AETN for app
usage): a bidirectional transformer encoder whose masked tokens are replaced by a learned
[MASK] embedding, trained to regress the masked slots directly. What it does not have:
diffusion (one deterministic forward pass, no noise, no steps), adaptive masks (its masks are
the uniform family of umask/masking.py at the tasks' ratios, whatever model.mask.family says),
U-SCOPE and z_u, the InfoNCE term and the mask-guided attention (every token attends to every
token). What it shares with U-MASK, so that the comparison is about the backbone: the slot
tokens (evidence values, the evidence bit, time of week, the slot's pooled app/loc embedding
and, with model.hour_prior, the user's evidence means per hour), the normalisation by the
spec's train statistics, the per-family weighted error on scored target slots (volume by
absolute error), and, with model.prior_residual, the output as a correction to the same
learned per-channel mix of the prior's hour-of-week and hour-of-day means (umask/dit.py).
"""
from dataclasses import replace

import torch
from torch import Tensor, nn

from umask.config import ModelConfig
from umask.hour_prior import hour_prior_features
from umask.losses import reconstruction_loss
from umask.masking import MaskSample, sample_mask
from umask.normalization import register_channel_buffers
from umask.spec import FeatureSpec


class MaskedAutoencoder(nn.Module):
    """Dense slots [B,T,F] in, the masked slots regressed; the UMask interface the trainer,
    eval and complete call (forward, sample_mask, complete, param_count).

    cfg.hidden, depth, heads and mlp_ratio size a torch.nn.TransformerEncoder (pre-norm, GELU,
    no dropout); cfg.user_dim, attention and diffusion are not read. profile_dim and
    gather_negatives are accepted and unused (no user profile tower, no contrastive term).
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, sparse_dim: int, profile_dim: int = 0,
                 gather_negatives=None):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.num_categories = spec.num_categories
        self.num_regions = spec.num_regions
        self.channels = channels = spec.layout.num_channels
        self.values = nn.Linear(channels + 1, cfg.hidden)  # [evidence values, evidence bit]
        self.mask_token = nn.Parameter(torch.zeros(cfg.hidden))
        self.time_of_week = nn.Embedding(spec.slots_per_week, cfg.hidden)
        self.sparse = nn.Linear(sparse_dim, cfg.hidden, bias=False)
        self.hour_prior = nn.Linear(2 * channels + 3, cfg.hidden) if cfg.hour_prior else None
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, int(cfg.hidden * cfg.mlp_ratio),
                                           dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, norm=nn.LayerNorm(cfg.hidden),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(cfg.hidden, channels)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.time_of_week.weight, std=0.02)
        if cfg.prior_residual:  # the untrained model predicts the prior, as U-MASK's DiT does
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        if cfg.prior_residual:  # the base's per-channel mix of the hour-of-week and hour-of-day means
            self.prior_week_weight = nn.Parameter(torch.ones(channels))
            self.prior_day_weight = nn.Parameter(torch.zeros(channels))
        register_channel_buffers(self, spec, cfg.loss)  # as U-MASK scores and scales its channels

    def sample_mask(self, dense: Tensor, observed: Tensor, time_of_week: Tensor,
                    generator: torch.Generator, task: Tensor | None = None) -> MaskSample:
        """Uniform masks (model.mask with family=uniform), as BERT-style training draws them."""
        return sample_mask(dense, observed, time_of_week, self.spec, replace(self.cfg.mask, family="uniform"),
                           generator, task)

    def forward(self, dense: Tensor, observed: Tensor, time_of_week: Tensor, slot_sparse: Tensor,
                profile: Tensor | None = None, *, generator: torch.Generator,
                mask: MaskSample | None = None) -> dict[str, Tensor]:
        """Training loss for one batch: the per-family weighted MSE of the regressed target slots
        that hold a record (umask/losses.py). dense [B,T,F], observed [B,T] bool, time_of_week
        [B,T] int, slot_sparse [B,T,E]; the mask is drawn from generator unless given."""
        if mask is None:
            mask = self.sample_mask(dense, observed, time_of_week, generator)
        scaled = self._normalise(dense)
        prediction = self.regress(scaled, mask.evidence, time_of_week, slot_sparse)
        scored = mask.target & observed
        reconstruction = reconstruction_loss(prediction, scaled, scored, self.loss_weights, self.absolute_error)
        return {"loss": reconstruction, "reconstruction": reconstruction.detach(),
                "consistency": torch.zeros_like(reconstruction).detach(), "scored_slots": scored.sum(),
                "evidence_slots": mask.evidence.sum()}

    @torch.no_grad()
    def complete(self, dense: Tensor, evidence: Tensor, time_of_week: Tensor, slot_sparse: Tensor,
                 profile: Tensor | None = None, *, steps: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Every non-evidence slot regressed in one pass; evidence slots come back bit-exactly;
        [B,T,F] in the dense layout. steps and generator are accepted for UMask's interface
        and not used: the completion is deterministic."""
        scaled = self._normalise(dense)
        completed = self.regress(scaled, evidence, time_of_week, slot_sparse).float()
        return torch.where(evidence[..., None], dense, completed * self.channel_scale + self.channel_shift)

    def regress(self, scaled: Tensor, evidence: Tensor, time_of_week: Tensor, slot_sparse: Tensor) -> Tensor:
        """The normalised slots [B,T,F] predicted from the evidence slots of `scaled` only."""
        dtype = self.head.weight.dtype
        bit = evidence[..., None].to(dtype)  # [B,T,1]
        values = torch.where(evidence[..., None], scaled, torch.zeros_like(scaled)).to(dtype)
        tokens = (self.values(torch.cat([values, bit], -1)) + (1 - bit) * self.mask_token
                  + self.time_of_week(time_of_week.long()) + self.sparse(slot_sparse.to(dtype) * bit))
        prior = None
        if self.hour_prior is not None:
            prior = hour_prior_features(values, evidence, time_of_week, self.spec.slots_per_day)
            tokens = tokens + self.hour_prior(prior)
        out = self.head(self.encoder(tokens))  # [B,T,F]
        if self.cfg.prior_residual:  # as U-MASK's DiT.residual_base: starts at the hour-of-week mean
            f = self.channels
            out = out + self.prior_week_weight * prior[..., :f] + self.prior_day_weight * prior[..., f: 2 * f]
        return out

    def param_count(self) -> dict[str, int]:
        """Parameters of the encoder and in total."""
        encoder = sum(p.numel() for p in self.encoder.parameters())
        return {"mae_encoder": encoder, "total": sum(p.numel() for p in self.parameters())}

    def _normalise(self, dense: Tensor) -> Tensor:
        """(x - shift) / scale in float32 (umask/normalization.py)."""
        return (dense.float() - self.channel_shift) / self.channel_scale
