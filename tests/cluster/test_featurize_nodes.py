"""`u-mask data featurize` on Ray clusters on loopback: on two nodes (`ray start --head` plus a
second `ray start`, each with one CPU) its tasks run on both nodes, and it writes the bytes of
the in-process run (trainer/data/featurize.py); a driver killed mid-run resumes on rerun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.config import RunConfig
from trainer.data.featurize import build_feature_spec, featurize_events, prepare_output
from umask.contract import EventReader, open_dataset, read_apps, read_locations
from umask.spec import WEEK_SECONDS, WINDOW_ORIGIN, file_sha256

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# task_memory_mb: the tiny data needs little, and each node must hold it whatever the machine has free
SETTINGS = dict(slots=24, num_categories=4, num_regions=3, num_shards=4, row_group_size=64, read_task_rows=1200,
                task_memory_mb=256)


def write_dataset(root: Path, users: int = 60, events: int = 4000) -> Path:
    """Two events files in row groups of 500 rows (four read tasks), apps and locations."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**62, users)
    (root / "events").mkdir(parents=True)
    for part in range(2):
        n = events // 2
        pq.write_table(pa.table({
            "user_id": ids[rng.integers(0, users, n)],
            "ts": WINDOW_ORIGIN + 2900 * WEEK_SECONDS + rng.integers(0, 2 * WEEK_SECONDS, n),
            "app_id": rng.integers(0, 40, n), "loc_id": rng.integers(0, 30, n)}),
            root / "events" / f"part-{part}.parquet", row_group_size=500)
    pq.write_table(pa.table({"app_id": np.arange(30), "category_id": np.arange(30, dtype=np.int32) % 4}),
                   root / "apps.parquet")
    pq.write_table(pa.table({"loc_id": np.arange(30), "lat": rng.uniform(-60, 60, 30),
                             "lon": rng.uniform(-180, 180, 30)}), root / "locations.parquet")
    return root


def outputs(features: Path) -> dict[str, str]:
    files = sorted(features.glob("split=*/shard=*/*.parquet")) + sorted((features / "spec").iterdir())
    return {str(p.relative_to(features)): file_sha256(p) for p in files}


def reference_outputs(raw: Path, features: Path) -> dict[str, str]:
    """The in-process run's shards and spec (featurize_events over the whole tables)."""
    cfg = RunConfig()
    for key, value in SETTINGS.items():
        setattr(cfg.data, key, value)
    ds = open_dataset(raw)
    prepare_output(features)
    featurize_events(EventReader(ds, "strict").batches(), *build_feature_spec(read_apps(ds, 4), read_locations(ds), cfg.data),
                     cfg.data, features)
    return outputs(features)


def featurize_command(raw: Path, features: Path, gcs: str) -> list[str]:
    return [str(Path(sys.executable).parent / "u-mask"), "data", "featurize", "--config", "configs/tiny.yaml",
            f"data.source={raw}", f"data.features={features}", f"ray.address={gcs}",
            *[f"data.{k}={v}" for k, v in SETTINGS.items()]]


def test_a_killed_driver_resumes_without_redoing_finished_buckets(loopback_cluster, tmp_path):
    """The driver is killed (SIGKILL, by its process id) while bucket 2's task hangs and the other
    buckets have finished; the rerun keeps their reports (same task pids) and does bucket 2."""
    raw = write_dataset(tmp_path / "raw")
    loopback_cluster.start_head("--num-cpus", "2", "--memory", str(2**31))
    features = tmp_path / "features"
    shards = features / "_staging" / "shards"
    driver = subprocess.Popen(featurize_command(raw, features, loopback_cluster.gcs), cwd=REPO,
                              env=loopback_cluster.env(UMASK_FAULTS="hang@bucket:2"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(list(shards.glob("shard-*.json"))) < 3:
            assert driver.poll() is None, "the run ended although bucket 2 hangs"
            assert time.monotonic() < deadline, loopback_cluster.logs()
            time.sleep(0.2)
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finished = {p.name: json.loads(p.read_text()) for p in shards.glob("shard-*.json")}
    assert sorted(finished) == ["shard-00000.json", "shard-00001.json", "shard-00003.json"]

    done = subprocess.run(featurize_command(raw, features, loopback_cluster.gcs), env=loopback_cluster.env(),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + loopback_cluster.logs()
    manifest = json.loads((features / "manifest.json").read_text())
    for report in manifest["shards"]:
        name = f"shard-{report['shard']:05d}.json"
        assert (name in finished) == (report["shard"] != 2)
        if name in finished:  # kept, not redone
            assert manifest["run"]["tasks"]["featurize"][report["shard"]]["pid"] == finished[name]["task"]["pid"]
    assert outputs(features) == reference_outputs(raw, tmp_path / "reference")


def test_two_nodes_share_the_tasks_and_write_the_one_process_bytes(loopback_cluster, tmp_path):
    raw = write_dataset(tmp_path / "raw")
    loopback_cluster.start_head("--num-cpus", "1", "--memory", str(2**31))
    loopback_cluster.add_node("--num-cpus", "1", "--memory", str(2**31))
    loopback_cluster.wait_for_nodes(2)

    features = tmp_path / "features"
    done = subprocess.run(featurize_command(raw, features, loopback_cluster.gcs), env=loopback_cluster.env(),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + loopback_cluster.logs()
    run = json.loads((features / "manifest.json").read_text())["run"]
    assert run["nodes"] == 2, run
    assert outputs(features) == reference_outputs(raw, tmp_path / "reference")
