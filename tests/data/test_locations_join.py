"""The locations side table in ranges (trainer/data/locations_join.py): a table cut into several
shares and ranges gives the spec, regions and examples of the whole-table path
(build_feature_spec over read_locations), and a bad row is named with its file and row.

These run featurize's tasks in this process (events that fit one read task, no Ray up), which
are the same functions Ray runs; tests/data/test_featurize_ray.py runs them on Ray."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.config import RunConfig
from trainer.data.featurize import build_feature_spec, featurize, featurize_events, prepare_output
from trainer.data.regions import bottom_k, sample_keys
from trainer.data.tasks import plan_units
from umask.contract import EventReader, open_dataset, read_apps, read_locations, table_files
from umask.errors import UserError
from umask.spec import WEEK_SECONDS, WINDOW_ORIGIN, file_sha256, load_maps, load_spec, write_maps

START = WINDOW_ORIGIN + 2900 * WEEK_SECONDS


def write_dataset(root: Path, locations: int = 2400, region_ids: bool = False, seed: int = 1) -> Path:
    """600 events over 900 of the places; locations in three part files of row groups of 200,
    some unlocated, ids spread over the int64 range."""
    rng = np.random.default_rng(seed)
    loc_ids = rng.choice(2**62, locations, replace=False).astype(np.int64)
    (root / "events").mkdir(parents=True)
    users = rng.integers(0, 2**62, 40)
    n = 600
    pq.write_table(pa.table({
        "user_id": users[rng.integers(0, 40, n)], "ts": START + rng.integers(0, 2 * WEEK_SECONDS, n),
        "app_id": rng.integers(0, 40, n),
        # a tenth of the events at places the table does not list: the spec's hash rule places them
        "loc_id": np.where(rng.random(n) < 0.1, rng.integers(0, 2**62, n), loc_ids[rng.integers(0, 900, n)])}),
        root / "events" / "part-0.parquet")
    pq.write_table(pa.table({"app_id": np.arange(30), "category_id": np.arange(30, dtype=np.int32) % 4}),
                   root / "apps.parquet")
    lat, lon = rng.uniform(-60, 60, locations), rng.uniform(-180, 180, locations)
    unlocated = rng.random(locations) < 0.05
    columns = {"loc_id": loc_ids, "lat": pa.array(lat, mask=unlocated), "lon": pa.array(lon, mask=unlocated)}
    if region_ids:
        columns["region_id"] = rng.integers(0, 3, locations).astype(np.int32)
    table = pa.table(columns)
    (root / "locations.parquet").mkdir()
    for part, start in enumerate(range(0, locations, locations // 3)):
        pq.write_table(table.slice(start, locations // 3), root / "locations.parquet" / f"part-{part}.parquet",
                       row_group_size=200)
    return root


def config(source: Path, features: Path, **data) -> RunConfig:
    cfg = RunConfig()
    settings = dict(source=str(source), features=str(features), slots=24, num_categories=4, num_regions=3,
                    num_shards=4, row_group_size=64, read_task_rows=700)
    for key, value in {**settings, **data}.items():
        setattr(cfg.data, key, value)
    return cfg


def outputs(features: Path) -> dict[str, str]:
    files = sorted(features.glob("split=*/shard=*/*.parquet")) + sorted((features / "spec").iterdir())
    return {str(p.relative_to(features)): file_sha256(p) for p in files}


def whole_table_run(source: Path, features: Path) -> dict[str, str]:
    """The reference: the spec from the whole tables in hand, both phases in this process."""
    cfg = config(source, features)
    ds = open_dataset(source)
    spec, maps = build_feature_spec(read_apps(ds, 4), read_locations(ds), cfg.data)
    prepare_output(features)
    featurize_events(EventReader(ds, "strict").batches(), spec, maps, cfg.data, features)
    return outputs(features)


@pytest.mark.parametrize("region_ids", [False, True], ids=["kmeans", "region_id"])
def test_ranges_give_the_bytes_of_the_whole_table(tmp_path, region_ids):
    source = write_dataset(tmp_path / "raw", region_ids=region_ids)
    shares = plan_units(table_files(open_dataset(source).locations), 700)
    assert len(shares) == 6  # three 800-row files, each cut between its row groups
    manifest = featurize(config(source, tmp_path / "ranged"))
    run = manifest["run"]
    assert not run["on_ray"] and run["location_ranges"] == 4  # 2400 rows in ranges of about 700
    assert len(run["tasks"]["locations_sort"]) == 4 and len(run["tasks"]["locations_sample"]) == 6
    assert outputs(tmp_path / "ranged") == whole_table_run(source, tmp_path / "whole")
    spec = load_spec(tmp_path / "ranged" / "spec")
    assert spec.region_source == ("region_id" if region_ids else "kmeans")
    maps = load_maps(tmp_path / "ranged" / "spec", spec)
    assert len(maps.loc_ids) == 2400 and np.all(np.diff(maps.loc_ids) > 0)


def test_each_bucket_joins_only_its_own_places(tmp_path, monkeypatch):
    """A bucket's segments of the join's runs hold exactly the listed loc_ids its events name."""
    from trainer.data import locations_join, shuffle
    from umask.slots import bucket_of

    source = write_dataset(tmp_path / "raw")
    seen = {}
    original = shuffle.read_bucket

    def spy(runs, bucket, schema):
        table = original(runs, bucket, schema)
        if schema == locations_join.REGION_MAP:
            seen[bucket] = (table.column("loc_id").to_numpy(), None)
        return table

    monkeypatch.setattr(shuffle, "read_bucket", spy)
    featurize(config(source, tmp_path / "features"))
    assert sorted(seen) == [0, 1, 2, 3]
    events = pq.read_table(source / "events" / "part-0.parquet")
    listed = set(read_locations(open_dataset(source)).column("loc_id").to_pylist())
    buckets = bucket_of(events.column("user_id").to_numpy(), 4)
    for bucket, (loc_ids, _) in seen.items():
        expected = set(events.column("loc_id").to_numpy()[buckets == bucket].tolist()) & listed
        assert set(loc_ids.tolist()) == expected


def test_a_repeated_loc_id_across_files_is_named_with_both_rows(tmp_path):
    source = write_dataset(tmp_path / "raw")
    second = pq.read_table(source / "locations.parquet" / "part-2.parquet")
    first_id = pq.read_table(source / "locations.parquet" / "part-0.parquet").column("loc_id")[5].as_py()
    ids = second.column("loc_id").to_numpy().copy()
    ids[321] = first_id
    pq.write_table(second.set_column(0, "loc_id", pa.array(ids)), source / "locations.parquet" / "part-2.parquet",
                   row_group_size=200)
    with pytest.raises(UserError, match=rf"part-2.parquet: row 321, column 'loc_id': duplicate loc_id {first_id} "
                                        r"\(also at .*part-0.parquet, row 5\)"):
        featurize(config(source, tmp_path / "features"))


def test_a_region_id_beyond_num_regions_is_named_with_its_file_and_row(tmp_path):
    source = write_dataset(tmp_path / "raw", region_ids=True)
    path = source / "locations.parquet" / "part-1.parquet"
    table = pq.read_table(path)
    regions = table.column("region_id").to_numpy().copy()
    regions[640] = 3
    pq.write_table(table.set_column(3, "region_id", pa.array(regions)), path, row_group_size=200)
    with pytest.raises(UserError, match=r"part-1.parquet: row 640: region_id 3 is outside \[0, 3\); "
                                        r"set data.num_regions"):
        featurize(config(source, tmp_path / "features"))


def test_bottom_k_over_batches_is_the_bottom_k_of_the_whole():
    rng = np.random.default_rng(0)
    ids = rng.integers(-2**62, 2**62, 10_000)
    keys = sample_keys(ids)
    whole = ids[bottom_k(keys, ids, 500)]
    held = np.empty(0, np.int64)
    for part in np.array_split(np.arange(len(ids)), 7):
        merged = np.concatenate([held, ids[part]])
        held = merged[bottom_k(sample_keys(merged), merged, 500)]
    np.testing.assert_array_equal(held, whole)


def test_the_location_map_has_the_same_bytes_however_it_is_chunked(tmp_path):
    ids = np.arange(0, 7_500_000, 3, dtype=np.int64)  # 2.5 M rows: three row groups of MAP_ROW_GROUP
    regions = (ids % 5).astype(np.int32)
    whole = write_maps(tmp_path / "whole", ids[:3], regions[:3].copy(), [(ids, regions)])
    cuts = [0, 1, 1, 900_000, 1_048_577, 2_000_000, len(ids)]
    chunked = write_maps(tmp_path / "chunked", ids[:3], regions[:3].copy(),
                         [(ids[a:b], regions[a:b]) for a, b in zip(cuts, cuts[1:])])
    assert whole == chunked
