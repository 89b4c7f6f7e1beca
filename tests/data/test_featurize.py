"""featurize: hand-computed examples, duplicates, windows, unknown categories and regions,
bytes vs count, splits, shards and the `u-mask data featurize` / `summary` commands."""
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.cli import main as cli_main
from trainer.config import DataConfig, load_config
from trainer.data import featurize
from trainer.data.featurize import build_feature_spec, featurize_events, prepare_output
from trainer.data.regions import build_region_table, kmeans_regions
from trainer.data.loader import read_spec
from trainer.data.schema import EXAMPLES
from umask import slots as slots_module
from umask.contract import NORMALIZED_EVENTS
from umask.slots import bucket_of, split_of
from umask.spec import REGION_SALT, SHARD_SALT, SPLITS
from umask.spec import WEEK_SECONDS as WEEK
from umask.spec import WINDOW_ORIGIN as ORIGIN
from umask.errors import UserError

B = ORIGIN + 2800 * WEEK  # Monday 2023-09-04 00:00 UTC; with T=4 hourly slots windows are 4 h long
USE, INSTALL = 0, 1
# C=2 categories, K=2 regions: dense = [cat0, cat1, cat?, reg0, reg1, reg?, activity, volume]
CAT, REG, ACT, VOL = slice(0, 3), slice(3, 6), 6, 7

# (user_id, ts, app_id, loc_id, traffic_bytes, event)
EVENTS = [
    (1, B + 10, 10, 100, 100, USE),
    (1, B + 20, 10, 101, 50, USE),
    (1, B + 20, 10, 101, 50, USE),  # exact duplicate of the row above: dropped
    (1, B + 20, 11, 101, 50, USE),  # same user and second, other app: kept
    (1, B + 7205, 99, None, None, INSTALL),  # app missing from apps.parquet, no location
    (1, B + 7205, 99, None, 0, INSTALL),  # differs from the row above only by 0 vs null bytes
    (1, B + 7206, None, 103, 7, USE),  # location-only; loc 103 is not in locations.parquet
    (1, B + 14399, 11, None, 0, USE),  # last second of window 0
    (1, B + 14400, 11, 100, 1000, USE),  # first second of window 1
    (2, B + 6 * 86400 + 23 * 3600 + 1, 11, 102, 5, USE),  # Sunday 23:00:01, window 41, slot 3
    (2, B + WEEK + 60, 10, None, 3, USE),  # the next Monday 00:01
]
APPS = pa.table({"app_id": pa.array([10, 11], pa.int64()), "category_id": pa.array([0, 1], pa.int32())})
LOCATIONS = pa.table({"loc_id": pa.array([100, 101, 102], pa.int64()), "lat": [0.0, 0.0, 0.0],
                      "lon": [0.0, 0.0, 0.0], "region_id": pa.array([0, 1, 1], pa.int32())})


def splitmix64(value: int, salt: int) -> int:
    """Reference for featurize.stable_hash, in Python integers."""
    mask = (1 << 64) - 1
    z = (value + 0x9E3779B97F4A7C15 * (salt + 1)) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def expected_split(user_id: int, cfg: DataConfig) -> str:
    u = (splitmix64(user_id, cfg.split_salt) >> 11) / 2**53
    if u < cfg.val_fraction:
        return "val"
    if u < cfg.val_fraction + cfg.test_fraction:
        return "test"
    if u < cfg.val_fraction + cfg.test_fraction + cfg.cold_fraction:
        return "cold"
    return "train"


def batches_of(rows, size=4):
    columns = list(zip(*rows))
    table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, NORMALIZED_EVENTS)],
                                 schema=NORMALIZED_EVENTS)
    return table.to_batches(max_chunksize=size)


def featurize_tables(batches, apps, locations, cfg, out):
    """featurize_events with the spec that featurize builds from these side tables."""
    return featurize_events(batches, *build_feature_spec(apps, locations, cfg), cfg, out)


def small_config(**overrides) -> DataConfig:
    settings = dict(slots=4, slot_seconds=3600, num_categories=2, num_regions=2, num_shards=2,
                    row_group_size=512, featurize_workers=1)
    settings.update(overrides)
    return DataConfig(**settings)


def run(tmp_path, rows=EVENTS, apps=APPS, locations=LOCATIONS, **overrides):
    cfg = small_config(**overrides)
    out = tmp_path / "features"
    prepare_output(out)
    manifest = featurize_tables(batches_of(rows), apps, locations, cfg, out)
    return manifest, read_examples(out), cfg


