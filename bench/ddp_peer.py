"""The training benchmark's peer: the same U-MASK model trained the plain way, with torch DDP.

What a practitioner would write without Ray, DeepSpeed or TorchRec, fed the same batches:
- data: trainer.data.loader.ShardedLoader with the run's features, seed, batch size and
  shuffle window, so each rank reads exactly the batches our trainer's rank reads;
- tables: two torch.nn.EmbeddingBag(sparse=True) of the config's sizes and pooling, ids hashed
  into rows with embeddings.ids.hash_rows as our IdMapper does, stepped by torch.optim.Adagrad
  (sparse gradients: only looked-up rows move, like our fused row-wise Adagrad);
- dense: umask.model.UMask, the same constructor arguments and cross-rank InfoNCE negatives,
  stepped by torch.optim.AdamW with the DeepSpeed section's lr, weight decay and clipping;
- one DistributedDataParallel over both (gloo on 127.0.0.1): dense gradients all-reduced in
  buckets, the tables' sparse gradients all-reduced as sparse tensors.
Each rank runs one torch thread, as a Ray Train worker with 1 CPU does.

`run_peer(cfg, warmup_steps)` spawns cfg.ray.num_workers processes, trains cfg.train.steps
steps and returns rank 0's steady-state figures (the steps after `warmup_steps`).
"""
from __future__ import annotations

import json
import socket
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from embeddings.ids import hash_rows
from trainer.config import RunConfig
from trainer.data.batch import Batch
from trainer.data.loader import ShardedLoader
from trainer.data.schema import DenseLayout
from umask.model import UMask


