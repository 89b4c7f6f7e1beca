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
`PeerTrainer` is one rank of it; `spawn_ranks` is the launcher (the profile in train_bench
uses both to run our Trainer and the peer side by side in the same ranks).
"""
from __future__ import annotations

import json
import math
import os
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
from trainer.data.loader import read_spec
from umask.spec import FeatureSpec
from umask.model import UMask


class PeerModel(nn.Module):
    """Both tables and the dense model in one module, so one DDP covers all of them."""

    def __init__(self, cfg: RunConfig, spec: FeatureSpec, gather_negatives):
        super().__init__()
        self.app = _table(cfg, "app")
        self.loc = _table(cfg, "loc")
        self.umask = UMask(cfg.model, spec, sparse_dim=self.app.embedding_dim + self.loc.embedding_dim,
                           gather_negatives=gather_negatives)

    def forward(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pooled = torch.cat([_pool(self.app, batch.app_values, batch.app_lengths),
                            _pool(self.loc, batch.loc_values, batch.loc_lengths)], dim=1)  # [B*T, E]
        slot_sparse = pooled.view(len(batch), batch.observed.shape[1], -1)  # [B, T, E]
        return self.umask(dense=batch.dense, observed=batch.observed, time_of_week=batch.time_of_week,
                          slot_sparse=slot_sparse, generator=generator)


def _table(cfg: RunConfig, name: str) -> nn.EmbeddingBag:
    table = cfg.embeddings.tables()[name]
    bag = nn.EmbeddingBag(table.num_embeddings, table.dim, mode=cfg.embeddings.pooling, sparse=True)
    # TorchRec's default init (EmbeddingBagConfig), not torch's N(0, 1): both sides start alike
    bound = math.sqrt(1.0 / table.num_embeddings)
    nn.init.uniform_(bag.weight, -bound, bound)
    return bag


def _pool(table: nn.EmbeddingBag, raw_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Raw ids [N] in bags of `lengths` [B*T] -> pooled [B*T, dim] (empty bags give zeros)."""
    starts = torch.cumsum(lengths, dim=0, dtype=torch.int64) - lengths  # [B*T] each bag's first id
    return table(hash_rows(raw_ids, table.num_embeddings), starts)


def _other_ranks_rows(x: torch.Tensor) -> torch.Tensor:
    """[n, d] -> [(world - 1) * n, d]: the other ranks' rows, differentiable, as InfoNCE negatives."""
    others = [r for i, r in enumerate(dist_nn.all_gather(x)) if i != dist.get_rank()]
    return torch.cat(others, dim=0) if others else x.new_zeros((0, x.shape[1]))


class PeerTrainer:
    """One rank of the peer, in a process whose default process group already exists."""

    def __init__(self, cfg: RunConfig):
        if cfg.deepspeed.gradient_accumulation_steps != 1:
            raise ValueError("the DDP peer steps once per micro-batch: "
                             "set deepspeed.gradient_accumulation_steps=1")
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.loader = ShardedLoader(cfg.data.features, self.rank, self.world_size,
                                    batch_size=cfg.train.batch_size, seed=cfg.train.seed, splits=("train",),
                                    shuffle_window=cfg.data.shuffle_window)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = PeerModel(cfg, read_spec(Path(cfg.data.features)), _other_ranks_rows)
        self.ddp = DistributedDataParallel(model)
        self.dense_params = list(model.umask.parameters())
        self.tables = torch.optim.Adagrad([model.app.weight, model.loc.weight], lr=cfg.embeddings.lr,
                                          eps=cfg.embeddings.eps)
        self.dense = torch.optim.AdamW(self.dense_params, lr=cfg.deepspeed.lr,
                                       weight_decay=cfg.deepspeed.weight_decay)
        self.step = 0

    def train_step(self) -> dict[str, float]:
        """One step; returns the loss (mean over ranks) and data_wait, this rank's loader share."""
        started = time.perf_counter()
        batch = next(self.loader)
        waited = time.perf_counter() - started
        generator = torch.Generator().manual_seed(hash((self.cfg.train.seed, self.rank, self.step)) & 0x7FFF_FFFF)
        out = self.ddp(batch, generator)
        self.tables.zero_grad(set_to_none=True)
        self.dense.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.dense_params, self.cfg.deepspeed.gradient_clipping)
        self.tables.step()
        self.dense.step()
        self.step += 1
        # the mean loss over ranks, as a training loop logs it (one collective per step)
        logged = torch.stack([out["loss"].detach(), out["reconstruction"], out["consistency"]])
        dist.all_reduce(logged)
        loss = logged[0].item() / self.world_size
        return {"loss": loss, "data_wait": waited / (time.perf_counter() - started)}

    def close(self) -> None:
        self.loader.close()


