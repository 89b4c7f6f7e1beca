"""Reference completions the evaluation report sets beside U-MASK (method section 6).

Each baseline fills a batch's dense slots [B,T,F] from its evidence alone and, like
UMask.complete, returns evidence slots unchanged, so the same metrics apply to all of them.
"""
import torch
from torch import Tensor

from umask.hour_prior import evidence_mean_by_hour


def popularity_profile(dense: Tensor, observed: Tensor) -> Tensor:
    """Mean dense value per channel over all observed slots of a (training) set; [F]."""
    weights = observed[..., None].to(dense.dtype)
    return (dense * weights).sum((0, 1)) / weights.sum((0, 1)).clamp(min=1)


def global_popularity(dense: Tensor, evidence: Tensor, profile: Tensor) -> Tensor:
    """Every non-evidence slot gets the population's mean slot `profile` [F]."""
    return _keep_evidence(dense, evidence, profile.to(dense).expand_as(dense))


def hour_of_week_frequency(dense: Tensor, evidence: Tensor, time_of_week: Tensor,
                           profile: Tensor, slots_per_week: int) -> Tensor:
    """The user's own mean at the slot's hour of week (time_of_week [B,T] in [0, slots_per_week),
    the feature spec's slot of the week); at hours without evidence the user's overall
    evidence mean; for users without evidence, `profile` [F]."""
    hour_mean, _ = evidence_mean_by_hour(dense, evidence, time_of_week, slots_per_week, profile)
    return _keep_evidence(dense, evidence, hour_mean)


def hour_of_day_frequency(dense: Tensor, evidence: Tensor, time_of_week: Tensor,
                          profile: Tensor, slots_per_day: int) -> Tensor:
    """The user's own mean at the slot's hour of day (time_of_week % slots_per_day); at hours of
    day without evidence the user's overall evidence mean; for users without evidence,
    `profile` [F]. The hour-of-day block of the model's hour prior (umask/hour_prior.py) with
    the population's mean slot for users without evidence: in a one-week window a target's hour
    of week never holds evidence, so hour_of_week is the user's mean there, and this is the
    routine heuristic the prior hands the model."""
    hour_mean, _ = evidence_mean_by_hour(dense, evidence, time_of_week % slots_per_day, slots_per_day, profile)
    return _keep_evidence(dense, evidence, hour_mean)


def last_observed(dense: Tensor, evidence: Tensor, profile: Tensor) -> Tensor:
    """Each slot repeats the latest evidence slot at or before it; before any, `profile` [F]."""
    t = torch.arange(dense.shape[1], device=dense.device)
    latest = torch.where(evidence, t, torch.full_like(t, -1)).cummax(1).values  # [B,T]
    carried = dense.gather(1, latest.clamp(min=0)[..., None].expand_as(dense))
    filled = torch.where((latest >= 0)[..., None], carried, profile.to(dense).expand_as(dense))
    return _keep_evidence(dense, evidence, filled)


def _keep_evidence(dense: Tensor, evidence: Tensor, filled: Tensor) -> Tensor:
    return torch.where(evidence[..., None], dense, filled)
