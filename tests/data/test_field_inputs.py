"""Inputs that real pipelines write, each with its neighbours: INT96 timestamps, ts in the wrong
unit or at placeholder dates, Spark output directories as tables, empty null-typed files,
app-only telemetry. Each ends in the right examples or quarantine rows, never silently wrong."""
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.config import load_config
from umask.contract import EventReader, open_dataset, read_apps, read_locations, read_profiles
from trainer.data.featurize import featurize
from trainer.data.loader import read_spec
from trainer.data.schema import EXAMPLES
from umask.errors import UserError

UTC = dt.timezone.utc
MONDAY = dt.datetime(2026, 11, 2, tzinfo=UTC)
MONDAY_S = int(MONDAY.timestamp())
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def featurize_dataset(source: Path, out: Path, *overrides: str) -> dict:
    cfg = load_config([str(CONFIGS / "tiny.yaml")], [f"data.source={source}", f"data.features={out}",
                                                       "data.num_shards=2", "data.featurize_workers=1",
                                                       *overrides])
    return featurize(cfg)


def examples_of(features: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p, schema=EXAMPLES)
                            for p in sorted(features.glob("split=*/shard=*/*.parquet")))


def quarantined(features: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((features / "quarantine").glob("*")))


def plain_events(users, ts, **extra) -> pa.Table:
    n = len(users)
    columns = {"user_id": pa.array(users, pa.int64()), "ts": ts,
               "app_id": pa.array(np.arange(n) % 7 + 1, pa.int64()),
               "loc_id": pa.array(np.arange(n) % 5 + 1, pa.int64())}
    columns.update(extra)
    return pa.table(columns)


# --- INT96 --------------------------------------------------------------------------------

SENTINELS = [dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), dt.datetime(1000, 1, 1, tzinfo=UTC),
             dt.datetime(1677, 9, 21, tzinfo=UTC), dt.datetime(2262, 4, 12, tzinfo=UTC),
             dt.datetime(1970, 1, 1, tzinfo=UTC), dt.datetime(1900, 1, 1, tzinfo=UTC),
             # 584.9 years (2^64 ns) after 2026: read as nanoseconds it would wrap into 2026
             dt.datetime(2611, 6, 1, tzinfo=UTC)]
VALID_EDGES = [dt.datetime(2000, 1, 1, tzinfo=UTC), dt.datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)]


def test_int96_reads_any_date_and_sentinels_are_quarantined(tmp_path):
    """Spark/Hive INT96: valid times read exactly (to the floored second); dates nanoseconds
    cannot hold (and other implausible ones) are quarantined with a ts reason."""
    week = [MONDAY + dt.timedelta(seconds=int(s)) for s in np.random.default_rng(1).integers(0, 7 * 86400, 40)]
    times = week + VALID_EDGES + SENTINELS
    table = plain_events(list(range(1, len(times) + 1)), pa.array(times, pa.timestamp("us", "UTC")))
    (tmp_path / "ds" / "events").mkdir(parents=True)
    pq.write_table(table, tmp_path / "ds" / "events" / "part-0.parquet", use_deprecated_int96_timestamps=True)
    assert pq.ParquetFile(tmp_path / "ds/events/part-0.parquet").metadata.schema.column(1).physical_type == "INT96"

    reader = EventReader(open_dataset(tmp_path / "ds"), "quarantine", tmp_path / "q")
    valid = pa.Table.from_batches(list(reader.batches()))
    assert valid.column("ts").to_pylist() == [int(np.floor(t.timestamp())) for t in week + VALID_EDGES]
    assert reader.report.rows_quarantined == len(SENTINELS)
    assert list(reader.report.by_reason) == [next(iter(reader.report.by_reason))]
    assert next(iter(reader.report.by_reason)).startswith("ts outside the plausible range")

    manifest = featurize_dataset(tmp_path / "ds", tmp_path / "features")
    starts = examples_of(tmp_path / "features").column("window_start").to_pylist()
    years = {dt.datetime.fromtimestamp(s, UTC).year for s in starts}
    assert years <= {1999, 2000, 2026, 2099}  # week-aligned windows can start the day before 2000
    assert manifest["quarantine"]["rows_quarantined"] == len(SENTINELS)


# --- integer ts in the wrong unit, placeholders ------------------------------------------