def _train_rank(cfg: RunConfig, warmup_steps: int) -> dict | None:
    """Trains cfg.train.steps steps on this rank; rank 0 returns the steady-state figures."""
    peer = PeerTrainer(cfg)
    step_ends, metrics = [], []
    try:
        for _ in range(cfg.train.steps):
            metrics.append(peer.train_step())
            step_ends.append(time.perf_counter())
    finally:
        peer.close()
    if peer.rank != 0:
        return None
    measured = cfg.train.steps - warmup_steps
    seconds = step_ends[-1] - step_ends[warmup_steps - 1]
    return {"steps_per_s": measured / seconds,
            "examples_per_s": measured * cfg.train.batch_size * peer.world_size / seconds,
            "data_wait": sum(m["data_wait"] for m in metrics[warmup_steps:]) / measured,
            "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"]}


def _rank_main(rank: int, world_size: int, port: int, rank_fn, args: tuple, out_dir: str,
               backend: str = "gloo") -> None:
    # stdout is the benchmark's JSON lines; a rank's chatter (DeepSpeed's op build, compilers) goes to stderr
    os.dup2(2, 1)
    torch.set_num_threads(1)  # as a Ray Train worker with cpus_per_worker=1 runs
    # DeepSpeed (when rank_fn builds our trainer) reads the rank and accelerator from the environment
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    # the trainer's all-gather is the same deprecated call; Adagrad's sparse path warns once per rank
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = rank_fn(*args)
        if rank == 0:
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


def spawn_ranks(world_size: int, rank_fn, args: tuple, timeout_s: float = 600.0, backend: str = "gloo") -> dict:
    """Runs rank_fn(*args) on world_size new processes joined by `backend` (gloo; nccl for one
    GPU per rank) on 127.0.0.1, one torch thread each; returns rank 0's result (JSON-able).
    rank_fn must be a module-level function.
    The processes are ended, by their own handles, on any failure or timeout."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as out_dir:
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, rank_fn, args, out_dir, backend))
                 for rank in range(world_size)]
        try:
            for proc in procs:
                proc.start()
            deadline = time.monotonic() + timeout_s
            for proc in procs:
                proc.join(max(deadline - time.monotonic(), 0.0))
            errors = sorted(Path(out_dir).glob("rank*.error"))
            if errors:
                raise RuntimeError("a rank failed:\n" + "\n".join(p.read_text() for p in errors))
            if any(proc.exitcode is None for proc in procs):
                raise RuntimeError(f"the ranks did not finish within {timeout_s:.0f} s")
            if any(proc.exitcode != 0 for proc in procs):
                raise RuntimeError(f"ranks exited with {[proc.exitcode for proc in procs]}")
            return json.loads((Path(out_dir) / "result.json").read_text())
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join()


def run_peer(cfg: RunConfig, warmup_steps: int, timeout_s: float = 600.0) -> dict:
    """Trains the peer on cfg.ray.num_workers local processes; rank 0's figures over the steps
    after `warmup_steps`: steps_per_s, examples_per_s, data_wait (share of the step spent in the
    loader), loss_first and loss_last (mean over ranks)."""
    if not 0 < warmup_steps < cfg.train.steps:
        raise ValueError(f"warmup_steps must be in [1, train.steps={cfg.train.steps}), got {warmup_steps}")
    return spawn_ranks(cfg.ray.num_workers, _train_rank, (cfg, warmup_steps), timeout_s)
