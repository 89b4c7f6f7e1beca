"""Featurize at scale: events/s and peak memory of ours on Ray against its peers, in one run.

On one synthetic contract dataset (bench/featurize_data.py: Parquet files of events, apps,
locations without regions; 1,000 events per user-week), each contender runs in a fresh
process (wall time from after Ray is up, so Ray's start-up is nobody's cost), while a sampler
reads the resident memory of every process involved (the contender, its Ray workers and, for
two nodes, both `ray start` nodes) every 0.2 s:
- floor: reading the Parquet alone, as Ray tasks on the same shares as ours (the I/O floor);
- ours: `trainer.data.featurize.featurize` (both phases as Ray tasks) on an embedded Ray of
  2 CPUs, and on two local `ray start` nodes of 1 CPU each (ray.address);
- one process: the contract reader and both phases in one process (featurize_events), the
  single-process featurizer as it was before the Ray tasks;
- Ray Data: read_parquet -> map_batches(contract normalisation) -> groupby("user_id")
  .map_groups(umask.slots.Slots per user) -> write_parquet, on the same embedded Ray.
Prints one JSON line: per contender events/s, seconds, peak RSS of the largest process and of
all together (MB), and ours / each peer.

    .venv/bin/python bench/featurize_bench.py [--events 10000000] [--only floor,ours,...] [--timeout S] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench.featurize_data from the checkout
    sys.path.insert(0, str(REPO))
CONTENDERS = ("floor", "ours", "ours_2_nodes", "one_process", "ray_data")
SETTINGS = ["--config", str(REPO / "configs" / "tiny.yaml")]


def data_settings(source: Path, features: Path, events: int) -> list[str]:
    shards = max(8, -(-events // 3_000_000))  # ~3 M events per bucket: ~1.5 GB per task
    return [f"data.source={source}", f"data.features={features}", f"data.num_shards={shards}"]


# --- the contenders, each run as `python featurize_bench.py --contender NAME ...` -----------

def run_contender(name: str, source: Path, features: Path, events: int, address: str | None) -> dict:
    from trainer.config import load_config
    from trainer.training.launch import start_embedded_ray

    cfg = load_config(SETTINGS[1:], data_settings(source, features, events) + ([f"ray.address={address}"] if address else []))
    if name == "one_process":
        return _one_process(cfg)
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        start_embedded_ray(2)
    started = time.perf_counter()
    if name == "floor":
        rows = _read_only(cfg)
    elif name == "ray_data":
        rows = _ray_data(cfg)
    else:
        from trainer.data.featurize import featurize

        rows = featurize(cfg)["events"]["read"]
    return {"events": rows, "seconds": time.perf_counter() - started}


def _read_only(cfg) -> int:
    import pyarrow.parquet as pq
    import ray

    from trainer.data.tasks import plan_units
    from umask.contract import open_dataset

    @ray.remote(num_cpus=1)
    def read(path: str, row_groups) -> int:
        groups = None if row_groups is None else list(range(*row_groups))
        return sum(b.num_rows for b in pq.ParquetFile(path).iter_batches(1 << 20, row_groups=groups))

    units = plan_units(open_dataset(cfg.data.source).event_files, cfg.data.read_task_rows)
    return sum(ray.get([read.remote(u.path, u.row_groups) for u in units]))


def _one_process(cfg) -> dict:
    from trainer.data.featurize import build_feature_spec, featurize_events, prepare_output
    from umask.contract import EventReader, open_dataset, read_apps, read_locations

    started = time.perf_counter()
    ds = open_dataset(cfg.data.source)
    prepare_output(Path(cfg.data.features))
    spec, maps = build_feature_spec(read_apps(ds, cfg.data.num_categories), read_locations(ds), cfg.data)
    manifest = featurize_events(EventReader(ds, "strict").batches(), spec, maps, cfg.data, cfg.data.features)
    return {"events": manifest["events"]["read"], "seconds": time.perf_counter() - started}


def _ray_data(cfg) -> int:
    """The straightforward Ray Data pipeline: the same contract checks and the same Slots code,
    grouped by user with Ray Data's own shuffle."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from trainer.data.featurize import build_feature_spec, examples_table
    from umask import contract
    from umask.slots import Slots
    from umask.spec import SPLITS

    ds = contract.open_dataset(cfg.data.source)
    spec, maps = build_feature_spec(contract.read_apps(ds, cfg.data.num_categories), contract.read_locations(ds), cfg.data)
    plausible = cfg.data.plausible_range()

    def normalize(batch: pa.Table) -> pa.Table:
        rows, checks = contract._normalize(batch.combine_chunks().to_batches()[0], plausible)
        invalid = contract._any_failed(checks, batch.num_rows)
        return pa.Table.from_batches([rows]).filter(pc.invert(invalid))

    def user_examples(events: pa.Table) -> pa.Table:
        slots = Slots(events.cast(contract.NORMALIZED_EVENTS), spec, maps)
        rows = slots.rows(0, len(slots))
        parts = [examples_table(rows.take(np.flatnonzero(rows.split == s)), SPLITS[s], spec.slots,
                                spec.layout.num_channels) for s in np.unique(rows.split)]
        return pa.concat_tables(parts)

    events = ray.data.read_parquet([str(p) for p in ds.event_files])
    examples = events.map_batches(normalize, batch_format="pyarrow").groupby("user_id").map_groups(
        user_examples, batch_format="pyarrow")
    examples.write_parquet(str(Path(cfg.data.features) / "ray_data"))
    return sum(pq.read_metadata(p).num_rows for p in ds.event_files)


