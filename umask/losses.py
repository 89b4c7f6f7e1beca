"""The training objective: masked reconstruction on target slots + InfoNCE consistency.

Method section 5. Reconstruction is a per-channel-family weighted error averaged over the
scored slots only (targets that hold a record); nothing else in the batch reaches it. It is
squared error (the network's x0 estimate is then a conditional mean) except on the volume
channel, where absolute error makes it a conditional median: a slot's traffic is zero-inflated
(a slot with location records but no traffic has log1p(bytes) = 0, 5 % of the observed slots of
`u-mask data synth`) and the report scores volume by MAE, which the median minimises.
InfoNCE pulls each user's short-view z toward their own long-view z and away from the other
users' long views in the batch, plus any extra negatives the trainer gathered from other ranks.
"""
import torch
from torch import Tensor

from umask.config import LossConfig


def channel_weights(num_categories: int, num_regions: int, cfg: LossConfig) -> Tensor:
    """Per-channel MSE weight in the dense layout [C+1 categories, K+1 regions, activity, volume]; [F].

    A family's weight is spread evenly over its channels, so each family's term is its mean
    squared error per channel whatever C and K are: with per-channel weights the 56 channels of
    C=20, K=32 left the volume forecast 1/56 of the loss, and the balance moved with C and K.
    With the normalisation of umask/normalization.py each family varies by about 1, so equal
    family weights make the four forecasts count alike.
    """
    return torch.tensor([cfg.category_weight / (num_categories + 1)] * (num_categories + 1)
                        + [cfg.region_weight / (num_regions + 1)] * (num_regions + 1)
                        + [cfg.activity_weight, cfg.volume_weight])


def absolute_error_channels(channels: int, volume: int, cfg: LossConfig) -> Tensor:
    """[F] bool: the channels scored by absolute instead of squared error (the volume channel
    when cfg.volume_error is "absolute")."""
    absolute = torch.zeros(channels, dtype=torch.bool)
    absolute[volume] = cfg.volume_error == "absolute"
    return absolute


def reconstruction_loss(prediction: Tensor, truth: Tensor, scored: Tensor, weights: Tensor,
                        absolute: Tensor | None = None) -> Tensor:
    """Weighted error over the channels of scored slots: prediction, truth [B,T,F], scored [B,T] bool.

    Squared error per channel, absolute error on the channels of `absolute` [F] bool (None:
    none). Each scored slot counts once (channel weights are normalized to sum 1); a batch with
    no scored slot gives 0 while keeping the graph, so every rank still runs backward.
    """
    weights = (weights / weights.sum().clamp(min=1e-12)).to(prediction)
    error = prediction - truth
    if absolute is not None:
        error = torch.where(absolute.to(error.device), error.abs(), error ** 2)
    else:
        error = error ** 2
    per_slot = (error * weights).sum(-1)  # [B,T]
    per_slot = torch.where(scored, per_slot, torch.zeros_like(per_slot))
    return per_slot.sum() / scored.sum().clamp(min=1)


def info_nce(z_short: Tensor, z_long: Tensor, extra_negatives: Tensor, temperature: float) -> Tensor:
    """Mean InfoNCE of z_short [B,U] against z_long [B,U] (positives on the diagonal).

    extra_negatives [M,U] are long views from other ranks (M may be 0).
    """
    queries = torch.nn.functional.normalize(z_short, dim=-1)
    keys = torch.nn.functional.normalize(torch.cat([z_long, extra_negatives.to(z_long)]), dim=-1)
    logits = queries @ keys.T / temperature  # [B, B+M]
    labels = torch.arange(queries.shape[0], device=queries.device)
    return torch.nn.functional.cross_entropy(logits, labels)