class PeerModel(nn.Module):
    """Both tables and the dense model in one module, so one DDP covers all of them."""

    def __init__(self, cfg: RunConfig, layout: DenseLayout, gather_negatives):
        super().__init__()
        self.app = _table(cfg, "app")
        self.loc = _table(cfg, "loc")
        self.umask = UMask(cfg.model, num_categories=layout.num_categories, num_regions=layout.num_regions,
                           sparse_dim=self.app.embedding_dim + self.loc.embedding_dim,
                           gather_negatives=gather_negatives)

    def forward(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pooled = torch.cat([_pool(self.app, batch.app_values, batch.app_lengths),
                            _pool(self.loc, batch.loc_values, batch.loc_lengths)], dim=1)  # [B*T, E]
        slot_sparse = pooled.view(len(batch), batch.observed.shape[1], -1)  # [B, T, E]
        return self.umask(dense=batch.dense, observed=batch.observed, time_of_week=batch.time_of_week,
                          slot_sparse=slot_sparse, generator=generator)


def _table(cfg: RunConfig, name: str) -> nn.EmbeddingBag:
    table = cfg.embeddings.tables()[name]
    return nn.EmbeddingBag(table.num_embeddings, table.dim, mode=cfg.embeddings.pooling, sparse=True)


def _pool(table: nn.EmbeddingBag, raw_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Raw ids [N] in bags of `lengths` [B*T] -> pooled [B*T, dim] (empty bags give zeros)."""
    starts = torch.cumsum(lengths, dim=0, dtype=torch.int64) - lengths  # [B*T] each bag's first id
    return table(hash_rows(raw_ids, table.num_embeddings), starts)


def _other_ranks_rows(x: torch.Tensor) -> torch.Tensor:
    """[n, d] -> [(world - 1) * n, d]: the other ranks' rows, differentiable, as InfoNCE negatives."""
    others = [r for i, r in enumerate(dist_nn.all_gather(x)) if i != dist.get_rank()]
    return torch.cat(others, dim=0) if others else x.new_zeros((0, x.shape[1]))


def _train_rank(rank: int, cfg: RunConfig, warmup_steps: int) -> dict | None:
    """Trains cfg.train.steps steps on this rank; rank 0 returns the steady-state figures."""
    world_size = dist.get_world_size()
    loader = ShardedLoader(cfg.data.features, rank, world_size, batch_size=cfg.train.batch_size,
                           seed=cfg.train.seed, splits=("train",), shuffle_window=cfg.data.shuffle_window)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = PeerModel(cfg, DenseLayout(cfg.data.num_categories, cfg.data.num_regions), _other_ranks_rows)
    ddp = DistributedDataParallel(model)
    dense_params = list(model.umask.parameters())
    tables = torch.optim.Adagrad([model.app.weight, model.loc.weight], lr=cfg.embeddings.lr,
                                 eps=cfg.embeddings.eps)
    dense = torch.optim.AdamW(dense_params, lr=cfg.deepspeed.lr, weight_decay=cfg.deepspeed.weight_decay)
    step_ends, waits, losses = [], [], []
    with loader:
        for step in range(cfg.train.steps):
            started = time.perf_counter()
            batch = next(loader)
            waited = time.perf_counter() - started
            generator = torch.Generator().manual_seed(hash((cfg.train.seed, rank, step)) & 0x7FFF_FFFF)
            out = ddp(batch, generator)
            tables.zero_grad(set_to_none=True)
            dense.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(dense_params, cfg.deepspeed.gradient_clipping)
            tables.step()
            dense.step()
            # the mean loss over ranks, as a training loop logs it (one collective per step)
            logged = torch.stack([out["loss"].detach(), out["reconstruction"], out["consistency"]])
            dist.all_reduce(logged)
            losses.append(logged[0].item() / world_size)
            step_ends.append(time.perf_counter())
            waits.append(waited / (step_ends[-1] - started))
    if rank != 0:
        return None
    measured = cfg.train.steps - warmup_steps
    seconds = step_ends[-1] - step_ends[warmup_steps - 1]
    return {"steps_per_s": measured / seconds,
            "examples_per_s": measured * cfg.train.batch_size * world_size / seconds,
            "data_wait": sum(waits[warmup_steps:]) / measured,
            "loss_first": losses[0], "loss_last": losses[-1]}


def _rank_main(rank: int, world_size: int, port: int, cfg: RunConfig, warmup_steps: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # as a Ray Train worker with cpus_per_worker=1 runs
    # the trainer's all-gather is the same deprecated call; Adagrad's sparse path warns once per rank
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = _train_rank(rank, cfg, warmup_steps)
        if result is not None:
            (Path(out_dir) / "result.json").write_text(json.dumps(result))
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_peer(cfg: RunConfig, warmup_steps: int, timeout_s: float = 600.0) -> dict:
    """Trains the peer on cfg.ray.num_workers local processes; rank 0's figures over the steps
    after `warmup_steps`: steps_per_s, examples_per_s, data_wait (share of the step spent in the
    loader), loss_first and loss_last (mean over ranks). The processes are ended on any failure."""
    if cfg.deepspeed.gradient_accumulation_steps != 1:
        raise ValueError("the DDP peer steps once per micro-batch: set deepspeed.gradient_accumulation_steps=1")
    if not 0 < warmup_steps < cfg.train.steps:
        raise ValueError(f"warmup_steps must be in [1, train.steps={cfg.train.steps}), got {warmup_steps}")
    world_size = cfg.ray.num_workers
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ddp-peer-") as out_dir:
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, cfg, warmup_steps, out_dir))
                 for rank in range(world_size)]
        try:
            for proc in procs:
                proc.start()
            deadline = time.monotonic() + timeout_s
            for proc in procs:
                proc.join(max(deadline - time.monotonic(), 0.0))
            errors = sorted(Path(out_dir).glob("rank*.error"))
            if errors:
                raise RuntimeError("DDP peer failed:\n" + "\n".join(p.read_text() for p in errors))
            if any(proc.exitcode is None for proc in procs):
                raise RuntimeError(f"DDP peer did not finish within {timeout_s:.0f} s")
            if any(proc.exitcode != 0 for proc in procs):
                raise RuntimeError(f"DDP peer ranks exited with {[proc.exitcode for proc in procs]}")
            return json.loads((Path(out_dir) / "result.json").read_text())
        finally:
            for proc in procs:  # only the processes started here, by their own handles
                if proc.is_alive():
                    proc.kill()
                    proc.join()
