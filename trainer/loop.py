"""One rank's training: loader -> sharded tables -> U-MASK -> DeepSpeed engine + fused sparse optimizers.

Shaped like torchtitan's Trainer: the constructor builds the parts, and `next_batch`,
`forward_backward`, `train_step`, `save`, `restore` and `train` are methods a model-specific
trainer can override one at a time. It runs inside a Ray Train worker, where the process
group already exists; locally that worker is a CPU process of an embedded Ray.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import RunConfig, to_yaml
from trainer.data.batch import Batch
from trainer.data.loader import ShardedLoader
from trainer.data.schema import DenseLayout
from umask.errors import UserError
from trainer.deepspeed_config import deepspeed_config
from trainer.progress import ProgressLog
from trainer.sparse_grad import unscaled_for_tables


class Trainer:
    """Trains cfg.train.steps optimizer steps on this rank, checkpointing through Ray Train."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        import deepspeed

        from embeddings.ids import IdMapper
        from embeddings.sharded import ShardedTables
        from embeddings.tables import pooled_dim
        from umask.model import UMask, no_extra_negatives

        self.cfg = cfg
        self.run_dir = run_dir
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = _device(cfg)
        self.loader = ShardedLoader(cfg.data.features, self.rank, self.world_size,
                                    batch_size=cfg.train.batch_size, seed=cfg.train.seed, splits=("train",),
                                    shuffle_window=cfg.data.shuffle_window)
        layout = DenseLayout(cfg.data.num_categories, cfg.data.num_regions)
        if layout.num_channels != self.loader.channels:
            raise UserError(f"{cfg.data.features} has {self.loader.channels} dense channels, but "
                            f"data.num_categories={layout.num_categories} and data.num_regions="
                            f"{layout.num_regions} make {layout.num_channels}: featurize with this config")
        torch.manual_seed(cfg.train.seed)  # the same initial tables and dense weights on every rank
        self.ids = IdMapper(cfg.embeddings)
        self.tables = ShardedTables(cfg.embeddings, dist.group.WORLD, self.device)
        if self.rank == 0:
            _write_plan(self.tables.placements, run_dir / "plan.json")
        model = UMask(cfg.model, num_categories=layout.num_categories, num_regions=layout.num_regions,
                      sparse_dim=pooled_dim(cfg.embeddings),
                      gather_negatives=_other_ranks_rows if self.world_size > 1 else no_extra_negatives)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(),
            config=deepspeed_config(cfg.deepspeed, cfg.train.batch_size, cfg.ray.use_gpu))
        self.step = 0
        self.micro_step = 0

    def next_batch(self) -> Batch:
        return next(self.loader).to(self.device)

    def forward_backward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One micro-batch: lookups, the model's loss, backward through both optimizers."""
        kjt = self.ids.to_kjt(batch.app_values, batch.app_lengths, batch.loc_values, batch.loc_lengths)
        pooled = unscaled_for_tables(self.tables(kjt), self.engine)  # [B*T, E]
        slot_sparse = pooled.view(len(batch), batch.observed.shape[1], -1)  # [B, T, E]
        generator = torch.Generator().manual_seed(
            hash((self.cfg.train.seed, self.rank, self.micro_step)) & 0x7FFF_FFFF)
        out = self.engine(dense=batch.dense, observed=batch.observed, time_of_week=batch.time_of_week,
                          slot_sparse=slot_sparse, generator=generator)
        self.engine.backward(out["loss"])  # the tables step here, inside backward (fused)
        self.engine.step()  # the dense model steps at accumulation boundaries only
        self.micro_step += 1
        return {k: out[k].detach() for k in ("loss", "reconstruction", "consistency")}

    def train_step(self) -> dict[str, float]:
        """One optimizer step of the dense model: gradient_accumulation_steps micro-batches.

        Also measures data_wait, the share of the step spent waiting for the loader.
        """
        started = time.perf_counter()
        waited = 0.0
        parts = []
        for _ in range(self.engine.gradient_accumulation_steps()):
            asked = time.perf_counter()
            batch = self.next_batch()
            waited += time.perf_counter() - asked
            parts.append(self.forward_backward(batch))
        self.step += 1
        means = {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
        means["data_wait"] = torch.tensor(waited / (time.perf_counter() - started), device=self.device)
        return dict(zip(means, _mean_over_ranks(torch.stack(list(means.values())))))

    def save(self, metrics: dict[str, float]) -> None:
        """Writes this rank's checkpoint and reports it to Ray Train (a barrier on every rank)."""
        import ray.train

        from trainer.checkpoint import save_checkpoint

        with tempfile.TemporaryDirectory(prefix="umask-ckpt-") as folder:
            save_checkpoint(Path(folder), rank=self.rank, world_size=self.world_size, run_name=self.cfg.ray.name,
                            step=self.step, engine=self.engine, tables=self.tables,
                            loader_state=self.loader.state_dict(), config_yaml=to_yaml(self.cfg))
            ray.train.report({"step": self.step, **metrics},
                             checkpoint=ray.train.Checkpoint.from_directory(folder))

    def restore(self) -> None:
        """Continues from Ray Train's latest checkpoint of this run, if there is one."""
        import ray.train

        from trainer.checkpoint import load_checkpoint

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None or not self.cfg.train.resume:
            return
        with checkpoint.as_directory() as folder:
            self.step, loader_state = load_checkpoint(
                Path(folder), rank=self.rank, world_size=self.world_size, run_name=self.cfg.ray.name,
                engine=self.engine, tables=self.tables)
        self.loader.load_state_dict(loader_state)
        self.micro_step = self.step * self.engine.gradient_accumulation_steps()
        if self.rank == 0:
            print(f"resumed at step {self.step} from {checkpoint.path}", flush=True)

    def train(self) -> dict[str, float]:
        self.restore()
        examples_per_step = (self.cfg.train.batch_size * self.world_size
                             * self.engine.gradient_accumulation_steps())
        progress = ProgressLog(self.run_dir, self.cfg.train.steps, self.cfg.train.log_every,
                               self.rank == 0, start_step=self.step)
        metrics: dict[str, float] = {}
        while self.step < self.cfg.train.steps:
            metrics = self.train_step()
            progress.step(self.step, examples_per_step, metrics)
            if self.step % self.cfg.train.checkpoint_every == 0 or self.step == self.cfg.train.steps:
                self.save(metrics)
        return metrics


def _write_plan(placements: dict, path: Path) -> None:
    """table -> sharding type, compute kernel, ranks and shard widths, as the planner chose them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: dataclasses.asdict(p) for name, p in placements.items()}, indent=1))


def _device(cfg: RunConfig) -> torch.device:
    if not cfg.ray.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def _mean_over_ranks(values: torch.Tensor) -> list[float]:
    """[n] metrics -> their means over ranks, in one all-reduce (on the model's device: nccl needs it)."""
    values = values.detach().float()
    dist.all_reduce(values)
    return (values / dist.get_world_size()).tolist()


def _other_ranks_rows(x: torch.Tensor) -> torch.Tensor:
    """[n, d] on each rank -> [(world - 1) * n, d]: the other ranks' rows, as InfoNCE negatives.

    The all-gather is differentiable, so each rank's rows also get gradient as others' negatives.
    """
    import torch.distributed.nn.functional as dist_nn

    rows = dist_nn.all_gather(x)
    return torch.cat([r for i, r in enumerate(rows) if i != dist.get_rank()], dim=0)
