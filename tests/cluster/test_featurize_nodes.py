"""`u-mask data featurize` on a two-node Ray cluster on loopback (`ray start --head` plus a
second `ray start`, each with one CPU): its tasks run on both nodes, and it writes the bytes of
the in-process run (trainer/data/featurize.py)."""
import json
import subprocess
import sys
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


def test_two_nodes_share_the_tasks_and_write_the_one_process_bytes(loopback_cluster, tmp_path):
    raw = write_dataset(tmp_path / "raw")
    loopback_cluster.start_head("--num-cpus", "1", "--memory", str(2**31))
    loopback_cluster.add_node("--num-cpus", "1", "--memory", str(2**31))
    loopback_cluster.wait_for_nodes(2)

    features = tmp_path / "features"
    args = [f"data.{k}={v}" for k, v in SETTINGS.items()]
    done = subprocess.run([str(Path(sys.executable).parent / "u-mask"), "data", "featurize", "--config", "configs/tiny.yaml",
                           f"data.source={raw}", f"data.features={features}", f"ray.address={loopback_cluster.gcs}",
                           *args],
                          env=loopback_cluster.env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + loopback_cluster.logs()
    run = json.loads((features / "manifest.json").read_text())["run"]
    assert run["nodes"] == 2, run

    cfg = RunConfig()
    for key, value in SETTINGS.items():
        setattr(cfg.data, key, value)
    reference = tmp_path / "reference"
    ds = open_dataset(raw)
    prepare_output(reference)
    featurize_events(EventReader(ds, "strict").batches(), *build_feature_spec(read_apps(ds, 4), read_locations(ds), cfg.data),
                     cfg.data, reference)
    assert outputs(features) == outputs(reference)
