"""The user- and task-adaptive mask: which observed slots a model may see as evidence.

Method section 3. Per example: a task tau (short, long, cold) fixes a target window that
starts at a cut point; the candidates are the observed slots before the cut (so no target is
ever evidence and nothing after the cut leaks into a forecast). From the candidates alone we
compute the user's reliability r_u, the evidence ratio rho(u, tau), a utility per slot
(temporal emphasis + feature-weighted spatial affinity), a softmax sampling distribution
flattened toward uniform for cold start, and draw exactly K = round(rho * #candidates)
slots without replacement with Gumbel-top-k. Everything is vectorized over the batch and
draws its randomness from one torch.Generator (on its own device), so a seed fixes the mask.
"""
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from umask.config import TASKS, MaskConfig
from umask.normalization import channel_normalization
from umask.spec import FeatureSpec

# r_u is kept inside (0, 1) so that no user is fully trusted or fully ignored.
RELIABILITY_FLOOR, RELIABILITY_CEIL = 0.01, 0.99


@dataclass
class MaskSample:
    """One batch's masks; every tensor has the batch as its first dimension."""

    task: Tensor  # [B] int64, index into TASKS
    cut: Tensor  # [B] int64, first target slot
    target: Tensor  # [B,T] bool, the slots to complete
    candidates: Tensor  # [B,T] bool, observed slots before the cut
    evidence: Tensor  # [B,T] bool, the sampled subset of candidates
    reliability: Tensor  # [B] float, r_u
    ratio: Tensor  # [B] float, rho(u, tau)
    budget: Tensor  # [B] int64, K = |evidence|


def sample_tasks(batch: int, cfg: MaskConfig, generator: torch.Generator) -> Tensor:
    """Draws tau per example with cfg.task_weights; [B] int64."""
    weights = torch.tensor(cfg.task_weights, dtype=torch.float32, device=generator.device)
    return torch.multinomial(weights, batch, replacement=True, generator=generator)


