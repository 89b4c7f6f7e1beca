"""Export time, bundle size, and completion latency of the bundle against the training model.

For each size in {tiny, base_like} (bench/train_bench.py's SIZES), in one run:
- a real 2-step training on 1 Ray worker writes a checkpoint (the weights' values do not change
  what is timed);
- export: wall time of trainer.inference.export.export_bundle, and the bundle's bytes per part;
- completion latency per user on the CPU, for batches of 1 and of `--users` users' latest
  windows (the `short` task, the model's DDIM steps), taking turns round by round so that
  other load on the machine hits all three alike:
    training  the training model's eager forward as `u-mask complete` runs it
              (trainer.inference.complete.complete_windows: TorchRec tables + UMask)
    program   the bundle's torch.export program (umask.bundle.Bundle, engine="program")
    eager     the loader's model rebuilt from safetensors (engine="eager")
  Each includes the table lookups and the evidence sampling, and runs on one torch thread (two
  threads each on the 2 shared cores made every figure swing by 2x); reported as the median
  over rounds of milliseconds per user, and ratio = training / engine (above 1: the bundle is
  faster).

    .venv/bin/python bench/export_bench.py [--rounds 15] [--users 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_bench import SIZES, TINY_PRESET, make_dataset  # noqa: E402
from trainer.config import load_config  # noqa: E402


def checkpoint_of(size: str, work: Path, features: list[str]) -> Path:
    from trainer.training.launch import train

    cfg = load_config([str(TINY_PRESET)], [*features, *SIZES[size], f"ray.storage_path={work / 'runs'}",
                                           f"ray.name={size}", "ray.num_workers=1", "train.steps=2",
                                           "train.checkpoint_every=2", "train.log_every=1"])
    train(cfg)
    return work / "runs" / size


def part_sizes(bundle: Path) -> dict[str, int]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    parts: dict[str, int] = {}
    for name, entry in manifest["files"].items():
        part = name.split("/")[0] if "/" in name else name
        parts[part] = parts.get(part, 0) + entry["bytes"]
    parts["manifest.json"] = (bundle / "manifest.json").stat().st_size
    return parts


def latencies(run: Path, bundle: Path, events: Path, users: int, rounds: int) -> dict:
    import torch

    from trainer.inference.complete import complete_windows
    from trainer.inference.loading import load_inference_model
    from umask.bundle import Bundle
    from umask.slots import latest_windows

    torch.set_num_threads(1)
    inference = load_inference_model(run)
    loaded = Bundle(bundle)
    rows = latest_windows(events, loaded.spec, loaded.maps)
    engines = {
        "training": lambda r: complete_windows(inference, r, "short", None, None, seed=0),
        "program": lambda r: loaded.complete_rows(r, "short", seed=0, engine="program"),
        "eager": lambda r: loaded.complete_rows(r, "short", seed=0, engine="eager"),
    }
    out = {}
    for batch in (1, users):
        part = rows.take(list(range(min(batch, len(rows)))))
        for run_once in engines.values():  # warm-up: the program's first call loads it
            run_once(part)
        times = {name: [] for name in engines}
        with torch.no_grad():
            for _ in range(rounds):
                for name, run_once in engines.items():
                    started = time.perf_counter()
                    run_once(part)
                    times[name].append((time.perf_counter() - started) * 1e3 / len(part))
        ms = {name: statistics.median(values) for name, values in times.items()}
        out[f"batch_{len(part)}"] = {"ms_per_user": {k: round(v, 3) for k, v in ms.items()},
                                     "ratio_training_over": {k: round(ms["training"] / ms[k], 3)
                                                             for k in ("program", "eager")}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from trainer.inference.export import export_bundle

    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        work = Path(tmp)
        features = make_dataset(work, users=400, days=14)
        raw = Path(next(f for f in features if f.startswith("data.source=")).split("=", 1)[1])
        table = pq.read_table(raw / "events")
        events = work / "events.parquet"
        pq.write_table(table.filter(pc.is_in(table["user_id"], value_set=pc.unique(table["user_id"])[:args.users])),
                       events)
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
        try:
            for size in args.sizes:
                run = checkpoint_of(size, work, features)
                bundle = work / f"bundle-{size}"
                started = time.perf_counter()
                manifest = export_bundle(run, bundle)
                seconds = time.perf_counter() - started
                parts = part_sizes(bundle)
                print(json.dumps({
                    "bench": "export", "size": size, "export_s": round(seconds, 2),
                    "bundle_mb": round(sum(parts.values()) / 2**20, 2),
                    "parts_mb": {k: round(v / 2**20, 3) for k, v in sorted(parts.items())},
                    "tables": manifest["embeddings"]["tables"],
                    "latency": latencies(run, bundle, events, args.users, args.rounds),
                    "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