@pytest.mark.parametrize("unit, factor", [("ms", 10**3), ("us", 10**6), ("ns", 10**9)])
def test_integer_ts_in_a_finer_unit_is_quarantined_and_seconds_are_kept(tmp_path, unit, factor):
    rng = np.random.default_rng(2)
    events = tmp_path / "ds" / "events"
    events.mkdir(parents=True)
    seconds = MONDAY_S + rng.integers(0, 14 * 86400, 400)
    pq.write_table(plain_events(np.repeat(np.arange(1, 21), 20), pa.array(seconds, pa.int64())),
                   events / "part-seconds.parquet")
    wrong = MONDAY_S + rng.integers(0, 14 * 86400, 60)
    pq.write_table(plain_events(np.repeat(np.arange(41, 44), 20), pa.array(wrong * factor, pa.int64())),
                   events / f"part-{unit}.parquet")
    placeholders = plain_events([50, 51], pa.array([0, -1], pa.int64()))  # devices with unset clocks
    pq.write_table(placeholders, events / "part-epoch0.parquet")

    manifest = featurize_dataset(tmp_path / "ds", tmp_path / "features")
    assert manifest["quarantine"]["rows_read"] == 462
    assert manifest["quarantine"]["rows_valid"] == 400
    assert manifest["quarantine"]["rows_quarantined"] == 62
    users = set(examples_of(tmp_path / "features").column("user_id").to_pylist())
    assert users == set(range(1, 21))
    rows = quarantined(tmp_path / "features")
    assert set(rows.column("user_id").to_pylist()) == {"41", "42", "43", "50", "51"}
    assert all(r.startswith("ts outside the plausible range") for r in rows.column("reason").to_pylist())


def test_the_plausible_range_is_configurable_and_checked(tmp_path):
    with pytest.raises(UserError, match=r"data\.plausible_start: must be before plausible_end"):
        load_config([], ["data.plausible_start=2030-01-01", "data.plausible_end=2020-01-01"])
    with pytest.raises(UserError, match=r"data\.plausible_start: plausible_start/end must be ISO dates"):
        load_config([], ["data.plausible_end=soon"])
    cfg = load_config([], ["data.plausible_start=1970-01-01T00:00:00+00:00"])
    assert cfg.data.plausible_range() == (0, 4_102_444_800)


# --- Spark output directories as tables --------------------------------------------------

def spark_dir(path: Path, table: pa.Table, parts: int = 2) -> None:
    """What Spark leaves for df.write.parquet(path): part files, _SUCCESS, hidden .crc files,
    and here also an empty null-typed part (an empty partition written from pandas)."""
    path.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(table.num_rows), parts)):
        name = f"part-{i:05d}-0f0f-c000.snappy.parquet"
        pq.write_table(table.take(part), path / name, compression="snappy")
        (path / f".{name}.crc").write_bytes(b"crc\x00")
    pq.write_table(pa.table({name: pa.array([], pa.null()) for name in table.column_names}),
                   path / f"part-{parts:05d}-0f0f-c000.snappy.parquet")
    (path / "_SUCCESS").write_bytes(b"")


