"""Logged metrics over ranks: one all-reduce per metric and a host copy each, against one stacked
all-reduce and one host copy (what trainer/training/loop.py's MetricWindow does).

2 gloo ranks on this machine, 4 metrics, ROUNDS rounds after a warm-up; the figure is each
variant's median milliseconds per round on rank 0, and the ratio separate / stacked.

    .venv/bin/python -m bench.metric_sync_bench [--rounds 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

METRICS = 4  # loss, reconstruction, consistency, data_wait


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _separate(values: list[torch.Tensor]) -> list[float]:
    out = []
    for v in values:
        v = v.clone()
        dist.all_reduce(v)
        out.append(v.item() / dist.get_world_size())
    return out


def _stacked(values: list[torch.Tensor]) -> list[float]:
    stacked = torch.stack(values)
    dist.all_reduce(stacked)
    return (stacked / dist.get_world_size()).tolist()


def _rank(rank: int, port: int, rounds: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    values = [torch.rand(()) for _ in range(METRICS)]
    timings = {}
    for name, fn in (("separate", _separate), ("stacked", _stacked)):
        for _ in range(50):
            fn(values)
        times = []
        for _ in range(rounds):
            dist.barrier()
            began = time.perf_counter()
            fn(values)
            times.append(time.perf_counter() - began)
        timings[name] = statistics.median(times) * 1000
    if rank == 0:
        results.put(timings)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_rank, args=(_free_port(), args.rounds, results), nprocs=2, start_method="spawn")
    timings = results.get()
    print(json.dumps({"bench": "metric_sync", "ranks": 2, "metrics": METRICS, "rounds": args.rounds,
                      "separate_ms": round(timings["separate"], 3), "stacked_ms": round(timings["stacked"], 3),
                      "ratio": round(timings["separate"] / timings["stacked"], 2)}))


if __name__ == "__main__":
    main()
