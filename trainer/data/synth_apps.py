"""The synthetic app catalog: apps in 20 categories with Zipf popularity inside each category.

Apps are stored sorted by (category, popularity rank), so app number i's category and rank
follow from per-category offsets, and one searchsorted over a shifted CDF draws apps from any
mix of categories at once. Session traffic is lognormal with a median per category (video
streams megabytes, messaging kilobytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from trainer.data.synth_personas import CATEGORY_NAMES, NUM_CATEGORIES

ZIPF_EXPONENT = 1.1
# relative number of apps per category: many games and tools, few weather apps
_CATEGORY_SIZES = np.array([3, 3, 3, 3, 8, 2, 3, 1, 1, 4, 3, 2, 2, 2, 3, 3, 6, 2, 0.5, 3])
# median bytes of one session per category, and the lognormal sigma around it
TRAFFIC_MEDIAN = np.array([2e6, 2e5, 1.5e6, 3e7, 5e6, 8e6, 5e5, 3e5, 2e6, 3e6, 2e5, 1e6, 1e6,
                           5e5, 4e6, 6e6, 1e5, 1e6, 1e5, 1e6])
TRAFFIC_SIGMA = np.where(np.arange(NUM_CATEGORIES) == CATEGORY_NAMES.index("video"), 1.3, 1.0)
INSTALL_MEDIAN_BYTES = 4e7


@dataclass(frozen=True)
class AppCatalog:
    """Arrays over the catalog's N apps, sorted by (category, rank)."""
    app_ids: np.ndarray  # [N] int64, sparse
    category: np.ndarray  # [N] int32
    rank: np.ndarray  # [N] int32, 0 = most popular in its category
    shifted_cdf: np.ndarray  # [N] category + within-category popularity CDF, ends at c + 1

    def table(self) -> pa.Table:
        names = [f"{CATEGORY_NAMES[c]}.app{r:04d}" for c, r in zip(self.category, self.rank)]
        return pa.table({"app_id": pa.array(self.app_ids, pa.int64()),
                         "category_id": pa.array(self.category, pa.int32()),
                         "name": pa.array(names, pa.string())})

    def draw(self, categories: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """App numbers drawn by popularity within the given categories (same shapes)."""
        return np.searchsorted(self.shifted_cdf, categories + uniform, side="right")


def make_catalog(rng: np.random.Generator, app_ids: np.ndarray) -> AppCatalog:
    """A catalog for the given ids; every category gets at least one app."""
    n = len(app_ids)
    shares = _CATEGORY_SIZES / _CATEGORY_SIZES.sum()
    extra = rng.multinomial(n - NUM_CATEGORIES, shares)
    sizes = 1 + extra
    category = np.repeat(np.arange(NUM_CATEGORIES, dtype=np.int32), sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = (np.arange(n) - offsets[category]).astype(np.int32)
    weight = (rank + 1.0) ** -ZIPF_EXPONENT
    within = np.cumsum(weight)
    before = np.concatenate([[0.0], within])[offsets][category]
    total = np.add.reduceat(weight, offsets)[category]
    cdf = (within - before) / total
    cdf[offsets + sizes - 1] = 1.0  # exact, so a draw never spills into the next category
    return AppCatalog(app_ids, category, rank, category + cdf)