@pytest.mark.parametrize("events_as", ["events/", "events.parquet/"])
def test_spark_directories_are_tables(tmp_path, events_as):
    rng = np.random.default_rng(3)
    n = 3000
    events = plain_events(rng.integers(1, 41, n), pa.array(MONDAY_S + rng.integers(0, 14 * 86400, n), pa.int64()),
                          app_id=pa.array(rng.integers(100, 140, n), pa.int64()),
                          loc_id=pa.array(rng.integers(500, 520, n), pa.int64()))
    ds = tmp_path / "ds"
    spark_dir(ds / "apps.parquet", pa.table({"app_id": pa.array(range(100, 140), pa.int64()),
                                              "category_id": pa.array([3] * 40, pa.int32())}))
    spark_dir(ds / "locations.parquet", pa.table({
        "loc_id": pa.array(range(500, 520), pa.int64()), "lat": np.linspace(39.9, 40.0, 20),
        "lon": np.linspace(116.3, 116.4, 20), "region_id": pa.array([5] * 20, pa.int32())}))
    spark_dir(ds / "profiles.parquet", pa.table({"user_id": pa.array([1, 2], pa.int64()),
                                                  "profile_vec": pa.array([[0.5], [1.5]], pa.list_(pa.float32(), 1))}))
    if events_as == "events/":
        (ds / "events").mkdir()
        pq.write_table(events, ds / "events" / "part-0.parquet")
    else:
        spark_dir(ds / "events.parquet", events)

    dataset = open_dataset(ds)
    assert read_apps(dataset, 20).num_rows == 40
    assert read_locations(dataset).column("region_id").to_pylist() == [5] * 20
    assert read_profiles(dataset).num_rows == 2
    manifest = featurize_dataset(ds, tmp_path / "features")
    assert manifest["events"]["read"] == n
    spec = read_spec(tmp_path / "features")
    assert spec.region_source == "region_id"
    dense = np.concatenate([np.asarray(d, np.float32).reshape(-1, spec.layout.num_channels)
                            for d in examples_of(tmp_path / "features").column("dense").to_pylist()])
    used = dense[:, spec.layout.activity] > 0
    assert (dense[used, 3] > 0).all() and not dense[used, spec.num_categories].any()  # category 3, never unknown
    assert np.allclose(dense[used, spec.layout.region.start + 5], 1.0)  # every record in region 5


def test_part_files_of_one_side_table_must_agree_on_columns(tmp_path):
    ds = tmp_path / "ds"
    (ds / "events").mkdir(parents=True)
    pq.write_table(plain_events([1], pa.array([MONDAY_S], pa.int64())), ds / "events" / "e.parquet")
    (ds / "locations.parquet").mkdir()
    pq.write_table(pa.table({"loc_id": [1], "lat": [1.0], "lon": [2.0]}), ds / "locations.parquet" / "part-0.parquet")
    pq.write_table(pa.table({"loc_id": [2], "lat": [1.0], "lon": [2.0], "region_id": pa.array([1], pa.int32())}),
                   ds / "locations.parquet" / "part-1.parquet")
    with pytest.raises(UserError, match=r"part-1\.parquet: has columns .* but .*part-0\.parquet has"):
        read_locations(open_dataset(ds))
    (ds / "locations.parquet" / "part-1.parquet").unlink()
    pq.write_table(pa.table({"loc_id": [1], "lat": [3.0], "lon": [4.0]}), ds / "locations.parquet" / "part-1.parquet")
    with pytest.raises(UserError, match=r"part-1\.parquet: row 0, column 'loc_id': duplicate loc_id 1 "
                                        r"\(also at .*part-0\.parquet, row 0\)"):
        read_locations(open_dataset(ds))


# --- empty files whatever their types, null-typed columns --------------------------------

@pytest.mark.parametrize("policy", ["strict", "quarantine"])
def test_empty_null_typed_partition_is_skipped(tmp_path, policy):
    events = tmp_path / "ds" / "events"
    typed = plain_events([1 + i % 3 for i in range(12)],
                         pa.array([(MONDAY_S + i * 3600) * 1000 for i in range(12)], pa.timestamp("ms", "UTC")),
                         traffic_bytes=pa.array([1000 * i for i in range(12)], pa.int64()),
                         event=pa.array(["use"] * 12))
    empty_null = pa.table({name: pa.array([], pa.null()) for name in typed.column_names})
    for day, table in (("2026-11-02", typed), ("2026-11-03", empty_null), ("2026-11-04", typed.slice(0, 0)),
                       ("2026-11-05", pa.table({"anything": pa.array([], pa.string())}))):
        (events / f"dt={day}").mkdir(parents=True)
        pq.write_table(table, events / f"dt={day}" / "part-0.parquet")
    (events / "_SUCCESS").write_bytes(b"")
    manifest = featurize_dataset(tmp_path / "ds", tmp_path / "features", f"data.invalid_rows={policy}")
    assert manifest["events"]["featurized"] == 12
    assert manifest["quarantine"]["empty_files_skipped"] == 3


