"""Distributed training throughput: `u-mask train` (Ray + DeepSpeed + TorchRec) against plain DDP.

For each size in {tiny, base_like} and each world size in {1, 2} CPU workers, in one run and
one after the other on the same synthetic dataset:
- ours: trainer.training.launch.train(cfg) on an embedded Ray (loopback, one CPU per worker), steady
  state read from rank 0's metrics.csv: steps/s and examples/s over the steps after the
  warm-up (elapsed_s of the last step minus that of the last warm-up step), and the mean
  data_wait share of those steps (issue 3's target: below 5 %);
- peer: bench.ddp_peer.run_peer(cfg), the same U-MASK model and loader batches under torch DDP
  with EmbeddingBag(sparse=True) tables, timed over the same steps.
ratio = ours / peer in examples/s (above 1: ours is faster). Sizes:
- tiny: configs/tiny.yaml as shipped (DiT width 64, depth 2; tables 4096 x 16);
- base_like: configs/model/base.yaml (DiT-B, 130 M parameters) is far too slow for a 2-core
  CPU, so this bench stands in width 256, depth 4, 4 heads of 64, user_dim 64 and
  200,000 x 32 tables (the shape of base, scaled down; the head size the kernel is tuned for).
Every worker runs one torch thread (Ray sets OMP_NUM_THREADS to the worker's 1 CPU; the peer
calls torch.set_num_threads(1)). Other work on the machine skews both sides, so each line
carries the 1-minute load average before and after it. One JSON line per (size, workers),
then a summary line.

    .venv/bin/python bench/train_bench.py [--quick] [--steps 24] [--warmup 4] [--profile]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ddp_peer import PeerTrainer, run_peer, spawn_ranks  # noqa: E402
from trainer.config import RunConfig, load_config  # noqa: E402
from trainer.data.featurize import featurize  # noqa: E402
from trainer.data.synth import synthesize  # noqa: E402
from trainer.training.launch import train  # noqa: E402

TINY_PRESET = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SIZES = {
    "tiny": (),
    "base_like": ("model.hidden=256", "model.depth=4", "model.heads=4", "model.user_dim=64",
                  "embeddings.app.num_embeddings=200000", "embeddings.app.dim=32",
                  "embeddings.loc.num_embeddings=200000", "embeddings.loc.dim=32"),
}
WORKERS = (1, 2)
PROFILE_TOP_OPS = 12
# Profiler event names of collectives and their waits (gloo ops, DDP's and TorchRec's all-to-all
# and all-gather autograd functions and awaitables); their self time is mostly waiting for the
# other rank, so load imbalance shows up here too.
COLLECTIVE_MARKS = ("c10d::", "all2all", "alltoall", "allgather", "all_gather", "allreduce", "awaitable")
ERROR_CHARS = 300  # of a failure's message in the JSON line (the traceback goes to stderr)


def make_dataset(root: Path, users: int, days: int) -> list[str]:
    """Synthesizes and featurizes a dataset under root; the overrides that point a config at it."""
    data = [f"data.source={root / 'raw'}", f"data.features={root / 'features'}"]
    synthesize(root / "raw", users=users, days=days, seed=0)
    featurize(load_config([str(TINY_PRESET)], data))
    return data


def bench_config(data: list[str], runs: Path, size: str, workers: int, steps: int) -> RunConfig:
    return load_config([str(TINY_PRESET)], [
        *data, *SIZES[size], f"ray.num_workers={workers}", f"ray.storage_path={runs}",
        f"ray.name={size}-{workers}w", f"train.steps={steps}", "train.log_every=1",
        f"train.checkpoint_every={steps}"])  # one checkpoint, after the last timed step


def steady_state(metrics_csv: Path, warmup: int, examples_per_step: int) -> dict:
    """Steps/s, examples/s and mean data_wait over the logged steps after `warmup`."""
    with metrics_csv.open() as f:
        rows = {int(row["step"]): row for row in csv.DictReader(f)}
    last = max(rows)
    if warmup not in rows or last <= warmup:
        raise RuntimeError(f"{metrics_csv}: needs every step logged up to {last} > warm-up {warmup}")
    seconds = float(rows[last]["elapsed_s"]) - float(rows[warmup]["elapsed_s"])
    measured = [rows[s] for s in range(warmup + 1, last + 1)]
    return {"steps_per_s": (last - warmup) / seconds,
            "examples_per_s": (last - warmup) * examples_per_step / seconds,
            "data_wait": sum(float(r["data_wait"]) for r in measured) / len(measured),
            "loss_first": float(rows[min(rows)]["loss"]), "loss_last": float(rows[last]["loss"])}


def measure_ours(cfg: RunConfig, warmup: int) -> dict:
    result = train(cfg)
    if result.error:
        raise RuntimeError(f"our trainer failed on {cfg.ray.name}: {result.error}")
    run_dir = Path(cfg.ray.storage_path) / cfg.ray.name
    return steady_state(run_dir / "metrics.csv", warmup, cfg.train.batch_size * cfg.ray.num_workers)


def rounded(figures: dict) -> dict:
    return {k: round(v, 4) for k, v in figures.items()}


def failure(err: Exception) -> dict:
    """A side that failed, as its JSON figure: the exception's type and the last line of its message."""
    lines = str(err).strip().splitlines() or [""]
    return {"error": f"{type(err).__name__}: {lines[-1][:ERROR_CHARS]}"}


