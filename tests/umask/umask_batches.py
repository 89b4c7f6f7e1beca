"""Small synthetic batches in the real dense layout, and a feature spec measured on them."""
from dataclasses import dataclass, replace

import torch

from umask.spec import FeatureSpec

NUM_CATEGORIES, NUM_REGIONS, SPARSE_DIM = 3, 2, 8
CHANNELS = NUM_CATEGORIES + NUM_REGIONS + 4
# A spec as a config makes it, before featurize measured any data (format 1.0 had no statistics).
UNMEASURED_SPEC = FeatureSpec(slot_seconds=3600, slots=168, num_categories=NUM_CATEGORIES,
                              num_regions=NUM_REGIONS)


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
    time_of_week = ((torch.arange(slots) + start_hour) % UNMEASURED_SPEC.slots_per_week).expand(batch, slots).clone()
    slot_sparse = torch.randn(batch, slots, SPARSE_DIM, generator=g)
    return Batch(dense, observed, time_of_week, slot_sparse)


def train_statistics(batch: Batch) -> dict:
    """The spec's `statistics` (umask/statistics.py) of `batch` as the train split: what the
    model normalises by (umask/normalization.py) and the masks' count scale read."""
    values = batch.dense[batch.observed].double()  # [observed slots, F]
    return {"train": {"examples": batch.dense.shape[0], "slots": batch.observed.numel(),
                      "observed_slots": int(batch.observed.sum()),
                      "channels": {"count": values.shape[0], "mean": values.mean(0).tolist(),
                                   "std": values.std(0, unbiased=False).tolist(),
                                   "max": values.max(0).values.tolist(),
                                   "nonzero": (values != 0).sum(0).tolist()}}}


# The tests' spec: featurize's statistics of a 64-week sample of make_batch's users.
SPEC = replace(UNMEASURED_SPEC, statistics=train_statistics(make_batch(64, 168, seed=123)))
