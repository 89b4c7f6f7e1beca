"""Embedding tables alone: lookup + backward + update of our sharded tables against plain torch.

For each size (rows per table) and world size, in one run, each method in its own fresh
processes (so a process's peak memory is that method's), joined by gloo on 127.0.0.1 (nccl
with --device cuda), one torch thread per worker on CPU:
- ours:        embeddings.sharded.ShardedTables (TorchRec, the planner's plan, FBGEMM's fused
               row-wise Adagrad stepping inside backward);
- sparse_adam: nn.EmbeddingBag(sparse=True) stepped by torch.optim.SparseAdam, in
               DistributedDataParallel (a whole copy of every table on every worker; on one
               GPU without DDP, whose nccl backend has no sparse all-reduce);
- ddp_peer:    bench/ddp_peer.py's table path (nn.EmbeddingBag(sparse=True) with TorchRec's
               initial range, ids hashed by embeddings.ids.hash_rows, sparse Adagrad), in DDP.
Both tables (app and loc) of ROWS x DIM each; a step is one batch per worker of BATCH user-weeks
x SLOTS slots, every slot a bag of ids drawn from a Zipf law over 10^9 raw ids (1 + Poisson(1)
ids per bag), hashed onto the rows; loss = sum(pooled * a fixed random tensor). Reported per
(rows, workers, method): examples/s (user-weeks over all workers) over the timed steps, peak
resident memory of each worker (ru_maxrss) and its resident memory before the tables were
built (the interpreter, torch and TorchRec), each worker's CPU time per step (process time:
other processes on the machine skew it far less than wall time, but it leaves out time spent
waiting for the other worker), and on CUDA the peak allocated device memory. Then a summary
line with ours / peer ratios and the memory the peers' replicas cost.

    .venv/bin/python bench/tables_bench.py [--rows 100000 1000000 10000000] [--workers 1 2]
        [--dim 16] [--steps 20] [--warmup 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from bench.ddp_peer import _pool, spawn_ranks  # noqa: E402

METHODS = ("ours", "sparse_adam", "ddp_peer")
TABLES = ("app", "loc")
BATCH, SLOTS = 8, 168  # user-weeks per worker and step, hourly slots per week (the DiT's N)
RAW_IDS = 10**9
LR, EPS = 0.05, 1e-8


def rss_mb() -> float:
    """This process's resident memory now, MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def batches(rank: int, steps: int, device: torch.device) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, per table: (raw ids [n] int64, bag lengths [BATCH*SLOTS] int64), made up front."""
    gen = torch.Generator().manual_seed(1000 + rank)
    zipf = 1.0 / torch.arange(1, 100_001, dtype=torch.float64) ** 1.1  # ranks of the 10^5 hottest ids
    out = []
    for _ in range(steps):
        step = {}
        for t, table in enumerate(TABLES):
            lengths = 1 + torch.poisson(torch.ones(BATCH * SLOTS), generator=gen).long()
            hot = torch.multinomial(zipf, int(lengths.sum()), replacement=True, generator=gen)
            step[table] = ((hot * 7919 + t) % RAW_IDS).to(device), lengths.to(device)  # spread over raw ids
        out.append(step)
    return out


class Replicated(nn.Module):
    """Both tables as nn.EmbeddingBag(sparse=True), hashed like the peer: [B*T, 2*dim]."""

    def __init__(self, rows: int, dim: int, device: torch.device):
        super().__init__()
        self.bags = nn.ModuleDict({t: nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, device=device)
                                   for t in TABLES})
        bound = (1.0 / rows) ** 0.5  # TorchRec's initial range, as the peer uses
        for bag in self.bags.values():
            nn.init.uniform_(bag.weight, -bound, bound)

    def forward(self, step: dict) -> torch.Tensor:
        return torch.cat([_pool(self.bags[t], *step[t]) for t in TABLES], dim=1)


def _build(method: str, rows: int, dim: int, device: torch.device):
    """(forward(step) -> pooled [B*T, 2*dim], optimizer step or None (ours steps in backward),
    zero_grad or None, the module to keep alive)."""
    if method == "ours":
        from embeddings.config import EmbeddingsConfig, TableConfig
        from embeddings.ids import IdMapper
        from embeddings.sharded import ShardedTables

        cfg = EmbeddingsConfig(app=TableConfig(num_embeddings=rows, dim=dim),
                               loc=TableConfig(num_embeddings=rows, dim=dim), lr=LR, eps=EPS)
        tables, ids = ShardedTables(cfg, dist.group.WORLD, device), IdMapper(cfg)

        def forward(step):
            return tables(ids.to_kjt(*step["app"], *step["loc"]).to(device))
        return forward, None, None, tables
    model = Replicated(rows, dim, device)
    if dist.get_backend() == "gloo" or dist.get_world_size() > 1:  # nccl has no sparse all-reduce
        model = nn.parallel.DistributedDataParallel(model)
    params = list(model.parameters())
    optimizer = (torch.optim.SparseAdam(params, lr=LR) if method == "sparse_adam"
                 else torch.optim.Adagrad(params, lr=LR, eps=EPS))
    return model, optimizer.step, lambda: optimizer.zero_grad(set_to_none=True), model


