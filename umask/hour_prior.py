"""The user's own mean per hour, from evidence slots only: one computation for two users.

`hour_of_week_frequency` (umask/baselines.py) fills target slots with it, and the DiT can take
it as extra per-token input (`model.hour_prior`), so the model starts from exactly the
information that baseline uses. Only evidence slots enter: values at other slots are
multiplied by 0 before any sum, so target values cannot leak through here.
"""
import torch
from torch import Tensor



def evidence_mean_by_hour(values: Tensor, evidence: Tensor, hour: Tensor, hours: int,
                          fallback: Tensor) -> tuple[Tensor, Tensor]:
    """Per slot, the mean of the user's evidence values at the slot's hour.

    values [B,T,F], evidence [B,T] bool, hour [B,T] int in [0, hours), fallback [F].
    Returns (mean [B,T,F], evidence slots at that hour [B,T,1]): at hours without evidence
    the user's overall evidence mean, for users without evidence `fallback`.
    """
    b, _, f = values.shape
    weights = evidence[..., None].to(values.dtype)  # [B,T,1]
    # where(), not a product, so that inf/nan at non-evidence slots cannot reach the sums.
    kept = torch.where(evidence[..., None], values, torch.zeros_like(values))  # [B,T,F]
    index = hour.long()[..., None].expand(-1, -1, f)  # [B,T,F]
    sums = values.new_zeros(b, hours, f).scatter_add_(1, index, kept)  # [B,hours,F]
    counts = values.new_zeros(b, hours, 1).scatter_add_(1, index[..., :1], weights)  # [B,hours,1]
    user_count = weights.sum(1)  # [B,1]
    user_mean = torch.where(user_count > 0, kept.sum(1) / user_count.clamp(min=1),
                            fallback.to(values))  # [B,F]
    hour_mean = torch.where(counts > 0, sums / counts.clamp(min=1), user_mean[:, None, :])  # [B,hours,F]
    return hour_mean.gather(1, index), counts.gather(1, index[..., :1])


def hour_prior_features(values: Tensor, evidence: Tensor, time_of_week: Tensor, slots_per_day: int) -> Tensor:
    """The DiT's per-token prior [B,T,2F+3] from evidence only.

    time_of_week [B,T] is the slot of the week in [0, 7 * slots_per_day) (the feature spec's);
    "hour" below is that slot, an hour with 3600-s slots.
    [mean at the slot's hour of week, mean at its hour of day (both falling back to the
    user's evidence mean, then to 0), log1p of the evidence slots behind each: hour of week,
    hour of day, the whole window]. In a one-week window a target's hour of week never holds
    evidence, so its first block is the user's mean; hour of day is the routine signal.
    """
    zero = values.new_zeros(values.shape[-1])
    week_mean, week_count = evidence_mean_by_hour(values, evidence, time_of_week, 7 * slots_per_day, zero)
    day_mean, day_count = evidence_mean_by_hour(values, evidence, time_of_week % slots_per_day,
                                                slots_per_day, zero)
    user_count = evidence.sum(1, keepdim=True)[..., None].to(values.dtype).expand_as(week_count)  # [B,T,1]
    counts = torch.log1p(torch.cat([week_count, day_count, user_count], dim=-1))  # [B,T,3]
    return torch.cat([week_mean, day_mean, counts], dim=-1)
