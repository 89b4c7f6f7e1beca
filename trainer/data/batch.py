"""What the loader hands the training step: `Batch`, the torch tensors of examples.

The loader reads Parquet row groups into umask.slots.ExampleRows (columnar numpy), gathers
each batch's rows with `take` (and `concat` where a batch spans two blocks) and turns the
result into a `Batch` with `Batch.of_rows`. Id bags stay as flat values plus per-slot lengths,
batch-major then slot, which is the layout a TorchRec KeyedJaggedTensor wants for one key with
B*T samples; building the KJT is embeddings/' job, so nothing here imports torchrec.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from umask.slots import ExampleRows


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

    @staticmethod
    def of_rows(rows: ExampleRows) -> Batch:
        """The tensors of decoded examples (sharing their memory)."""
        n, slots = rows.observed.shape
        return Batch(
            user_id=torch.from_numpy(rows.user_id),
            window_start=torch.from_numpy(rows.window_start),
            split=torch.from_numpy(rows.split),
            time_of_week=torch.from_numpy(rows.time_of_week.astype(np.int64)),
            observed=torch.from_numpy(rows.observed),
            dense=torch.from_numpy(rows.dense),
            app_values=torch.from_numpy(rows.app_values),
            app_lengths=torch.from_numpy(rows.app_lengths.reshape(n * slots)),
            loc_values=torch.from_numpy(rows.loc_values),
            loc_lengths=torch.from_numpy(rows.loc_lengths.reshape(n * slots)),
        )
