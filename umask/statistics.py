"""Feature statistics: what featurize measures of its own output, for the model and the metrics.

They come from featurize's one pass over the data, never from a second scan: each bucket's
examples are summarised where they are made (`SplitStatistics.add`), the buckets' summaries are
merged in shard order (`merge`), and the result is the feature spec's `statistics`
(umask/spec.py), so that training, eval, complete and the export bundle normalise by the same
numbers. Merging is associative and runs in a fixed order on float64 sums, so the same inputs
give the same bytes on any number of workers.

`statistics` (JSON) holds, per split in umask.spec.SPLITS that has examples:
  examples, slots, observed_slots      counts: examples, their T slots, the observed ones
  sparsity_buckets                     [len(edges)+1] examples per observed-share bucket
  channels                             over observed slots only, per dense channel f in [0, F):
    count, mean[F], std[F], max[F], nonzero[F]   (std: population standard deviation,
                                                  sqrt(E[x^2] - E[x]^2), clipped at 0)
  ids                                  per table (app, loc): occurrences (bag entries) and
                                       slots_with_ids (observed slots holding at least one)
The normalisation statistics are the train split's (`train_channels`): the other splits are
there so that summary and eval can report what was held out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from umask.slots import ExampleRows
from umask.spec import SPLITS, FeatureSpec, sparsity_bucket


@dataclass
class SplitStatistics:
    """Running sums over one split's examples; float64, so merging never loses a count."""

    channels: int  # F
    buckets: int  # len(sparsity edges) + 1
    examples: int = 0
    slots: int = 0
    observed_slots: int = 0
    sparsity_buckets: np.ndarray = field(default=None)  # [buckets] int64
    total: np.ndarray = field(default=None)  # [F] float64, sum over observed slots
    total_squares: np.ndarray = field(default=None)  # [F] float64
    maximum: np.ndarray = field(default=None)  # [F] float64
    nonzero: np.ndarray = field(default=None)  # [F] int64
    app_occurrences: int = 0
    loc_occurrences: int = 0
    app_slots: int = 0
    loc_slots: int = 0

    def __post_init__(self):
        F = self.channels
        if self.sparsity_buckets is None:
            self.sparsity_buckets = np.zeros(self.buckets, np.int64)
        if self.total is None:
            self.total, self.total_squares = np.zeros(F), np.zeros(F)
            self.maximum, self.nonzero = np.zeros(F), np.zeros(F, np.int64)

    def add(self, rows: ExampleRows, edges: tuple[float, ...]) -> None:
        """Adds n examples: rows.dense [n, T, F], rows.observed [n, T], the bags' lengths [n, T]."""
        n, T = rows.observed.shape
        observed = rows.observed.astype(bool)
        values = rows.dense[observed]  # [observed slots, F] float32
        self.examples += n
        self.slots += n * T
        self.observed_slots += int(observed.sum())
        share = observed.sum(axis=1) / max(T, 1)
        self.sparsity_buckets += np.bincount(sparsity_bucket(share, edges), minlength=self.buckets)
        if len(values):
            wide = values.astype(np.float64)
            self.total += wide.sum(axis=0)
            self.total_squares += np.einsum("ij,ij->j", wide, wide)  # no [slots, F] temporary
            self.maximum = np.maximum(self.maximum, values.max(axis=0))
            self.nonzero += np.count_nonzero(values, axis=0)
        self.app_occurrences += int(rows.app_lengths.sum())
        self.loc_occurrences += int(rows.loc_lengths.sum())
        self.app_slots += int(np.count_nonzero(rows.app_lengths[observed]))
        self.loc_slots += int(np.count_nonzero(rows.loc_lengths[observed]))

    def merge(self, other: SplitStatistics) -> None:
        """Adds another summary of the same split (another bucket's)."""
        for name in ("examples", "slots", "observed_slots", "app_occurrences", "loc_occurrences",
                     "app_slots", "loc_slots"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.sparsity_buckets = self.sparsity_buckets + other.sparsity_buckets
        self.total = self.total + other.total
        self.total_squares = self.total_squares + other.total_squares
        self.maximum = np.maximum(self.maximum, other.maximum)
        self.nonzero = self.nonzero + other.nonzero

    def to_partial(self) -> dict:
        """Exact running sums as JSON-able lists (what a bucket's task hands back to the driver)."""
        return {"examples": self.examples, "slots": self.slots, "observed_slots": self.observed_slots,
                "sparsity_buckets": self.sparsity_buckets.tolist(), "total": self.total.tolist(),
                "total_squares": self.total_squares.tolist(), "maximum": self.maximum.tolist(),
                "nonzero": self.nonzero.tolist(), "app_occurrences": self.app_occurrences,
                "loc_occurrences": self.loc_occurrences, "app_slots": self.app_slots,
                "loc_slots": self.loc_slots}

    @classmethod
    def from_partial(cls, data: dict) -> SplitStatistics:
        arrays = {"sparsity_buckets": np.asarray(data["sparsity_buckets"], np.int64),
                  "total": np.asarray(data["total"], np.float64),
                  "total_squares": np.asarray(data["total_squares"], np.float64),
                  "maximum": np.asarray(data["maximum"], np.float64),
                  "nonzero": np.asarray(data["nonzero"], np.int64)}
        counts = {k: int(v) for k, v in data.items() if k not in arrays}
        return cls(channels=len(arrays["total"]), buckets=len(arrays["sparsity_buckets"]), **counts, **arrays)

    def summary(self) -> dict:
        """The spec's form: counts, per-channel mean/std/max/nonzero over observed slots, ids."""
        count = self.observed_slots
        mean = self.total / count if count else np.zeros_like(self.total)
        variance = self.total_squares / count - mean * mean if count else np.zeros_like(self.total)
        return {"examples": self.examples, "slots": self.slots, "observed_slots": count,
                "sparsity_buckets": self.sparsity_buckets.tolist(),
                "channels": {"count": count, "mean": _floats(mean), "std": _floats(np.sqrt(np.maximum(variance, 0.0))),
                             "max": _floats(self.maximum), "nonzero": self.nonzero.tolist()},
                "ids": {"app": {"occurrences": self.app_occurrences, "slots_with_ids": self.app_slots},
                        "loc": {"occurrences": self.loc_occurrences, "slots_with_ids": self.loc_slots}}}


def new_split_statistics(spec: FeatureSpec) -> SplitStatistics:
    """An empty summary for examples of `spec`."""
    return SplitStatistics(channels=spec.layout.num_channels, buckets=len(spec.sparsity_edges) + 1)


def merge(partials: list[dict[str, dict]], spec: FeatureSpec) -> dict:
    """The spec's `statistics` from the buckets' partials ({split: to_partial()}), merged in the
    order given (shard order, so that the float sums are the same on any number of workers)."""
    merged: dict[str, SplitStatistics] = {}
    for partial in partials:
        for split, data in partial.items():
            merged.setdefault(split, new_split_statistics(spec)).merge(SplitStatistics.from_partial(data))
    return {split: merged[split].summary() for split in SPLITS if split in merged}


def train_channels(spec: FeatureSpec) -> dict | None:
    """The train split's per-channel statistics ({count, mean, std, max, nonzero}), or None
    when the spec has none (made before statistics existed, or no train examples)."""
    train = spec.statistics.get("train")
    if not train or not train["channels"]["count"]:
        return None
    return train["channels"]


def _floats(values: np.ndarray) -> list[float]:
    # 9 significant digits round-trip a float32 and keep spec.json's digest platform-stable
    return [float(f"{v:.9g}") for v in values]