def read_examples(out: Path) -> dict:
    tables = [pq.read_table(p, schema=EXAMPLES) for p in sorted(out.glob("split=*/shard=*/*.parquet"))]
    rows = pa.concat_tables(tables).to_pylist()
    return {(r["user_id"], r["window_start"]): r for r in rows}


def dense(example, F=8):
    return np.array(example["dense"], np.float64).reshape(-1, F)


def bag(example, key, slot):
    ids, lengths = example[key + "_ids"], example[key + "_lengths"]
    start = sum(lengths[:slot])
    return ids[start:start + lengths[slot]]


def test_hand_computed_example_user_1_window_0(tmp_path):
    _, examples, _ = run(tmp_path)
    ex = examples[(1, B)]
    x = dense(ex)
    hashed_103 = splitmix64(103, REGION_SALT) % 2
    assert ex["time_of_week"] == [0, 1, 2, 3]
    assert ex["observed"] == [True, False, True, True]
    # slot 0: apps 10, 10, 11 (the duplicate dropped); locs 100 (region 0), 101, 101 (region 1)
    np.testing.assert_allclose(x[0, CAT], [math.log1p(2), math.log1p(1), 0], rtol=1e-6)
    np.testing.assert_allclose(x[0, REG], [1 / 3, 2 / 3, 0], rtol=1e-6)
    np.testing.assert_allclose(x[0, [ACT, VOL]], [math.log1p(3), math.log1p(200)], rtol=1e-6)
    assert bag(ex, "app", 0) == [10, 11] and bag(ex, "loc", 0) == [100, 101]
    # slot 1: nothing
    assert not x[1].any() and bag(ex, "app", 1) == [] and bag(ex, "loc", 1) == []
    # slot 2: two installs of unknown app 99 (null vs 0 bytes: not duplicates) + loc-only 103
    np.testing.assert_allclose(x[2, CAT], [0, 0, math.log1p(2)], rtol=1e-6)
    regions = [0.0, 0.0, 0.0]
    regions[hashed_103] = 1.0  # loc 103 is unlisted: region by hash, not "unknown"
    np.testing.assert_allclose(x[2, REG], regions)
    np.testing.assert_allclose(x[2, [ACT, VOL]], [math.log1p(3), math.log1p(7)], rtol=1e-6)
    assert bag(ex, "app", 2) == [99] and bag(ex, "loc", 2) == [103]
    # slot 3: one app record, no location: region shares stay 0
    np.testing.assert_allclose(x[3], [0, math.log1p(1), 0, 0, 0, 0, math.log1p(1), 0], rtol=1e-6)
    assert ex["app_lengths"] == [2, 0, 1, 1] and ex["loc_lengths"] == [2, 0, 1, 0]
    assert ex["app_ids"] == [10, 11, 99, 11] and ex["loc_ids"] == [100, 101, 103]


def test_window_boundaries_and_time_of_week(tmp_path):
    _, examples, _ = run(tmp_path)
    assert sorted(examples) == [(1, B), (1, B + 14400), (2, B + 41 * 14400), (2, B + WEEK)]
    next_window = examples[(1, B + 14400)]
    assert next_window["observed"] == [True, False, False, False]
    assert next_window["time_of_week"] == [4, 5, 6, 7]
    sunday = examples[(2, B + 41 * 14400)]  # Sunday 20:00-24:00: the last 4 slots of the week
    assert sunday["time_of_week"] == [164, 165, 166, 167]
    assert sunday["observed"] == [False, False, False, True]
    assert examples[(2, B + WEEK)]["time_of_week"] == [0, 1, 2, 3]
    np.testing.assert_allclose(dense(sunday)[3, REG], [0, 1, 0])  # loc 102 has region_id 1


def test_bytes_instead_of_counts(tmp_path):
    _, examples, _ = run(tmp_path, category_value="bytes")
    x = dense(examples[(1, B)])
    np.testing.assert_allclose(x[0, CAT], [math.log1p(150), math.log1p(50), 0], rtol=1e-6)
    # null and zero bytes add nothing, but the slot is still observed and active
    np.testing.assert_allclose(x[2, CAT], [0, 0, 0])
    assert examples[(1, B)]["observed"][2] and x[2, ACT] == pytest.approx(math.log1p(3))


def test_duplicates_dropped_and_counted(tmp_path):
    manifest, examples, _ = run(tmp_path)
    assert manifest["events"] == {"read": 11, "duplicates_dropped": 1, "featurized": 10}
    assert sum(s["duplicates_dropped"] for s in manifest["shards"]) == 1
    assert sum(sum(math.expm1(v) for v in dense(e)[:, ACT]) for e in examples.values()) == \
        pytest.approx(10)