def measure(cfg: RunConfig, size: str, warmup: int) -> dict:
    """One (size, workers) line. A side that fails gets an "error" figure and no ratio, so the
    other configurations still run."""
    line = {"bench": "train", "size": size, "workers": cfg.ray.num_workers,
            "batch_per_worker": cfg.train.batch_size, "steps": cfg.train.steps, "warmup_steps": warmup}
    load_before = os.getloadavg()[0]
    sides = {}
    for side, run in (("ours", measure_ours), ("ddp_peer", run_peer)):
        try:
            sides[side] = rounded(run(cfg, warmup))
        except Exception as err:  # reported in the line; main() fails the bench at the end
            traceback.print_exc()
            sides[side] = failure(err)
    line.update(sides)
    if not any("error" in figures for figures in sides.values()):
        line["ratio_examples_per_s"] = round(sides["ours"]["examples_per_s"] / sides["ddp_peer"]["examples_per_s"], 3)
        line["data_wait_below_5pct"] = sides["ours"]["data_wait"] < 0.05
    line["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return line


def profile_rank(cfg: RunConfig, run_dir: str, steps: int, warmup: int) -> dict:
    """Our Trainer and the peer built side by side in this rank: after `warmup` steps of each,
    `steps` timed steps of each (alternating), then `steps` steps of each under torch.profiler. Per side:
    ms per step without the profiler, the profiled ops' self time per step (what is left of the
    profiled step is Python between ops), the part of it in collectives and the ops that take
    most of it."""
    from torch.profiler import ProfilerActivity, profile

    from trainer.training.loop import Trainer

    sides = {"ours": Trainer(cfg, Path(run_dir)), "ddp_peer": PeerTrainer(cfg)}
    for _ in range(warmup):
        for side in sides.values():
            side.train_step()
    seconds = dict.fromkeys(sides, 0.0)
    for _ in range(steps):  # alternating step by step, so a change in the machine's load hits both
        for name, side in sides.items():
            started = time.perf_counter()
            side.train_step()
            seconds[name] += time.perf_counter() - started
    figures = {}
    for name, side in sides.items():
        step_ms = seconds[name] * 1e3 / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            for _ in range(steps):
                side.train_step()
            profiled_ms = (time.perf_counter() - started) * 1e3 / steps
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        op_ms = sum(e.self_cpu_time_total for e in ops) / 1e3 / steps
        collective_ms = sum(e.self_cpu_time_total for e in ops
                            if any(mark in e.key.lower() for mark in COLLECTIVE_MARKS)) / 1e3 / steps
        figures[name] = {"ms_per_step": round(step_ms, 2), "profiled_ms_per_step": round(profiled_ms, 2),
                         "op_self_ms_per_step": round(op_ms, 2), "collective_ms_per_step": round(collective_ms, 2),
                         "top_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 2)
                                                 for e in ops[:PROFILE_TOP_OPS]}}
    return figures


def run_profile(data: list[str], root: Path, size: str, workers: int, steps: int, warmup: int) -> dict:
    cfg = bench_config(data, root / "runs", size, workers, steps)
    run_dir = root / "runs" / f"profile-{size}-{workers}w"
    figures = spawn_ranks(workers, profile_rank, (cfg, str(run_dir), steps, warmup))
    return {"bench": "train_profile", "size": size, "workers": workers, "rank": 0, "steps": steps,
            **figures,
            "ratio_ms_per_step": round(figures["ours"]["ms_per_step"] / figures["ddp_peer"]["ms_per_step"], 3),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def run_matrix(data: list[str], root: Path, sizes: list[str], workers_list: list[int], steps: int,
               warmup: int) -> list[dict]:
    """Both sides for every (size, workers), one embedded Ray for all; prints each line as it comes."""
    import ray

    # Loopback, and CPUs for the largest run: its workers plus Ray Train's controller.
    ray.init(num_cpus=max(workers_list) + 1, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    try:
        lines = []
        for size in sizes:
            for workers in workers_list:
                lines.append(measure(bench_config(data, root / "runs", size, workers, steps), size, warmup))
                print(json.dumps(lines[-1]), flush=True)
        return lines
    finally:
        ray.shutdown()


def summary(lines: list[dict]) -> dict:
    measured = [line for line in lines if "ratio_examples_per_s" in line]
    return {"bench": "train", "summary": {
        f"{line['size']}_{line['workers']}w": {"ratio_examples_per_s": line["ratio_examples_per_s"],
                                               "data_wait": line["ours"]["data_wait"]}
        for line in measured},
        "data_wait_below_5pct": all(line["data_wait_below_5pct"] for line in measured),
        "failed": [f"{line['size']}_{line['workers']}w" for line in lines if line not in measured]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="120 users and 10 steps instead of 240 and 24")
    parser.add_argument("--steps", type=int, help="steps per run (default 24, quick 10)")
    parser.add_argument("--warmup", type=int, help="first steps left out of the figures (default 4, quick 3)")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--workers", nargs="+", type=int, choices=WORKERS, default=list(WORKERS))
    parser.add_argument("--profile", action="store_true",
                        help="instead: our Trainer and the peer in the same ranks (no Ray), timed and "
                             "profiled step by step; one line per (size, workers)")
    args = parser.parse_args()
    steps = args.steps or (10 if args.quick else 24)
    warmup = args.warmup or (3 if args.quick else 4)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as folder:
        root = Path(folder)
        data = make_dataset(root, users=120 if args.quick else 240, days=14)
        if args.profile:
            for size in args.sizes:
                for workers in args.workers:
                    print(json.dumps(run_profile(data, root, size, workers, steps, warmup)), flush=True)
            return
        lines = run_matrix(data, root, args.sizes, args.workers, steps, warmup)
    result = summary(lines)
    print(json.dumps(result), flush=True)
    if result["failed"]:
        raise RuntimeError(f"train bench: {', '.join(result['failed'])} failed (tracebacks above)")


if __name__ == "__main__":
    main()
