"""Featurize throughput: events per CPU-second of ours against a pandas groupby version.

Builds synthetic contract events with numpy (default 4 M events: 2,000 users over two weeks,
about 1,000 events per user-week as in the Tsinghua App Usage data; Zipf-distributed app
ids over 2,000 apps of which 1,800 are categorized, a few home/work cells per user, 10 %
location-only records, 5 % without a cell, 1 % exact duplicates), then measures side by side
in one run, both writing the same EXAMPLES Parquet output with the default layout (T=168
hourly slots, C=20, K=32):
- ours: trainer.data.featurize.featurize_events, phase 1 (partition into 8 buckets) and
  phase 2 (featurize each bucket), one worker process;
- pandas: the same features the straightforward way (drop_duplicates, groupby size/sum,
  unstack per category and region, groupby over the sorted distinct ids for the bags).
Per core = events / CPU seconds of the process (Arrow's threads included), so the machine's
other load and core count do not flatter either side. Before timing, both run on a 50,000
event sample and must produce the same examples. Prints one JSON line; ratio = ours / pandas.

    .venv/bin/python bench/featurize_core_bench.py [--events 4000000] [--users 2000]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.config import DataConfig
from trainer.data.featurize import EXAMPLE_WRITE_OPTIONS, build_feature_spec, featurize_events, prepare_output
from trainer.data.schema import EXAMPLES
from umask.contract import NORMALIZED_EVENTS
from umask.slots import split_of
from umask.spec import SPLITS, DenseLayout
from umask.spec import WEEK_SECONDS as WEEK
from umask.spec import WINDOW_ORIGIN as ORIGIN

APPS, CATEGORIZED_APPS, LOCATIONS = 2000, 1800, 9000
BATCH_ROWS = 1 << 20


def synthetic_events(n: int, users: int, seed: int = 0) -> pa.Table:
    """n events (1 % of them repeated rows) of `users` users over two weeks, NORMALIZED_EVENTS."""
    rng = np.random.default_rng(seed)
    unique = n - n // 100
    user_ids = rng.integers(0, 2**62, users)
    user = rng.integers(0, users, unique)
    homes = rng.integers(0, LOCATIONS, (users, 3))  # each user moves among a few cells
    app = np.minimum(rng.zipf(1.3, unique), APPS) - 1
    columns = {
        "user_id": user_ids[user],
        "ts": ORIGIN + 2900 * WEEK + rng.integers(0, 2 * WEEK, unique),
        "app_id": pa.array(app, mask=rng.random(unique) < 0.10),
        "loc_id": pa.array(homes[user, rng.integers(0, 3, unique)], mask=rng.random(unique) < 0.05),
        "traffic_bytes": pa.array(rng.lognormal(8, 2, unique).astype(np.int64),
                                  mask=rng.random(unique) < 0.02),
        "event": (rng.random(unique) < 0.01).astype(np.int8),  # 1 % installs
    }
    table = pa.table(columns).cast(NORMALIZED_EVENTS)
    repeated = table.take(rng.integers(0, unique, n - unique))
    return pa.concat_tables([table, repeated]).combine_chunks()


def side_tables(seed: int = 0) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(seed + 1)
    apps = pa.table({"app_id": pa.array(np.arange(CATEGORIZED_APPS), pa.int64()),
                     "category_id": pa.array(rng.integers(0, 20, CATEGORIZED_APPS), pa.int32())})
    locations = pa.table({"loc_id": pa.array(np.arange(LOCATIONS), pa.int64()),
                          "lat": rng.uniform(39.7, 40.1, LOCATIONS),
                          "lon": rng.uniform(116.1, 116.7, LOCATIONS)})
    return apps, locations


def ours(events: pa.Table, apps: pa.Table, locations: pa.Table, cfg: DataConfig, out: Path) -> None:
    prepare_output(out)
    featurize_events(events.to_batches(max_chunksize=BATCH_ROWS), *build_feature_spec(apps, locations, cfg),
                     cfg, out)


def pandas_featurize(events: pa.Table, apps: pa.Table, locations: pa.Table, cfg: DataConfig,
                     out: Path) -> None:
    """The same examples as featurize_events, written with pandas groupbys."""
    spec, maps = build_feature_spec(apps, locations, cfg)
    T, C, K = cfg.slots, cfg.num_categories, cfg.num_regions
    layout, span = DenseLayout(C, K), T * cfg.slot_seconds
    df = events.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get).drop_duplicates()
    df["window"] = (df["ts"] - ORIGIN) // span
    df["slot"] = (df["ts"] - ORIGIN - df["window"] * span) // cfg.slot_seconds
    df["example"] = df.groupby(["user_id", "window"]).ngroup()
    examples = df.groupby("example")[["user_id", "window"]].first()
    E = len(examples)
    keys = ["example", "slot"]

    dense = np.zeros((E, T, layout.num_channels), np.float32)
    per_slot = df.groupby(keys).agg(records=("ts", "size"), volume=("traffic_bytes", "sum"))
    ex, slot = (per_slot.index.get_level_values(k).to_numpy() for k in keys)
    dense[ex, slot, layout.activity] = np.log1p(per_slot["records"].to_numpy(np.float64))
    dense[ex, slot, layout.volume] = np.log1p(per_slot["volume"].to_numpy(np.float64))
    observed = np.zeros((E, T), bool)
    observed[ex, slot] = True

    with_app = df[df["app_id"].notna()].copy()
    category = pd.Series(maps.categories, index=maps.app_ids)
    with_app["category"] = with_app["app_id"].map(category).fillna(C).astype(np.int64)
    grouped = with_app.groupby(keys + ["category"])
    usage = grouped.size() if cfg.category_value == "count" else grouped["traffic_bytes"].sum()
    usage = usage.unstack(fill_value=0)
    ex, slot = (usage.index.get_level_values(k).to_numpy() for k in keys)
    for c in usage.columns:
        dense[ex, slot, layout.category.start + c] = np.log1p(usage[c].to_numpy(np.float64))

    with_loc = df[df["loc_id"].notna()].copy()
    with_loc["region"] = maps.region(with_loc["loc_id"].to_numpy(np.int64), spec)
    counts = with_loc.groupby(keys + ["region"]).size().unstack(fill_value=0)
    shares = counts.div(counts.sum(axis=1), axis=0)
    ex, slot = (shares.index.get_level_values(k).to_numpy() for k in keys)
    for r in shares.columns:
        dense[ex, slot, layout.region.start + r] = shares[r].to_numpy(np.float64)

    bags = [_pandas_bag(with_app, "app_id", E, T), _pandas_bag(with_loc, "loc_id", E, T)]
    user = examples["user_id"].to_numpy(np.int64)
    window = examples["window"].to_numpy(np.int64)
    split = split_of(user, spec)
    slot_start = window[:, None] * span + np.arange(T) * cfg.slot_seconds  # [E, T] since ORIGIN
    tow = ((slot_start % WEEK) // cfg.slot_seconds).astype(np.int16)
    for s, name in enumerate(SPLITS):
        rows = np.flatnonzero(split == s)
        if len(rows) == 0:
            continue
        table = pa.Table.from_arrays([
            pa.array(user[rows]), pa.array([name] * len(rows), pa.string()),
            pa.array(ORIGIN + window[rows] * span), _lists(tow[rows]), _lists(observed[rows]),
            _lists(dense[rows]), *(array for b in bags for array in _bag_lists(b, rows))], schema=EXAMPLES)
        path = out / f"split={name}" / "part-00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=cfg.row_group_size, **EXAMPLE_WRITE_OPTIONS)


def _pandas_bag(frame: pd.DataFrame, column: str, E: int, T: int):
    """(lengths [E, T], ids sorted by example, slot, id, example of each id)."""
    pairs = frame[["example", "slot", column]].drop_duplicates().sort_values(["example", "slot", column])
    lengths = np.zeros((E, T), np.int32)
    sizes = pairs.groupby(["example", "slot"]).size()
    lengths[sizes.index.get_level_values(0), sizes.index.get_level_values(1)] = sizes.to_numpy()
    return lengths, pairs[column].to_numpy(np.int64), pairs["example"].to_numpy()


def _bag_lists(bag, rows: np.ndarray) -> tuple[pa.ListArray, pa.ListArray]:
    lengths, ids, example = bag
    starts = np.searchsorted(example, rows)
    per_example = lengths[rows].sum(axis=1)
    # positions in `ids` of each kept example's ids, in example order
    shift = starts - np.concatenate([[0], np.cumsum(per_example)[:-1]])
    take = np.repeat(shift, per_example) + np.arange(per_example.sum())
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_example)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(ids[take])), _lists(lengths[rows])


def _lists(values: np.ndarray) -> pa.ListArray:
    per_row = int(np.prod(values.shape[1:]))
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32) * per_row)
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def read_examples(out: Path) -> dict:
    rows = pa.concat_tables([pq.read_table(p, schema=EXAMPLES) for p in sorted(out.glob("split=*/**/*.parquet"))])
    return {(r["user_id"], r["window_start"]): r for r in rows.to_pylist()}


def check_same_output(events: pa.Table, apps, locations, cfg: DataConfig, work: Path) -> int:
    """Runs both on `events`; raises unless they write the same examples. Returns the count."""
    ours(events, apps, locations, cfg, work / "ours_sample")
    pandas_featurize(events, apps, locations, cfg, work / "pandas_sample")
    mine, theirs = read_examples(work / "ours_sample"), read_examples(work / "pandas_sample")
    assert mine.keys() == theirs.keys(), "ours and pandas found different (user, window) examples"
    for key, row in mine.items():
        other = theirs[key]
        np.testing.assert_allclose(row.pop("dense"), other.pop("dense"), rtol=1e-6, err_msg=str(key))
        assert row == other, f"example {key} differs between ours and pandas"
    return len(mine)


def timed(run, *args) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4_000_000)
    parser.add_argument("--users", type=int, default=2000)
    args = parser.parse_args()
    events = synthetic_events(args.events, args.users)
    apps, locations = side_tables()
    cfg = DataConfig(featurize_workers=1)
    with tempfile.TemporaryDirectory(prefix="featurize_bench_") as tmp:
        work = Path(tmp)
        sample = synthetic_events(50_000, 100, seed=1)
        checked = check_same_output(sample, apps, locations, cfg, work)
        ours_wall, ours_cpu = timed(ours, events, apps, locations, cfg, work / "ours")
        pandas_wall, pandas_cpu = timed(pandas_featurize, events, apps, locations, cfg, work / "pandas")
    print(json.dumps({
        "bench": "featurize", "events": args.events, "users": args.users,
        "ours_events_per_s_per_core": round(args.events / ours_cpu),
        "pandas_events_per_s_per_core": round(args.events / pandas_cpu),
        "ratio": round(pandas_cpu / ours_cpu, 2),
        "ours_wall_s": round(ours_wall, 2), "pandas_wall_s": round(pandas_wall, 2),
        "sample_examples_equal": checked,
    }))


if __name__ == "__main__":
    main()
