"""featurize on Ray (trainer/data/featurize_ray.py): the same bytes as the in-process run, a
killed worker retried with nothing missing or doubled, an interrupted run resumed without
redoing finished buckets, another config refused, and a task's failure named by its input.

One embedded Ray for the module (featurize reuses a running Ray and leaves it running)."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.config import RunConfig
from trainer.data.featurize import (build_feature_spec, featurize, featurize_events, prepare_output)
from trainer.data.tasks import plan_units
from trainer.training.faults import ENV as FAULTS
from umask.contract import EventReader, open_dataset, read_apps, read_locations
from umask.errors import UserError
from umask.spec import WEEK_SECONDS, WINDOW_ORIGIN, file_sha256

START = WINDOW_ORIGIN + 2900 * WEEK_SECONDS
pytestmark = pytest.mark.slow  # one Ray start (10-50 s with the machine busy) and new workers for the faults


@pytest.fixture(scope="module")
def ray_cluster():
    from trainer.training.launch import start_embedded_ray, stop_embedded_ray

    start_embedded_ray(2)
    try:
        yield
    finally:
        stop_embedded_ray()


def write_dataset(root: Path, users: int = 60, events: int = 4000, seed: int = 0) -> Path:
    """Two events files in row groups of 500 rows, apps.parquet, and locations without region_id."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**62, users)
    (root / "events").mkdir(parents=True)
    for part in range(2):
        n = events // 2
        table = pa.table({
            "user_id": ids[rng.integers(0, users, n)], "ts": START + rng.integers(0, 2 * WEEK_SECONDS, n),
            "app_id": rng.integers(0, 40, n), "loc_id": pa.array(rng.integers(0, 30, n), mask=rng.random(n) < 0.1),
            "traffic_bytes": rng.integers(0, 10_000, n)})
        pq.write_table(table, root / "events" / f"part-{part}.parquet", row_group_size=500)
    pq.write_table(pa.table({"app_id": np.arange(30, dtype=np.int64), "category_id": np.arange(30, dtype=np.int32) % 4}),
                   root / "apps.parquet")
    pq.write_table(pa.table({"loc_id": np.arange(30, dtype=np.int64), "lat": rng.uniform(-60, 60, 30),
                             "lon": rng.uniform(-180, 180, 30)}), root / "locations.parquet")
    return root


def config(source: Path, features: Path, **data) -> RunConfig:
    settings = dict(source=str(source), features=str(features), slots=24, num_categories=4, num_regions=3,
                    num_shards=4, row_group_size=64, read_task_rows=1200, task_retries=2)
    settings.update(data)
    cfg = RunConfig()
    for key, value in settings.items():
        setattr(cfg.data, key, value)
    return cfg


def outputs(features: Path) -> dict[str, str]:
    """sha256 of every example file and spec file, by path under features."""
    files = sorted(features.glob("split=*/shard=*/*.parquet")) + sorted((features / "spec").iterdir())
    return {str(p.relative_to(features)): file_sha256(p) for p in files}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ray-featurize") / "raw")


@pytest.fixture(scope="module")
def in_process(dataset, tmp_path_factory) -> dict[str, str]:
    """The reference: both phases in this process, over the contract reader's batches."""
    cfg = config(dataset, tmp_path_factory.mktemp("reference") / "features")
    ds = open_dataset(dataset)
    spec, maps = build_feature_spec(read_apps(ds, 4), read_locations(ds), cfg.data)
    prepare_output(Path(cfg.data.features))
    featurize_events(EventReader(ds, "strict").batches(), spec, maps, cfg.data, cfg.data.features)
    return outputs(Path(cfg.data.features))


def check_manifest(features: Path, shards: int) -> dict:
    """Every shard once, and every file the manifest lists present with its rows and sha256."""
    manifest = json.loads((features / "manifest.json").read_text())
    assert [r["shard"] for r in manifest["shards"]] == list(range(shards))
    listed = {}
    for report in manifest["shards"]:
        for path, facts in report["files"].items():
            assert path not in listed
            listed[path] = facts
            assert file_sha256(features / path) == facts["sha256"]
            assert pq.read_metadata(features / path).num_rows == facts["rows"]
    assert sorted(listed) == sorted(str(p.relative_to(features)) for p in features.glob("split=*/shard=*/*"))
    assert not (features / "_staging").exists()
    return manifest


def test_ray_tasks_write_the_bytes_of_the_in_process_run(ray_cluster, dataset, in_process, tmp_path):
    assert len(plan_units(open_dataset(dataset).event_files, 1200)) == 4  # 2000-row files cut in two
    cfg = config(dataset, tmp_path / "features")
    manifest = featurize(cfg)
    assert outputs(tmp_path / "features") == in_process
    manifest = check_manifest(tmp_path / "features", 4)
    assert manifest["events"]["read"] == 4000
    assert manifest["quarantine"]["rows_read"] == 4000 and manifest["quarantine"]["files"] == 2
    run = manifest["run"]
    assert len(run["tasks"]["read"]) == 4 and len(run["tasks"]["featurize"]) == 4
    assert all(t["peak_rss_mb"] > 0 for phase in run["tasks"].values() for t in phase)
    assert run["driver_peak_rss_mb"] > 0


