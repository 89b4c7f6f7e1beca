"""What the loader hands the training step: `Batch` (torch tensors) and `ExampleRows` (numpy).

`ExampleRows` is a block of decoded examples in columnar numpy form; the loader reads Parquet
row groups into it, gathers each batch's rows with `take` (and `concat` where a batch spans two
blocks) and turns the result into a `Batch`. Id bags stay as flat values plus per-slot lengths,
batch-major then slot, which is the layout a TorchRec KeyedJaggedTensor wants for one key with
B*T samples; building the KJT is embeddings/' job, so nothing here imports torchrec.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import torch


@dataclass
class Batch:
    """B examples of T slots with F dense channels each; bags are jagged over the B*T slots."""

    user_id: torch.Tensor  # [B] int64
    window_start: torch.Tensor  # [B] int64, epoch seconds of slot 0
    split: torch.Tensor  # [B] int64, index into trainer.data.schema.SPLITS
    time_of_week: torch.Tensor  # [B, T] int64
    observed: torch.Tensor  # [B, T] bool
    dense: torch.Tensor  # [B, T, F] float32
    app_values: torch.Tensor  # [N_app] int64 raw app ids
    app_lengths: torch.Tensor  # [B*T] int32, sums to N_app
    loc_values: torch.Tensor  # [N_loc] int64 raw location ids
    loc_lengths: torch.Tensor  # [B*T] int32, sums to N_loc

    def __len__(self) -> int:
        return self.user_id.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})


def gather_bags(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The concatenated bags of `rows`, where row i owns values[offsets[i]:offsets[i+1]]."""
    starts = offsets[rows]
    counts = offsets[rows + 1] - starts
    out_starts = np.cumsum(counts) - counts
    # position j of the output, inside row k's bag, reads values[starts[k] + (j - out_starts[k])]
    index = np.repeat(starts - out_starts, counts) + np.arange(counts.sum(), dtype=np.int64)
    return values[index]


def row_offsets(lengths: np.ndarray) -> np.ndarray:
    """[n+1] offsets of each row's bag in the flat values, from per-slot lengths [n, T]."""
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths.sum(axis=1, dtype=np.int64), out=offsets[1:])
    return offsets


@dataclass
class ExampleRows:
    """n decoded examples, columnar; bags flat with per-slot lengths (row-major over [n, T])."""

    user_id: np.ndarray  # [n] int64
    window_start: np.ndarray  # [n] int64
    split: np.ndarray  # [n] int64
    time_of_week: np.ndarray  # [n, T] int16
    observed: np.ndarray  # [n, T] bool
    dense: np.ndarray  # [n, T, F] float32
    app_values: np.ndarray  # [sum(app_lengths)] int64
    app_lengths: np.ndarray  # [n, T] int32
    loc_values: np.ndarray  # [sum(loc_lengths)] int64
    loc_lengths: np.ndarray  # [n, T] int32

    def __len__(self) -> int:
        return self.user_id.shape[0]

    @cached_property
    def app_offsets(self) -> np.ndarray:
        return row_offsets(self.app_lengths)

    @cached_property
    def loc_offsets(self) -> np.ndarray:
        return row_offsets(self.loc_lengths)

    def take(self, rows: np.ndarray) -> "ExampleRows":
        """The examples at `rows`, in that order (a copy, so batches never alias the block)."""
        rows = np.asarray(rows, dtype=np.int64)
        return ExampleRows(
            user_id=self.user_id[rows],
            window_start=self.window_start[rows],
            split=self.split[rows],
            time_of_week=self.time_of_week[rows],
            observed=self.observed[rows],
            dense=self.dense[rows],
            app_values=gather_bags(self.app_values, self.app_offsets, rows),
            app_lengths=self.app_lengths[rows],
            loc_values=gather_bags(self.loc_values, self.loc_offsets, rows),
            loc_lengths=self.loc_lengths[rows],
        )

    @staticmethod
    def concat(parts: list["ExampleRows"]) -> "ExampleRows":
        """The examples of `parts` one after another; bags stay batch-major because each part's are."""
        if len(parts) == 1:
            return parts[0]
        return ExampleRows(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                              for f in fields(ExampleRows)})

    def to_batch(self) -> Batch:
        n, slots = self.observed.shape
        return Batch(
            user_id=torch.from_numpy(self.user_id),
            window_start=torch.from_numpy(self.window_start),
            split=torch.from_numpy(self.split),
            time_of_week=torch.from_numpy(self.time_of_week.astype(np.int64)),
            observed=torch.from_numpy(self.observed),
            dense=torch.from_numpy(self.dense),
            app_values=torch.from_numpy(self.app_values),
            app_lengths=torch.from_numpy(self.app_lengths.reshape(n * slots)),
            loc_values=torch.from_numpy(self.loc_values),
            loc_lengths=torch.from_numpy(self.loc_lengths.reshape(n * slots)),
        )