# --- the driver: nodes, memory sampling, one line ---------------------------------------

class TreeSampler:
    """Peak RSS (MB) of the largest process and of all together, over the trees of `roots`."""

    def __init__(self, roots: list[int]):
        self.roots, self.largest, self.total = roots, 0.0, 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.2):
            sizes = []
            for root in self.roots:
                try:
                    parent = psutil.Process(root)
                    for p in [parent, *parent.children(recursive=True)]:
                        sizes.append(p.memory_info().rss / 2**20)
                except psutil.Error:
                    continue
            if sizes:
                self.largest, self.total = max(self.largest, max(sizes)), max(self.total, sum(sizes))

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"peak_rss_largest_mb": round(self.largest), "peak_rss_total_mb": round(self.total)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_nodes(work: Path, env: dict) -> tuple[str, list[subprocess.Popen]]:
    """A head and a worker node (1 CPU each) on loopback, each in a session of its own."""
    gcs = f"127.0.0.1:{_free_port()}"
    ray = str(Path(sys.executable).parent / "ray")
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
              "--dashboard-agent-listen-port", str(_free_port())]
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    head = subprocess.Popen([ray, "start", "--head", "--port", gcs.rpartition(":")[2], "--include-dashboard", "false",
                             "--temp-dir", str(temp), "--disable-usage-stats", *common],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(15)
    common[-1] = str(_free_port())
    node = subprocess.Popen([ray, "start", "--address", gcs, "--temp-dir", str(temp / "node1"), *common],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(15)
    return gcs, [head, node]


def stop_nodes(nodes: list[subprocess.Popen]) -> None:
    """Ends every process of each node's session, by process group (never `ray stop`)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for node in nodes:
            try:
                os.killpg(node.pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)
    for node in nodes:
        node.wait()


def measure(name: str, source: Path, work: Path, events: int, timeout_s: float) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    nodes, address = [], None
    if name == "ours_2_nodes":
        address, nodes = start_two_nodes(work, env)
    features = work / f"features-{name}"
    try:
        child = subprocess.Popen([sys.executable, __file__, "--contender", name, "--source", str(source),
                                  "--features", str(features), "--events", str(events)]
                                 + (["--address", address] if address else []),
                                 env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        sampler = TreeSampler([child.pid, *(n.pid for n in nodes)])
        try:
            out, _ = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # it and its embedded Ray, by its own session
            stop_nodes([child])
            return {"unfinished_after_s": timeout_s, "events_per_s_below": round(events / timeout_s),
                    **sampler.finish()}
        memory = sampler.finish()
        if child.returncode:
            return {"failed": child.returncode}
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        stop_nodes(nodes)
        subprocess.run(["rm", "-rf", str(features)])
    return {"events_per_s": round(result["events"] / result["seconds"]), "seconds": round(result["seconds"], 1),
            **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--only", default=",".join(CONTENDERS))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a contender may run")
    parser.add_argument("--work", type=Path, help="folder for the dataset (kept) and outputs (removed)")
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--features", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        print(json.dumps(run_contender(args.contender, args.source, args.features, args.events, args.address)))
        return
    from bench.featurize_data import write_dataset

    with tempfile.TemporaryDirectory(prefix="featurize_bench_") as tmp:
        work = args.work or Path(tmp)
        source = work / f"events-{args.events}"
        if not source.exists():
            write_dataset(source, args.events, max(1, args.events // 2000), max(2, args.events // 5_000_000))
        results = {name: measure(name, source, work, args.events, args.timeout) for name in args.only.split(",")}
    ours = results.get("ours", {}).get("events_per_s")
    ratios = {f"ours/{k}": round(ours / v["events_per_s"], 3) for k, v in results.items()
              if ours and k != "ours" and "events_per_s" in v}
    print(json.dumps({"bench": "featurize", "events": args.events, "cpus": os.cpu_count(), **results, **ratios}))


if __name__ == "__main__":
    main()