def target_windows(task: Tensor, slots: int, cfg: MaskConfig,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Cut point [B] and target window [B,T] per task (method section 1).

    short/long: a window of target_min..target_max slots starting at a cut drawn uniformly
    after min_history slots (fewer when T is short); cold: everything after cold_history slots.
    """
    device = task.device
    lo = _per_task(cfg, "target_min", task).long().clamp(max=slots - 1)
    hi = _per_task(cfg, "target_max", task).long().clamp(max=slots - 1)
    length = lo + (_uniform(task.shape, generator, device) * (hi - lo + 1)).long()
    length = torch.minimum(length, hi)
    first_cut = torch.clamp(slots - length, max=cfg.min_history).clamp(min=1)
    last_cut = slots - length
    cut = first_cut + (_uniform(task.shape, generator, device) * (last_cut - first_cut + 1)).long()
    cut = torch.minimum(cut, last_cut)
    cold = task == TASKS.index("cold")
    cut = torch.where(cold, torch.full_like(cut, min(cfg.cold_history, slots - 1)), cut)
    end = torch.where(cold, torch.full_like(cut, slots), cut + length)
    t = torch.arange(slots, device=device)
    target = (t >= cut[:, None]) & (t < end[:, None])  # [B,T]
    return cut, target


def reliability(dense: Tensor, candidates: Tensor, time_of_week: Tensor, spec: FeatureSpec,
                cfg: MaskConfig) -> Tensor:
    """r_u in (0,1) from the candidate slots only: amount, hour-of-day regularity, focus; [B].

    Regularity is over the spec's slots of the day (hours with 3600-s slots)."""
    mask = candidates.float()
    count = mask.sum(1)
    count_term = 1.0 - torch.exp(-count / reliability_count_scale(spec))
    hour_hist = torch.zeros(mask.shape[0], spec.slots_per_day, device=mask.device)
    hour_hist.scatter_add_(1, time_of_week.long() % spec.slots_per_day, mask)  # [B,slots_per_day]
    regularity = 1.0 - _normalized_entropy(hour_hist)
    usage = (torch.expm1(dense[..., spec.layout.category].clamp(min=0)) * mask[..., None]).sum(1)
    focus = 1.0 - _normalized_entropy(usage)  # [B]
    terms = torch.stack([count_term, regularity, focus], dim=1)  # [B,3]
    weights = torch.tensor(cfg.reliability_weights, device=mask.device)
    r = (terms * weights).sum(1) / weights.sum()
    # A user with no history has nothing to be regular or focused about.
    r = torch.where(count > 0, r, torch.zeros_like(r))
    return r.clamp(RELIABILITY_FLOOR, RELIABILITY_CEIL)


def reliability_count_scale(spec: FeatureSpec) -> float:
    """n of r_u's count term 1 - exp(-count / n): the train split's mean observed slots per
    example, so a user with the average history gets 1 - 1/e; one day of slots when the spec
    has no statistics (format 1.0)."""
    train = spec.statistics.get("train")
    if not train or not train["examples"] or not train["observed_slots"]:
        return float(spec.slots_per_day)
    return train["observed_slots"] / train["examples"]


def evidence_ratio(r: Tensor, task: Tensor, cfg: MaskConfig) -> Tensor:
    """rho(u,tau) = clip(rho_tau * (1 + beta_tau * (r_u - mean r)), rho_min, rho_max); [B].

    Uniform masks and reliability_ratio: false use rho_tau for every user."""
    base = _per_task(cfg, "ratio", task)
    if cfg.family == "uniform" or not cfg.reliability_ratio:
        return base.clamp(cfg.ratio_min, cfg.ratio_max)
    gain = _per_task(cfg, "reliability_gain", task)
    return (base * (1.0 + gain * (r - cfg.reliability_mean))).clamp(cfg.ratio_min, cfg.ratio_max)


def slot_utility(dense: Tensor, candidates: Tensor, time_of_week: Tensor, target: Tensor,
                 cut: Tensor, task: Tensor, spec: FeatureSpec, cfg: MaskConfig) -> Tensor:
    """lambda_T * temporal emphasis + lambda_S * spatial affinity per slot; [B,T].

    A part switched off (cfg.temporal_emphasis, cfg.spatial_affinity) contributes 0."""
    utility = torch.zeros(candidates.shape, device=candidates.device)
    if cfg.temporal_emphasis:
        utility = utility + cfg.temporal_weight * _temporal_emphasis(time_of_week, target, cut, task,
                                                                     spec.slots_per_day, cfg)
    if cfg.spatial_affinity:
        utility = utility + cfg.spatial_weight * _spatial_affinity(dense, candidates, spec, cfg)
    return utility


def sampling_distribution(utility: Tensor, candidates: Tensor, r: Tensor, task: Tensor,
                          cfg: MaskConfig) -> Tensor:
    """p' = (1 - eps) softmax(utility / kappa) + eps uniform over the candidates; [B,T]."""
    count = candidates.sum(1, keepdim=True).clamp(min=1)
    uniform = candidates.float() / count
    if cfg.family == "uniform":
        return uniform
    logits = (utility / cfg.temperature).masked_fill(~candidates, float("-inf"))
    # Rows without candidates give NaN in softmax; they get zeros (nothing to sample).
    p = torch.softmax(logits, dim=1).nan_to_num(0.0)
    if not cfg.cold_start_exploration:
        return p
    eps = (_per_task(cfg, "exploration", task) * (1.0 - r))[:, None]
    return (1.0 - eps) * p + eps * uniform


def evidence_budget(ratio: Tensor, candidates: Tensor) -> Tensor:
    """K = round(rho * #candidates), at least one slot when there is any; [B] int64."""
    count = candidates.sum(1)
    budget = torch.round(ratio * count).long()
    return torch.minimum(torch.maximum(budget, count.clamp(max=1)), count)


def gumbel_top_k(p: Tensor, budget: Tensor, generator: torch.Generator) -> Tensor:
    """Exactly budget[b] distinct slots of row b, drawn without replacement from p; [B,T] bool.

    Taking the top-k of log p + Gumbel noise is sampling k items without replacement in
    proportion to p; slots with p = 0 score -inf and are never drawn while budget <= #(p > 0).
    """
    uniform = _uniform(p.shape, generator, p.device).clamp(min=1e-20)
    scores = torch.log(p) - torch.log(-torch.log(uniform))  # [B,T]
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    chosen_rank = torch.arange(p.shape[1], device=p.device) < budget[:, None]  # [B,T]
    return torch.zeros_like(chosen_rank).scatter(1, order, chosen_rank)


def sample_mask(dense: Tensor, observed: Tensor, time_of_week: Tensor, spec: FeatureSpec,
                cfg: MaskConfig, generator: torch.Generator, task: Tensor | None = None) -> MaskSample:
    """Tasks (drawn unless given), targets and evidence for a batch.

    dense [B,T,F] in spec.layout, observed [B,T] bool, time_of_week [B,T] int in
    [0, spec.slots_per_week).
    """
    batch, slots = observed.shape
    if task is None:
        task = sample_tasks(batch, cfg, generator).to(observed.device)
    cut, target = target_windows(task, slots, cfg, generator)
    return mask_for_window(dense, observed, time_of_week, task, cut, target, spec, cfg, generator)


def mask_for_window(dense: Tensor, observed: Tensor, time_of_week: Tensor, task: Tensor, cut: Tensor,
                    target: Tensor, spec: FeatureSpec, cfg: MaskConfig,
                    generator: torch.Generator) -> MaskSample:
    """The adaptive evidence for given tasks [B], cuts [B] and target windows [B,T].

    Candidates are the observed slots before the cut; reliability, ratio, utility, the
    sampling distribution and the exact-count sampler follow (section 3 of the method).
    """
    before_cut = torch.arange(observed.shape[1], device=observed.device) < cut[:, None]
    candidates = observed & before_cut  # [B,T]
    r = reliability(dense, candidates, time_of_week, spec, cfg)
    ratio = evidence_ratio(r, task, cfg)
    utility = slot_utility(dense, candidates, time_of_week, target, cut, task, spec, cfg)
    p = sampling_distribution(utility, candidates, r, task, cfg)
    budget = evidence_budget(ratio, candidates)
    evidence = gumbel_top_k(p, budget, generator)
    return MaskSample(task, cut, target, candidates, evidence, r, ratio, budget)


def _uniform(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """U[0,1) drawn on the generator's device, so a CPU generator also serves GPU data."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _per_task(cfg: MaskConfig, key: str, task: Tensor) -> Tensor:
    values = torch.tensor([float(getattr(cfg.task(name), key)) for name in TASKS],
                          device=task.device)
    return values[task]  # [B]


def _normalized_entropy(weights: Tensor) -> Tensor:
    """Entropy of each row's distribution over its last dim, divided by log(width); [B]."""
    total = weights.sum(-1, keepdim=True)
    p = weights / total.clamp(min=1e-12)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)
    return entropy / math.log(weights.shape[-1])


def _temporal_emphasis(time_of_week: Tensor, target: Tensor, cut: Tensor, task: Tensor,
                       slots_per_day: int, cfg: MaskConfig) -> Tensor:
    """Recency decay before the cut plus a bonus at the target window's slots of the day and
    of the week (hours with 3600-s slots); [B,T]."""
    slots = target.shape[1]
    age = (cut[:, None] - 1 - torch.arange(slots, device=cut.device)).clamp(min=0).float()
    halflife = _per_task(cfg, "recency_halflife", task)[:, None]
    recency = torch.exp(-math.log(2.0) * age / halflife)  # [B,T]
    tow = time_of_week.long()
    target_week_slots = torch.zeros(target.shape[0], 7 * slots_per_day, device=target.device)
    target_week_slots.scatter_add_(1, tow, target.float())
    target_week_slots = target_week_slots > 0  # [B, slots per week]
    target_hours = target_week_slots.view(-1, 7, slots_per_day).any(1)  # [B, slots per day]
    periodic = (cfg.same_hour_bonus * target_hours.gather(1, tow % slots_per_day).float()
                + cfg.same_week_slot_bonus * target_week_slots.gather(1, tow).float())
    return (_per_task(cfg, "recency_weight", task)[:, None] * recency
            + _per_task(cfg, "periodic_weight", task)[:, None] * periodic)


def _spatial_affinity(dense: Tensor, candidates: Tensor, spec: FeatureSpec, cfg: MaskConfig) -> Tensor:
    """Feature-weighted similarity of each slot to the user's usual regions, apps, volume; [B,T].

    The user's profile is the mean over candidate slots, so target values never enter. Volume
    similarity is exp(-|v - user mean| / s), s the volume family's spread in the train split
    (umask/normalization.py), so it reads the same on any traffic scale.
    """
    layout = spec.layout
    categories = dense[..., layout.category]
    regions = dense[..., layout.region]
    volume = dense[..., layout.volume]
    volume_spread = channel_normalization(spec)[1][layout.volume].item()
    mask = candidates.float()[..., None]
    count = mask.sum(1).clamp(min=1)  # [B,1]

    def similarity_to_user(features: Tensor) -> Tensor:
        user = (features * mask).sum(1) / count  # [B,D]
        return torch.nn.functional.cosine_similarity(features, user[:, None, :], dim=-1, eps=1e-8)

    user_volume = (volume * mask[..., 0]).sum(1, keepdim=True) / count
    sims = torch.stack([similarity_to_user(regions), similarity_to_user(categories),
                        torch.exp(-(volume - user_volume).abs() / volume_spread)], dim=-1)  # [B,T,3]
    weights = torch.tensor(cfg.spatial_feature_weights, device=dense.device)
    return (sims * weights).sum(-1) / weights.sum().clamp(min=1e-12)
