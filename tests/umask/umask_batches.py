"""Small synthetic batches in the real dense layout, for the U-MASK tests."""
from dataclasses import dataclass

import torch

from umask.spec import FeatureSpec

NUM_CATEGORIES, NUM_REGIONS, SPARSE_DIM = 3, 2, 8
CHANNELS = NUM_CATEGORIES + NUM_REGIONS + 4
SPEC = FeatureSpec(slot_seconds=3600, slots=168, num_categories=NUM_CATEGORIES, num_regions=NUM_REGIONS)


@dataclass
class Batch:
    dense: torch.Tensor  # [B,T,F]
    observed: torch.Tensor  # [B,T] bool
    time_of_week: torch.Tensor  # [B,T]
    slot_sparse: torch.Tensor  # [B,T,E]


def make_batch(batch: int = 4, slots: int = 48, observed_share: float = 0.6, seed: int = 0,
               start_hour: int = 0) -> Batch:
    """Dense channels in the real layout: category log1p counts, region shares, activity, volume."""
    g = torch.Generator().manual_seed(seed)
    observed = torch.rand(batch, slots, generator=g) < observed_share
    counts = torch.randint(0, 4, (batch, slots, NUM_CATEGORIES + 1), generator=g).float()
    regions = torch.rand(batch, slots, NUM_REGIONS + 1, generator=g)
    regions = regions / regions.sum(-1, keepdim=True)
    activity = torch.log1p(counts.sum(-1, keepdim=True))
    volume = torch.rand(batch, slots, 1, generator=g) * 10
    dense = torch.cat([torch.log1p(counts), regions, activity, volume], -1) * observed[..., None]
    time_of_week = ((torch.arange(slots) + start_hour) % SPEC.slots_per_week).expand(batch, slots).clone()
    slot_sparse = torch.randn(batch, slots, SPARSE_DIM, generator=g)
    return Batch(dense, observed, time_of_week, slot_sparse)