def test_rows_of_a_null_typed_key_column_are_quarantined_not_fatal(tmp_path):
    events = tmp_path / "ds" / "events"
    events.mkdir(parents=True)
    pq.write_table(plain_events([1, 2], pa.array([MONDAY_S, MONDAY_S + 60], pa.int64())), events / "a.parquet")
    pq.write_table(pa.table({"user_id": pa.nulls(3), "ts": pa.array([MONDAY_S] * 3, pa.int64()),
                             "app_id": pa.array([1, 2, 3], pa.int64())}), events / "b.parquet")
    manifest = featurize_dataset(tmp_path / "ds", tmp_path / "features")
    assert manifest["quarantine"]["rows_valid"] == 2
    assert manifest["quarantine"]["by_reason"] == {"null user_id": 3}


# --- app-only telemetry ------------------------------------------------------------------

def test_app_only_telemetry_without_loc_id(tmp_path):
    events = tmp_path / "ds" / "events"
    events.mkdir(parents=True)
    table = plain_events([1, 1, 2], pa.array([MONDAY_S, MONDAY_S + 10, MONDAY_S + 4000], pa.int64()))
    pq.write_table(table.drop(["loc_id"]), events / "a.parquet")
    manifest = featurize_dataset(tmp_path / "ds", tmp_path / "features")
    assert manifest["events"]["featurized"] == 3
    rows = examples_of(tmp_path / "features").to_pylist()
    spec = read_spec(tmp_path / "features")
    assert all(r["loc_ids"] == [] and sum(r["app_lengths"]) > 0 for r in rows)
    for r in rows:
        dense = np.asarray(r["dense"]).reshape(-1, spec.layout.num_channels)
        assert not dense[:, spec.layout.region].any()


# --- key=value and YAML scalars keep their text ------------------------------------------

@pytest.mark.parametrize("override, key, value", [
    ("ray.name=010", "name", "010"), ("ray.name=no", "name", "no"), ("ray.name=2026-11-01", "name", "2026-11-01"),
    ("ray.name=null", "name", "null"), ("ray.name=1e3", "name", "1e3"), ("ray.name=0x1F", "name", "0x1F")])
def test_string_keys_keep_the_literal_text(override, key, value):
    assert getattr(load_config([], [override]).ray, key) == value


def test_overrides_and_yaml_layers_type_scalars_by_the_key(tmp_path):
    cfg = load_config([], ["data.source=0755", "train.steps=010", "train.resume=no",
                           "model.mask.task_weights=[1,1,0]", "ray.address=null",
                           "ray.resources_per_worker={accel: 1}"])
    assert (cfg.data.source, cfg.train.steps, cfg.train.resume) == ("0755", 10, False)
    assert cfg.model.mask.task_weights == [1.0, 1.0, 0.0] and cfg.ray.address is None
    assert cfg.ray.resources_per_worker == {"accel": 1.0}
    layer = tmp_path / "run.yaml"
    layer.write_text("ray:\n  name: 010\n  address: ~\ndata:\n  source: 2026-11-01\n  split_salt: 007\n")
    cfg = load_config([str(layer)])
    assert (cfg.ray.name, cfg.ray.address, cfg.data.source, cfg.data.split_salt) == ("010", None, "2026-11-01", 7)
    assert load_config([], ["ray.name=8"]).ray.name != load_config([], ["ray.name=010"]).ray.name


@pytest.mark.parametrize("where", ["command line", "yaml"])
@pytest.mark.parametrize("value, message", [
    ("${oc.env:UMASK_TEST_SURELY_UNSET}", "Environment variable 'UMASK_TEST_SURELY_UNSET' not found"),
    ("${data.nope}", "Interpolation key 'data.nope' not found")])
def test_unresolvable_interpolations_name_the_key(tmp_path, monkeypatch, where, value, message):
    monkeypatch.delenv("UMASK_TEST_SURELY_UNSET", raising=False)
    if where == "yaml":
        layer = tmp_path / "i.yaml"
        layer.write_text(f"data:\n  source: '{value}'\n")
        args = ([str(layer)], [])
    else:
        args = ([], [f"data.source={value}"])
    with pytest.raises(UserError) as caught:
        load_config(*args)
    text = str(caught.value)
    assert text.startswith("data.source: ") and message in text and "\n" not in text
    assert (str(layer) if where == "yaml" else "the command line") in text


def test_saved_config_reads_back_unchanged(tmp_path):
    from trainer.config import save_config
    cfg = load_config([], ["ray.name=010", "ray.address=null", "data.source=null"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config([str(tmp_path / "c.yaml")]) == cfg
    assert json.dumps(cfg.ray.name) == '"010"'