def test_splits_follow_the_reference_hash(tmp_path):
    manifest, examples, cfg = run(tmp_path)
    for (user, _), ex in examples.items():
        assert ex["split"] == expected_split(user, cfg)
    ids = np.arange(0, 2**62, 2**62 // 5000, dtype=np.int64)[:5000]
    got = [SPLITS[i] for i in split_of(ids, cfg.feature_spec())]
    assert got == [expected_split(int(i), cfg) for i in ids]
    counts = {s: got.count(s) / len(got) for s in SPLITS}
    assert counts["val"] == pytest.approx(0.05, abs=0.015) and counts["test"] == pytest.approx(0.1, abs=0.02)
    assert manifest["examples"] == {s: sum(e["split"] == s for e in examples.values()) for s in SPLITS}


def test_all_users_forced_into_one_split_lands_in_its_folder(tmp_path):
    manifest, examples, _ = run(tmp_path, val_fraction=0.0, test_fraction=0.0, cold_fraction=0.0)
    assert {e["split"] for e in examples.values()} == {"train"}
    assert [p.name for p in (tmp_path / "features").glob("split=*")] == ["split=train"]
    assert manifest["examples"] == {"train": 4, "val": 0, "test": 0, "cold": 0}
    assert manifest["users"]["train"] == 2


def test_no_side_tables_unknown_category_and_hashed_regions(tmp_path):
    _, examples, _ = run(tmp_path, apps=None, locations=None)
    x = dense(examples[(1, B)])
    np.testing.assert_allclose(x[0, CAT], [0, 0, math.log1p(3)], rtol=1e-6)
    expected = np.zeros(3)
    for loc in (100, 101, 101):
        expected[splitmix64(loc, REGION_SALT) % 2] += 1 / 3
    np.testing.assert_allclose(x[0, REG], expected, rtol=1e-6)


def test_listed_location_without_coordinates_is_unknown_region(tmp_path):
    locations = pa.table({"loc_id": pa.array([100, 101, 102], pa.int64()),
                          "lat": pa.array([39.9, None, -33.9]), "lon": pa.array([116.4, None, 151.2])})
    _, examples, _ = run(tmp_path, locations=locations)
    x = dense(examples[(1, B)])
    assert x[0, 5] == pytest.approx(2 / 3)  # loc 101 twice: listed, no coordinates
    assert x[0, 3] + x[0, 4] == pytest.approx(1 / 3)


def test_kmeans_regions_separate_far_places_and_join_across_the_antimeridian():
    lat = np.array([39.9, 39.95, 40.0, -33.9, -33.85, 10.0, 10.1])
    lon = np.array([116.4, 116.5, 116.3, 151.2, 151.25, 179.95, -179.95])
    regions, centroids = kmeans_regions(lat, lon, 3)
    assert len(set(regions[:3])) == 1 and len(set(regions[3:5])) == 1 and regions[5] == regions[6]
    assert len({regions[0], regions[3], regions[5]}) == 3
    np.testing.assert_array_equal(regions, kmeans_regions(lat, lon, 3)[0])
    assert centroids.shape == (3, 3)


def test_region_ids_out_of_range_name_the_row():
    locations = pa.table({"loc_id": pa.array([1, 2], pa.int64()), "lat": [0.0, 0.0], "lon": [0.0, 0.0],
                          "region_id": pa.array([0, 7], pa.int32())})
    with pytest.raises(UserError, match=r"row 1: region_id 7 is outside \[0, 4\)"):
        build_region_table(locations, 4)
    assert build_region_table(locations, 8).source == "region_id"


def test_category_out_of_range_names_the_row(tmp_path):
    apps = pa.table({"app_id": pa.array([10, 11], pa.int64()), "category_id": pa.array([0, 2], pa.int32())})
    with pytest.raises(UserError, match=r"apps.parquet: row 1: category_id 2 is outside \[0, 2\)"):
        run(tmp_path, apps=apps)


def random_events(n=3000, users=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**62, users)
    return list(zip(ids[rng.integers(0, users, n)].tolist(), (B + rng.integers(0, 3 * 86400, n)).tolist(),
                    rng.integers(0, 30, n).tolist(), rng.integers(0, 20, n).tolist(),
                    rng.integers(0, 1000, n).tolist(), [USE] * n))


def test_shards_are_disjoint_by_user_and_deterministic(tmp_path):
    rows = random_events()
    out = tmp_path / "a"
    prepare_output(out)
    cfg = small_config(num_shards=4, slots=24, row_group_size=16)
    featurize_tables(batches_of(rows, 500), APPS, LOCATIONS, cfg, out)
    shard_users = {}
    for path in out.glob("split=*/shard=*/part-00000.parquet"):
        shard = int(path.parent.name.split("=")[1])
        users = set(pq.read_table(path, columns=["user_id"]).column("user_id").to_pylist())
        assert all(bucket_of(np.array([u]), 4)[0] == splitmix64(u, SHARD_SALT) % 4 == shard for u in users)
        shard_users.setdefault(shard, set()).update(users)
    shards = list(shard_users.values())
    assert len(shards) > 1 and sum(map(len, shards)) == len(set().union(*shards)) == 40

    again = tmp_path / "b"
    prepare_output(again)
    featurize_tables(batches_of(rows[::-1], 77), APPS, LOCATIONS, cfg, again)  # other order, batches
    for path in out.glob("split=*/shard=*/*.parquet"):
        assert pq.read_table(path).equals(pq.read_table(again / path.relative_to(out)))


def test_statistics_of_each_split_match_the_written_examples(tmp_path):
    """The spec's statistics (merged from the buckets) equal numpy over the examples read back."""
    cfg = small_config(num_shards=3, slots=24, row_group_size=16, val_fraction=0.3, test_fraction=0.2)
    out = tmp_path / "features"
    prepare_output(out)
    featurize_tables(batches_of(random_events(), 500), APPS, LOCATIONS, cfg, out)
    statistics = read_spec(out).statistics
    examples = list(read_examples(out).values())
    assert set(statistics) == {e["split"] for e in examples} and "train" in statistics
    for split, got in statistics.items():
        rows = [e for e in examples if e["split"] == split]
        observed = np.array([e["observed"] for e in rows], bool)  # [n, T]
        values = np.array([e["dense"] for e in rows], np.float64).reshape(len(rows), 24, 8)[observed]
        share = observed.mean(axis=1)
        assert got["examples"] == len(rows) and got["observed_slots"] == observed.sum()
        assert got["sparsity_buckets"] == np.bincount(np.searchsorted(cfg.feature_spec().sparsity_edges, share),
                                                      minlength=5).tolist()
        np.testing.assert_allclose(got["channels"]["mean"], values.mean(axis=0), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(got["channels"]["std"], values.std(axis=0), rtol=1e-6, atol=1e-7)
        assert got["channels"]["max"] == pytest.approx(values.max(axis=0).tolist())
        assert got["ids"]["app"]["occurrences"] == sum(len(e["app_ids"]) for e in rows)
        assert got["ids"]["loc"]["occurrences"] == sum(len(e["loc_ids"]) for e in rows)


def test_row_groups_and_manifest(tmp_path):
    rows = [(5, B + w * 14400, 10, 100, 1, USE) for w in range(5)]
    manifest, _, cfg = run(tmp_path, rows=rows, row_group_size=2, num_shards=1)
    split = expected_split(5, cfg)
    path = tmp_path / "features" / f"split={split}" / "shard=00000" / "part-00000.parquet"
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [2, 2, 1]
    assert manifest["shards"][0]["row_groups"] == {split: [2, 2, 1]}
    assert manifest["examples"][split] == 5
    spec = read_spec(tmp_path / "features")
    assert manifest["spec_digest"] == spec.digest
    assert (spec.slots, spec.layout.num_channels, spec.num_categories, spec.num_regions,
            spec.slot_seconds, spec.region_source) == (4, 8, 2, 2, 3600, "region_id")
    assert json.loads((tmp_path / "features" / "spec" / "spec.json").read_text())["dense_layout"][
        "unknown_region"] == 5
    assert not (tmp_path / "features" / "_staging").exists()
    assert json.loads((tmp_path / "features" / "manifest.json").read_text()) == manifest


def test_packed_and_fallback_sorts_agree():
    rng = np.random.default_rng(1)
    slots = rng.integers(0, 50, 400)
    small_ids = rng.integers(0, 30, 400)
    for ids in (small_ids, small_ids * 2**58):  # the second does not pack into one int64
        got_slots, got_ids = slots_module.distinct_pairs(slots, ids)
        expected = sorted(set(zip(slots.tolist(), ids.tolist())))
        assert list(zip(got_slots.tolist(), got_ids.tolist())) == expected
    split, rank = rng.integers(0, 4, 400), rng.integers(0, 20, 400)
    for ts in (rng.integers(0, 100, 400), rng.integers(0, 2**60, 400)):  # packed, then lexsort
        order, r, t = slots_module._split_user_time_order(split, rank, ts, np.arange(400))
        expected = np.lexsort((ts, rank, split))
        np.testing.assert_array_equal(np.stack([split[order], r, t]),
                                      np.stack([split[expected], rank[expected], ts[expected]]))
        np.testing.assert_array_equal(r, rank[order])


def test_prepare_output_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to overwrite"):
        prepare_output(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def write_contract_dataset(root: Path) -> None:
    root.mkdir()
    rows = EVENTS + [(3, B + 30, 10, 100, -5, USE)]  # negative bytes: invalid, quarantined
    user, ts, app, loc, traffic, event = zip(*rows)
    names = {USE: "use", INSTALL: "install"}
    pq.write_table(pa.table({
        "user_id": pa.array(user, pa.int32()),
        "ts": pa.array([t * 1000 for t in ts], pa.timestamp("ms", tz="UTC")),
        "app_id": pa.array(app, pa.int64()), "loc_id": pa.array(loc, pa.int64()),
        "traffic_bytes": pa.array(traffic, pa.int64()),
        "event": pa.array([names[e] for e in event]),
    }), root / "events.parquet")
    pq.write_table(APPS, root / "apps.parquet")
    pq.write_table(LOCATIONS, root / "locations.parquet")


def test_featurize_and_summary_commands(tmp_path, capsys):
    write_contract_dataset(tmp_path / "raw")
    features = tmp_path / "features"
    args = ["--config", "configs/tiny.yaml", f"data.source={tmp_path / 'raw'}", f"data.features={features}",
            "data.slots=4", "data.num_categories=2", "data.num_regions=2", "data.num_shards=2",
            "data.featurize_workers=1"]
    assert cli_main(["data", "featurize", *args]) == 0
    line = capsys.readouterr().out
    assert "featurized 10 events (1 duplicates dropped, 1 rows quarantined) into 4 examples of 2 users" in line
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["quarantine"]["rows_quarantined"] == 1
    assert list((features / "quarantine").iterdir())
    assert load_config([str(features / "config.yaml")]).data.slots == 4
    assert read_examples(features) == read_examples(_library_run(tmp_path))

    assert cli_main(["data", "summary", *args]) == 0
    text = capsys.readouterr().out
    summary = json.loads((features / "summary.json").read_text())
    assert summary["examples"] == manifest["examples"] and summary["events"]["featurized"] == 10
    # 7 observed slots over 4 examples of 4 slots
    assert summary["observed_slot_share"]["mean"] == pytest.approx((3 / 4 + 1 / 4 + 1 / 4 + 1 / 4) / 4)
    assert summary["observed_slot_share"]["quantiles"]["p50"] == 0.25
    assert summary["observed_slot_share"]["quantiles"]["p90"] == 0.75
    # the buckets are the spec's, the same as eval's (umask.spec.SPARSITY_EDGES)
    assert summary["observed_slot_share"]["buckets"] == {
        "[0, 0.05]": 0, "(0.05, 0.15]": 0, "(0.15, 0.3]": 3, "(0.3, 0.5]": 0, "(0.5, 1]": 1}
    top = summary["top_categories"]
    assert [c["category"] for c in top] == ["1", "0", "unknown"]  # app records: 11 x4, 10 x3, 99 x2
    assert [c["usage"] for c in top] == [4, 3, 2]
    regions = summary["regions"]
    hashed_103 = splitmix64(103, REGION_SALT) % 2
    expected = [1 / 3 + 1 + (hashed_103 == 0), 2 / 3 + 1 + (hashed_103 == 1)]  # 4 located slots
    assert regions["located_slots"] == 4 and regions["unknown_share"] == 0
    np.testing.assert_allclose(regions["share"], np.array(expected) / 4, rtol=1e-6)
    assert "examples" in text and "observed" in text

    assert cli_main(["data", "featurize", *args[:-1], "data.featurize_workers=1", "data.slot_seconds=1"]) == 2
    assert "slot_seconds" in capsys.readouterr().err


def _library_run(tmp_path) -> Path:
    out = tmp_path / "library"
    prepare_output(out)
    featurize_tables(batches_of(EVENTS), APPS, LOCATIONS, small_config(), out)
    return out


def test_config_hash_follows_feature_settings_only():
    base = featurize.config_hash(small_config())
    assert featurize.config_hash(small_config(featurize_workers=2, features="elsewhere")) == base
    assert featurize.config_hash(small_config(slots=8)) != base
    assert featurize.config_hash(small_config(split_salt=1)) != base


def test_summary_of_a_corrupt_manifest_names_the_file(tmp_path):
    from trainer.data.summary import summarize

    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest\.json: cannot read it as JSON"):
        summarize(tmp_path)