def test_a_killed_worker_is_retried_and_nothing_is_missing_or_doubled(ray_cluster, dataset, in_process,
                                                                       tmp_path, monkeypatch):
    monkeypatch.setenv(FAULTS, "kill@bucket:2")  # the worker of bucket 2 dies after its first file
    features = tmp_path / "features"
    featurize(config(dataset, features))
    check_manifest(features, 4)
    assert outputs(features) == in_process


def test_an_interrupted_run_resumes_without_redoing_finished_buckets(ray_cluster, dataset, in_process,
                                                                     tmp_path, monkeypatch):
    features = tmp_path / "features"
    # bucket 3 is the last of four on two CPUs: it starts when two buckets have finished
    monkeypatch.setenv(FAULTS, "kill@bucket:3")
    with pytest.raises(UserError, match=r"featurize failed featurizing bucket 3 .*task_retries"):
        featurize(config(dataset, features, task_retries=0))
    monkeypatch.delenv(FAULTS)
    staging = features / "_staging"
    finished = {p.name: p.read_text() for p in (staging / "shards").iterdir()}
    assert len(list((staging / "units").iterdir())) == 4 and "shard-00003.json" not in finished
    assert len(finished) >= 2
    # phase 1 wrote one run (a data file and its index) per read task, not a file per bucket
    assert sorted(p.name for p in (staging / "runs").iterdir()) == [
        f"unit-{u:06d}-0000.{kind}" for u in range(4) for kind in ("arrow", "index")]

    with pytest.raises(UserError, match="unfinished featurize run of other inputs or data.* settings"):
        featurize(config(dataset, features, num_shards=5))

    manifest = featurize(config(dataset, features))
    assert outputs(features) == in_process
    check_manifest(features, 4)
    for report in manifest["shards"]:  # the buckets finished before kept their first run's task
        name = f"shard-{report['shard']:05d}.json"
        if name in finished:
            assert manifest["run"]["tasks"]["featurize"][report["shard"]]["pid"] == json.loads(finished[name])["task"]["pid"]


def test_a_bad_row_is_named_with_its_file_and_row(ray_cluster, dataset, tmp_path):
    bad = tmp_path / "bad"
    (bad / "events").mkdir(parents=True)
    table = pq.read_table(dataset / "events" / "part-1.parquet")
    user = table.column("user_id").to_numpy().copy()
    user[1234] = -7
    pq.write_table(table.set_column(0, "user_id", pa.array(user)), bad / "events" / "part-1.parquet",
                   row_group_size=500)
    with pytest.raises(UserError, match=r"part-1.parquet row groups 2-3: .*part-1.parquet: row 1234, "
                                        r"column 'user_id': negative user_id"):
        featurize(config(bad, tmp_path / "features", invalid_rows="strict"))
    # quarantined by the read task of its share, into a file of that share's own
    manifest = featurize(config(bad, tmp_path / "quarantined", invalid_rows="quarantine"))
    [path] = manifest["quarantine"]["quarantine_files"]
    assert Path(path).name == "events__part-1.rg00002-00004.parquet"
    assert pq.read_table(path).column("row").to_pylist() == [1234]
    assert manifest["events"]["read"] == 1999 and manifest["quarantine"]["rows_quarantined"] == 1


def test_locations_in_ranges_on_ray_give_the_same_bytes(ray_cluster, dataset, in_process, tmp_path):
    """read_task_rows=10: every row group of events its own read task, and the 30 places in
    three ranges, each sorted and joined by its own task (trainer/data/locations_join.py)."""
    features = tmp_path / "features"
    manifest = featurize(config(dataset, features, read_task_rows=10))
    assert outputs(features) == in_process
    run = manifest["run"]
    assert run["location_ranges"] == 3 and len(run["tasks"]["join"]) == 3 and len(run["tasks"]["read"]) == 8


def test_a_bad_side_table_on_ray_is_named_with_its_file_and_row(ray_cluster, dataset, tmp_path):
    """The locations passes run beside phase 1, in a thread of the driver: their error still
    reaches the user as the one line naming the file and both rows."""
    bad = tmp_path / "bad"
    (bad / "events").mkdir(parents=True)
    for part in dataset.joinpath("events").iterdir():
        (bad / "events" / part.name).write_bytes(part.read_bytes())
    (bad / "apps.parquet").write_bytes((dataset / "apps.parquet").read_bytes())
    locations = pq.read_table(dataset / "locations.parquet")
    ids = locations.column("loc_id").to_numpy().copy()
    ids[17] = ids[4]
    pq.write_table(locations.set_column(0, "loc_id", pa.array(ids)), bad / "locations.parquet")
    with pytest.raises(UserError, match=rf"locations.parquet: row 17, column 'loc_id': duplicate loc_id {ids[4]} "
                                        r"\(also at row 4\)"):
        featurize(config(bad, tmp_path / "features"))
