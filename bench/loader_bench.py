"""Can the loader keep up with training? Loader examples/s against a training step's examples/s.

Writes a synthetic EXAMPLES dataset in the featurize layout (T=168 hourly slots, F=56 dense
channels as for C=20 categories and K=32 regions, about 30% of slots observed with 1-4 app ids
and one location each), then measures side by side in one run:
- loader: one rank, batch 32, one epoch through ShardedLoader (prefetch on, as in training);
- step: forward + backward + AdamW step of the real U-MASK model (umask.model.UMask with the
  default tiny ModelConfig: a DiT of 2 blocks of width 64 over the T slots) on one batch of the
  same shape, its slot embeddings from two plain torch EmbeddingBag tables standing in for the
  TorchRec ones (4096 x 16 each, ids taken modulo 4096).
Prints one JSON line; ratio = loader / step, and above 1 means the loader is not the bottleneck.

    .venv/bin/python bench/loader_bench.py [--examples 4096] [--steps 10]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from trainer.data.batch import Batch
from trainer.data.loader import ShardedLoader
from trainer.data.schema import EXAMPLES
from umask.spec import FeatureMaps, FeatureSpec, save_spec
from umask.config import ModelConfig
from umask.model import UMask

SLOTS = 168
SPEC = FeatureSpec(slot_seconds=3600, slots=SLOTS, num_categories=20, num_regions=32)
LAYOUT = SPEC.layout
BATCH = 32
ROW_GROUP = 512
SHARDS = 4


def list_array(values: np.ndarray, per_row: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
    np.cumsum(per_row, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def synthetic_examples(first_user: int, n: int, rng: np.random.Generator) -> pa.Table:
    channels = LAYOUT.num_channels
    observed = rng.random((n, SLOTS)) < 0.3  # [n, T]
    app_lengths = np.where(observed, rng.integers(1, 5, (n, SLOTS)), 0).astype(np.int32)
    loc_lengths = observed.astype(np.int32)
    dense = np.zeros((n, SLOTS, channels), dtype=np.float32)
    rows, slots = np.nonzero(observed)
    dense[rows, slots, rng.integers(0, LAYOUT.num_categories + 1, rows.size)] = np.log1p(rng.integers(1, 9, rows.size))
    dense[rows, slots, LAYOUT.region.start + rng.integers(0, LAYOUT.num_regions + 1, rows.size)] = 1.0
    dense[rows, slots, LAYOUT.activity] = np.log1p(app_lengths[rows, slots])
    dense[rows, slots, LAYOUT.volume] = rng.uniform(5.0, 15.0, rows.size)
    time_of_week = (np.arange(SLOTS) + rng.integers(0, 168, (n, 1))) % 168
    row_apps = app_lengths.sum(axis=1)
    row_locs = loc_lengths.sum(axis=1)
    full = np.full(n, SLOTS)
    columns = {
        "user_id": pa.array(np.arange(first_user, first_user + n, dtype=np.int64)),
        "split": pa.array(["train"] * n),
        "window_start": pa.array(np.full(n, 1_460_000_000, dtype=np.int64)),
        "time_of_week": list_array(time_of_week.astype(np.int16).ravel(), full, pa.int16()),
        "observed": list_array(observed.ravel(), full, pa.bool_()),
        "dense": list_array(dense.ravel(), full * channels, pa.float32()),
        "app_ids": list_array(rng.integers(0, 2_000, row_apps.sum()), row_apps, pa.int64()),
        "app_lengths": list_array(app_lengths.ravel(), full, pa.int32()),
        "loc_ids": list_array(rng.integers(0, 10_000, row_locs.sum()), row_locs, pa.int64()),
        "loc_lengths": list_array(loc_lengths.ravel(), full, pa.int32()),
    }
    return pa.Table.from_pydict(columns, schema=EXAMPLES)


def write_dataset(features: Path, examples: int) -> None:
    rng = np.random.default_rng(0)
    per_shard = examples // SHARDS
    for shard in range(SHARDS):
        path = features / "split=train" / f"shard={shard:05d}" / "part-00000.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(synthetic_examples(shard * per_shard, per_shard, rng), path, row_group_size=ROW_GROUP)
    spec = save_spec(features / "spec", SPEC, FeatureMaps.empty())
    (features / "manifest.json").write_text(json.dumps({
        "spec_digest": spec.digest, "examples": {"train": per_shard * SHARDS}}))


def loader_examples_per_s(features: Path) -> float:
    with ShardedLoader(features, rank=0, world_size=1, batch_size=BATCH, seed=0, epochs=1) as loader:
        start = time.perf_counter()
        examples = sum(len(batch) for batch in loader)
        return examples / (time.perf_counter() - start)


class SlotBags(nn.Module):
    """Plain-torch stand-in for the TorchRec tables: app and location bags summed per slot."""

    def __init__(self, rows: int = 4096, dim: int = 16):
        super().__init__()
        self.rows = rows
        self.app = nn.EmbeddingBag(rows, dim, mode="sum")
        self.loc = nn.EmbeddingBag(rows, dim, mode="sum")

    def forward(self, batch: Batch) -> torch.Tensor:
        b, t = batch.observed.shape
        pooled = [table(values % self.rows, bag_offsets(lengths))  # [B*T, dim]
                  for table, values, lengths in ((self.app, batch.app_values, batch.app_lengths),
                                                 (self.loc, batch.loc_values, batch.loc_lengths))]
        return torch.cat(pooled, dim=1).view(b, t, -1)  # [B, T, 2*dim]


def bag_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """EmbeddingBag start offsets [B*T] from per-slot lengths [B*T]."""
    return torch.cumsum(lengths, 0, dtype=torch.int64) - lengths.to(torch.int64)


def step_examples_per_s(features: Path, steps: int) -> float:
    """U-MASK (the tiny preset: a DiT of 2 blocks of width 64) forward + backward + AdamW step."""
    torch.manual_seed(0)
    with ShardedLoader(features, rank=0, world_size=1, batch_size=BATCH, seed=0, epochs=1) as loader:
        batch = next(loader)
    bags = SlotBags()
    model = UMask(ModelConfig(), SPEC, sparse_dim=32)
    optimizer = torch.optim.AdamW([*model.parameters(), *bags.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(batch.dense, batch.observed, batch.time_of_week, bags(batch), generator=generator)
        out["loss"].backward()
        optimizer.step()

    for _ in range(2):  # warm-up: allocator and kernel selection
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4096, help="synthetic examples to write")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        features = Path(tmp) / "features"
        write_dataset(features, args.examples)
        loader_rate = loader_examples_per_s(features)
        step_rate = step_examples_per_s(features, args.steps)
    print(json.dumps({
        "bench": "loader", "loader_examples_per_s": round(loader_rate, 1),
        "step_examples_per_s": round(step_rate, 1), "ratio": round(loader_rate / step_rate, 2),
        "batch": BATCH, "slots": SLOTS, "channels": LAYOUT.num_channels, "examples": args.examples,
        "step_model": "umask.model.UMask tiny (DiT 2 x 64) + EmbeddingBag 2 x 4096 x 16", "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
