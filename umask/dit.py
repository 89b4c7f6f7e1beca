"""The diffusion transformer that completes a user's slots under the mask (method section 4).

Reads like facebookresearch/DiT models.py: tokens are time slots; conditioning c = step
embedding + projection of z_u enters every block through adaLN-Zero; the network predicts
x0. Every block's attention is the mask-guided op of umask.kernels, run on tokens sorted
evidence-first once at the embedder so "evidence keys" is a per-sample prefix.
"""
import math

import torch
from torch import Tensor, nn

from umask.hour_prior import hour_prior_features
from umask.kernels import mask_guided_attention
from umask.kernels.sorting import evidence_first_permutation, permute_tokens, unpermute_tokens


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Embeds diffusion steps with sinusoidal frequencies followed by an MLP."""

    def __init__(self, hidden: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                                 device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # [B, dim/2]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]

    def forward(self, t: Tensor) -> Tensor:
        frequencies = self.timestep_embedding(t, self.frequency_size)  # float32 for precision
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class SlotEmbedder(nn.Module):
    """Turns each slot into a token; only evidence slots contribute values or sparse embeddings.

    Token input = [noisy channels of generated slots, evidence values, mask bit]
    + time-of-week embedding + projection of the slot's pooled app/location embedding
    [+ projection of the user's evidence means at the slot's hour of week and day, with
    their counts, when hour_prior is on: the hour-of-week baseline's input, handed over
    instead of left for attention to rediscover from scattered evidence tokens].
    """

    def __init__(self, channels: int, sparse_dim: int, hidden: int, slots_per_week: int,
                 hour_prior: bool = False):
        super().__init__()
        self.values = nn.Linear(2 * channels + 1, hidden)
        self.time_of_week = nn.Embedding(slots_per_week, hidden)
        self.sparse = nn.Linear(sparse_dim, hidden, bias=False)
        # A module of its own (not wider `values`) so checkpoints without it still load.
        self.hour_prior = nn.Linear(2 * channels + 3, hidden) if hour_prior else None

    def forward(self, x_t: Tensor, evidence_values: Tensor, evidence: Tensor, time_of_week: Tensor,
                slot_sparse: Tensor, prior: Tensor | None = None) -> Tensor:
        """prior: hour_prior_features [B,T,2F+3] when hour_prior is on, else None."""
        bit = evidence[..., None].to(x_t.dtype)  # [B,T,1]
        values = torch.cat([x_t * (1 - bit), evidence_values * bit, bit], dim=-1)  # [B,T,2F+1]
        tokens = (self.values(values) + self.time_of_week(time_of_week.long())
                  + self.sparse(slot_sparse * bit))  # [B,T,hidden]
        if self.hour_prior is not None:
            tokens = tokens + self.hour_prior(prior)
        return tokens


class MaskGuidedAttention(nn.Module):
    """Multi-head self-attention whose keys are steered by the evidence mask."""

    def __init__(self, hidden: int, heads: int, mode: str):
        super().__init__()
        self.heads = heads
        self.mode = mode
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        # Learned per-head bias for evidence keys (column 0) and generated keys (column 1);
        # only the "bias" mode reads it.
        self.key_bias = nn.Parameter(torch.zeros(heads, 2)) if mode == "bias" else None

    def forward(self, x: Tensor, evidence: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B,H,N,D]
        out = mask_guided_attention(q, k, v, evidence, self.mode, key_bias=self.key_bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # [B,N,hidden]


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = MaskGuidedAttention(hidden, heads, attention)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor, evidence: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), evidence)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN then a linear map to the slot's channels."""

    def __init__(self, hidden: int, channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer over time slots, conditioned on the diffusion step and z_u.

    With prior_residual the network's output is a correction added to a base per channel f:
    week_weight[f] * (user's evidence mean at the slot's hour of week) + day_weight[f] * (at its
    hour of day), weights learned and starting at (1, 0): with the zero-initialized final
    layer the untrained model predicts exactly what the hour_of_week baseline predicts, and
    training learns which routine each channel follows (a slot's region may follow the hour of
    day where its apps follow the user's week) and what the other users and the noisy slots
    add. In normalised units (umask/normalization.py) 0 is the population's mean, so weights
    below 1 shrink a user's noisy means toward it.
    """

    def __init__(self, channels: int, sparse_dim: int, user_dim: int, hidden: int, depth: int,
                 heads: int, mlp_ratio: float, attention: str, slots_per_day: int,
                 hour_prior: bool = False, prior_residual: bool = False):
        """slots_per_day: the feature spec's; time_of_week is in [0, 7 * slots_per_day)."""
        super().__init__()
        if prior_residual and not hour_prior:
            raise ValueError("prior_residual needs hour_prior: the residual's base is the prior")
        self.channels = channels
        self.slots_per_day = slots_per_day
        self.prior_residual = prior_residual
        self.embedder = SlotEmbedder(channels, sparse_dim, hidden, 7 * slots_per_day, hour_prior)
        self.t_embedder = TimestepEmbedder(hidden)
        self.user_embedder = nn.Linear(user_dim, hidden)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio, attention) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, channels)
        if prior_residual:  # per-channel weights of the prior's hour-of-week and hour-of-day blocks
            self.prior_week_weight = nn.Parameter(torch.ones(channels))
            self.prior_day_weight = nn.Parameter(torch.zeros(channels))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        nn.init.normal_(self.embedder.time_of_week.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output starts at zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def residual_base(self, prior: Tensor) -> Tensor:
        """The prior_residual base [B,T,F] from hour_prior_features [B,T,2F+3] (class docstring)."""
        f = self.channels
        return self.prior_week_weight * prior[..., :f] + self.prior_day_weight * prior[..., f: 2 * f]

    def forward(self, x_t: Tensor, t: Tensor, z_u: Tensor, evidence_values: Tensor, evidence: Tensor,
                time_of_week: Tensor, slot_sparse: Tensor) -> Tensor:
        """x_t, evidence_values [B,T,F]; t [B]; z_u [B,U]; evidence [B,T] bool;
        time_of_week [B,T]; slot_sparse [B,T,E]. Returns the x0 prediction [B,T,F]."""
        prior = (hour_prior_features(evidence_values, evidence, time_of_week, self.slots_per_day)  # [B,T,2F+3]
                 if self.embedder.hour_prior is not None else None)
        x = self.embedder(x_t, evidence_values, evidence, time_of_week, slot_sparse, prior)  # [B,T,hidden]
        perm = evidence_first_permutation(evidence)
        x = permute_tokens(x, perm)  # evidence-first order for every block
        sorted_evidence = permute_tokens(evidence, perm)
        c = self.t_embedder(t) + self.user_embedder(z_u)  # [B,hidden]
        for block in self.blocks:
            x = block(x, c, sorted_evidence)
        x = unpermute_tokens(self.final_layer(x, c), perm)  # [B,T,F]
        if self.prior_residual:
            x = x + self.residual_base(prior)
        return x