def _rank(method: str, rows: int, dim: int, steps: int, warmup: int, device_type: str) -> dict:
    if device_type == "cuda":
        torch.cuda.set_device(dist.get_rank())
    device = torch.device(device_type, dist.get_rank()) if device_type == "cuda" else torch.device("cpu")
    work = batches(dist.get_rank(), steps, device)
    weights = torch.randn(BATCH * SLOTS, 2 * dim, generator=torch.Generator().manual_seed(0)).to(device)
    before = rss_mb()
    torch.manual_seed(0)
    started = time.perf_counter()
    forward, step, zero_grad, _keep = _build(method, rows, dim, device)
    build_s = time.perf_counter() - started
    times, cpu_times = [], []
    for batch in work:
        if zero_grad:
            zero_grad()
        started, cpu_started = time.perf_counter(), time.process_time()
        (forward(batch) * weights).sum().backward()  # ours: the tables step inside backward
        if step:
            step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    seconds = sum(times[warmup:])
    cpu_ms = sum(cpu_times[warmup:]) * 1e3 / (steps - warmup)
    figures = torch.tensor([peak_rss_mb(), before, seconds,
                            torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda" else 0.0,
                            cpu_ms], dtype=torch.float64)
    gathered = [torch.zeros_like(figures) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, figures.to(device) if device_type == "cuda" else figures)
    gathered = [g.cpu() for g in gathered]
    world = dist.get_world_size()
    slowest = max(float(g[2]) for g in gathered)  # the step ends when the slowest worker's does
    out = {"examples_per_s": round((steps - warmup) * BATCH * world / slowest, 1),
           "peak_rss_mb": [round(float(g[0])) for g in gathered],
           "rss_before_tables_mb": [round(float(g[1])) for g in gathered],
           "cpu_ms_per_step": [round(float(g[4]), 2) for g in gathered],
           "build_s": round(build_s, 2)}
    if device_type == "cuda":
        out["peak_device_mb"] = [round(float(g[3])) for g in gathered]
    return out


def measure(rows: int, workers: int, dim: int, steps: int, warmup: int, device_type: str) -> dict:
    line = {"bench": "tables", "rows": rows, "dim": dim, "workers": workers, "device": device_type,
            "batch_per_worker": BATCH, "slots": SLOTS, "steps": steps, "warmup_steps": warmup,
            "load_avg_1m": [round(os.getloadavg()[0], 2)]}
    for method in METHODS:
        try:
            line[method] = spawn_ranks(workers, _rank, (method, rows, dim, steps, warmup, device_type),
                                       backend="nccl" if device_type == "cuda" else "gloo")
        except Exception as err:  # reported in the line; the other methods and sizes still run
            line[method] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"}
    line["load_avg_1m"].append(round(os.getloadavg()[0], 2))
    if all("error" not in line[m] for m in METHODS):
        line["ours_over"] = {m: round(line["ours"]["examples_per_s"] / line[m]["examples_per_s"], 2)
                             for m in METHODS[1:]}
        # the same from each worker's CPU time per step (what load from other processes skews least)
        line["ours_over_by_cpu_time"] = {
            m: round(max(line[m]["cpu_ms_per_step"]) / max(line["ours"]["cpu_ms_per_step"]), 2) for m in METHODS[1:]}
        # what holding the whole tables on every worker costs, beyond our shard: per worker, MB
        line["peer_extra_mb_per_worker"] = {
            m: round(max(line[m]["peak_rss_mb"]) - max(line["ours"]["peak_rss_mb"])) for m in METHODS[1:]}
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.workers):
        print(f"tables_bench: --device cuda needs {max(args.workers)} CUDA GPU(s), "
              f"found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    lines = []
    for rows in args.rows:
        for workers in args.workers:
            lines.append(measure(rows, workers, args.dim, args.steps, args.warmup, args.device))
            print(json.dumps(lines[-1]), flush=True)
    print(json.dumps({"bench": "tables_summary", "ours_over": {
        f"{line['rows']}_{line['workers']}w": line.get("ours_over") for line in lines},
        "ours_over_by_cpu_time": {
        f"{line['rows']}_{line['workers']}w": line.get("ours_over_by_cpu_time") for line in lines},
        "failed": [f"{line['rows']}_{line['workers']}w_{m}" for line in lines for m in METHODS
                   if "error" in line[m]]}), flush=True)
    return 1 if any("error" in line[m] for line in lines for m in METHODS) else 0


if __name__ == "__main__":
    sys.exit(main())
