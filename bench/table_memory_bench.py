"""Peak memory of a rank holding sharded tables: built on the meta device, one step, then a
checkpoint save by our StreamingSafetensorsWriter and by its peer, DCP's HuggingFaceStorageWriter.

2 gloo ranks on this machine, app and loc tables of ROWS x DIM (table-wise: one table per
rank, 4 bytes a value), row-wise Adagrad. Each rank reports its peak resident memory (the
kernel's high-water mark, trainer/training/memory.py) after building the tables, after a
fused step, after our save and after the peer's save, and each save's seconds. The peak only
rises, so ours is saved first: the growth at each save is that save's own extra memory.

    .venv/bin/python -m bench.table_memory_bench [--rows 1e6] [--dim 64]
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GIB = 2**30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, rows: int, dim: int, folder: str, results) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from embeddings.checkpoint import save_sharded
    from embeddings.config import EmbeddingsConfig, TableConfig
    from embeddings.ids import IdMapper
    from embeddings.sharded import ShardedTables
    from trainer.training.memory import peak_rss_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        peaks = {"start": peak_rss_bytes()}
        table = TableConfig(num_embeddings=rows, dim=dim, sharding_types=["table_wise"])
        cfg = EmbeddingsConfig(app=table, loc=table)
        started = time.perf_counter()
        tables = ShardedTables(cfg, dist.group.WORLD, torch.device("cpu"))
        build_s = time.perf_counter() - started
        peaks["built"] = peak_rss_bytes()
        ids, lengths = torch.arange(64), torch.ones(64, dtype=torch.int64)
        tables(IdMapper(cfg).to_kjt(ids, lengths, ids, lengths)).sum().backward()
        peaks["stepped"] = peak_rss_bytes()
        seconds = {}
        started = time.perf_counter()
        save_sharded(tables, Path(folder) / "ours")
        seconds["ours"] = time.perf_counter() - started
        peaks["ours_saved"] = peak_rss_bytes()
        started = time.perf_counter()
        dcp.save(tables.state_dict(), storage_writer=HuggingFaceStorageWriter(
            str(Path(folder) / "peer"), save_distributed=True))
        seconds["peer"] = time.perf_counter() - started
        peaks["peer_saved"] = peak_rss_bytes()
        results.put((rank, {"build_s": round(build_s, 1),
                            "peak_gb": {k: round(v / GIB, 2) for k, v in peaks.items()},
                            "save_s": {k: round(v, 1) for k, v in seconds.items()}}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=1e6)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="table-memory-") as folder:
        procs = [ctx.Process(target=_rank, args=(rank, port, int(args.rows), args.dim, folder, results))
                 for rank in range(2)]
        for proc in procs:
            proc.start()
        try:
            by_rank = dict(results.get(timeout=1800) for _ in procs)
        finally:
            for proc in procs:
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.kill()
    shard_gb = int(args.rows) * args.dim * 4 / GIB
    for rank in sorted(by_rank):
        out = by_rank[rank]
        peaks = out["peak_gb"]
        print(json.dumps({"bench": "table_memory", "rows": int(args.rows), "dim": args.dim, "rank": rank,
                          "shard_gb": round(shard_gb, 2), **out,
                          "ours_save_extra_gb": round(peaks["ours_saved"] - peaks["stepped"], 2),
                          "peer_save_extra_gb": round(peaks["peer_saved"] - peaks["ours_saved"], 2)}),
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
