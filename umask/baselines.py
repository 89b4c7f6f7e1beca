"""Reference completions the evaluation report sets beside U-MASK (method section 6).

Each baseline fills a batch's dense slots [B,T,F] from its evidence alone and, like
UMask.complete, returns evidence slots unchanged, so the same metrics apply to all of them.
"""
import torch
from torch import Tensor

from umask.config import HOURS_PER_WEEK


def popularity_profile(dense: Tensor, observed: Tensor) -> Tensor:
    """Mean dense value per channel over all observed slots of a (training) set; [F]."""
    weights = observed[..., None].to(dense.dtype)
    return (dense * weights).sum((0, 1)) / weights.sum((0, 1)).clamp(min=1)


def global_popularity(dense: Tensor, evidence: Tensor, profile: Tensor) -> Tensor:
    """Every non-evidence slot gets the population's mean slot `profile` [F]."""
    return _keep_evidence(dense, evidence, profile.to(dense).expand_as(dense))


def hour_of_week_frequency(dense: Tensor, evidence: Tensor, time_of_week: Tensor,
                           profile: Tensor) -> Tensor:
    """The user's own mean at the slot's hour of week; at hours without evidence the user's
    overall evidence mean; for users without evidence, `profile` [F]."""
    b, _, f = dense.shape
    weights = evidence[..., None].to(dense.dtype)  # [B,T,1]
    index = time_of_week.long()[..., None].expand(-1, -1, f)  # [B,T,F]
    sums = dense.new_zeros(b, HOURS_PER_WEEK, f).scatter_add_(1, index, dense * weights)
    counts = dense.new_zeros(b, HOURS_PER_WEEK, 1).scatter_add_(1, index[..., :1], weights)
    user_count = weights.sum(1)  # [B,1]
    user_mean = torch.where(user_count > 0, (dense * weights).sum(1) / user_count.clamp(min=1),
                            profile.to(dense))  # [B,F]
    hour_mean = torch.where(counts > 0, sums / counts.clamp(min=1), user_mean[:, None, :])  # [B,168,F]
    return _keep_evidence(dense, evidence, hour_mean.gather(1, index))


def last_observed(dense: Tensor, evidence: Tensor, profile: Tensor) -> Tensor:
    """Each slot repeats the latest evidence slot at or before it; before any, `profile` [F]."""
    t = torch.arange(dense.shape[1], device=dense.device)
    latest = torch.where(evidence, t, torch.full_like(t, -1)).cummax(1).values  # [B,T]
    carried = dense.gather(1, latest.clamp(min=0)[..., None].expand_as(dense))
    filled = torch.where((latest >= 0)[..., None], carried, profile.to(dense).expand_as(dense))
    return _keep_evidence(dense, evidence, filled)


def _keep_evidence(dense: Tensor, evidence: Tensor, filled: Tensor) -> Tensor:
    return torch.where(evidence[..., None], dense, filled)
