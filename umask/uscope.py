"""U-SCOPE: the user representation z_u, built slot -> day -> user from evidence only.

Method section 2. A slot's feature is its dense channels, its pooled app/location embedding
(looked up by the trainer) and a time-of-week embedding; a day is the masked mean of its
evidence slots through an MLP; the user is attention pooling over days, plus an optional
precomputed profile vector. Non-evidence slots are zeroed before anything reads them, so
z_u can never see a target. Two views feed the InfoNCE consistency loss: the short view keeps
the most recent evidence slots, the long view all of them.
"""
import torch
from torch import Tensor, nn



def recent_evidence(evidence: Tensor, keep: int) -> Tensor:
    """The last `keep` evidence slots of each row (all of them when there are fewer); [B,T] bool."""
    at_or_after = evidence.flip(1).long().cumsum(1).flip(1)  # [B,T]: evidence count in t..T-1
    return evidence & (at_or_after <= keep)


class UScope(nn.Module):
    """Hierarchical user encoder: slots -> days -> z_u [B, user_dim]."""

    def __init__(self, channels: int, sparse_dim: int, user_dim: int, day_slots: int,
                 profile_dim: int = 0):
        """day_slots: the feature spec's slots per day; time_of_week is in [0, 7 * day_slots)."""
        super().__init__()
        self.day_slots = day_slots
        self.slot_proj = nn.Linear(channels + sparse_dim, user_dim)
        self.time_of_week = nn.Embedding(7 * day_slots, user_dim)
        self.day_mlp = nn.Sequential(nn.GELU(), nn.Linear(user_dim, user_dim), nn.GELU(),
                                     nn.Linear(user_dim, user_dim))
        self.day_query = nn.Parameter(torch.zeros(user_dim))
        # A learned "no evidence" day that is always attendable, so users with no evidence
        # (or all-empty days) still get a defined z_u instead of a softmax over nothing.
        self.empty_day = nn.Parameter(torch.zeros(user_dim))
        self.out = nn.Linear(user_dim, user_dim)
        self.profile_proj = nn.Linear(profile_dim, user_dim) if profile_dim > 0 else None

    def forward(self, dense: Tensor, slot_sparse: Tensor, time_of_week: Tensor, evidence: Tensor,
                profile: Tensor | None = None) -> Tensor:
        """dense [B,T,F], slot_sparse [B,T,E], time_of_week [B,T], evidence [B,T] bool,
        profile [B,P] or None. Returns z_u [B,user_dim]."""
        b, t = evidence.shape
        keep = evidence[..., None].to(dense.dtype)  # [B,T,1]
        slot = self.slot_proj(torch.cat([dense, slot_sparse], dim=-1) * keep)
        slot = (slot + self.time_of_week(time_of_week.long())) * keep  # [B,T,U]
        pad = (-t) % self.day_slots
        slot = nn.functional.pad(slot, (0, 0, 0, pad))  # [B,T',U]
        keep = nn.functional.pad(keep, (0, 0, 0, pad))
        days = slot.shape[1] // self.day_slots
        slot = slot.view(b, days, self.day_slots, -1)
        keep = keep.view(b, days, self.day_slots, 1)
        count = keep.sum(2)  # [B,days,1]
        day = self.day_mlp(slot.sum(2) / count.clamp(min=1))  # [B,days,U]
        day = torch.cat([day, self.empty_day.expand(b, 1, -1)], dim=1)  # [B,days+1,U]
        has_evidence = torch.cat([count[..., 0] > 0, count.new_ones(b, 1, dtype=torch.bool)], dim=1)
        scores = (day @ self.day_query) / day.shape[-1] ** 0.5  # [B,days+1]
        weights = torch.softmax(scores.masked_fill(~has_evidence, float("-inf")), dim=1)
        z = self.out((weights[..., None] * day).sum(1))  # [B,U]
        if self.profile_proj is not None:
            if profile is None:
                raise ValueError("this U-SCOPE was built with profile_dim > 0 and needs `profile`")
            z = z + self.profile_proj(profile)
        return z

    def views(self, dense: Tensor, slot_sparse: Tensor, time_of_week: Tensor, evidence: Tensor,
              short_view_slots: int, profile: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(z_short, z_long): the most recent `short_view_slots` evidence slots vs all evidence."""
        z_short = self(dense, slot_sparse, time_of_week, recent_evidence(evidence, short_view_slots),
                       profile)
        return z_short, self(dense, slot_sparse, time_of_week, evidence, profile)
