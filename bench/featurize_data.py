"""Synthetic contract datasets for the featurize benchmarks, written with numpy straight to Parquet.

`u-mask data synth` simulates people (personas, days, places) in Python per user: right for the
demo, far too slow for 10^8 events. This writes the same contract layout vectorised, file by
file (memory: one file's columns), at ~10^7 events/s:
- events/part-<i>.parquet: user_id int64, ts timestamp[s, UTC], app_id, loc_id, traffic_bytes
  int64 (nullable), event string; users uniform over the files (every file holds every
  user's events, as daily exports do), ts uniform over two weeks, Zipf app ids, each user
  among a few home/work cells, 10 % location-only records, 5 % without a cell, 1 % installs;
- apps.parquet (app_id, category_id) for 90 % of the apps (--apps, default 20,000);
- locations.parquet (loc_id, lat, lon) without region_id, so featurize fits k-means regions
  (--locations, default 100,000; written in row groups of 2^20, one city's block at a time).

    .venv/bin/python bench/featurize_data.py OUT --events 100000000 [--users N] [--files 10] \
        [--apps 1000000] [--locations 10000000]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from umask.spec import WEEK_SECONDS as WEEK
from umask.spec import WINDOW_ORIGIN as ORIGIN

APPS, LOCATIONS = 20_000, 100_000
ROW_GROUP = 1 << 20
EVENT_NAMES = pa.array(["use", "install"])


def write_dataset(root: Path, events: int, users: int, files: int, seed: int = 0, apps: int = APPS,
                  locations: int = LOCATIONS) -> Path:
    """Writes a contract dataset of `events` events of `users` users, `apps` apps and `locations`
    places into root (new); returns root."""
    root.mkdir(parents=True)
    (root / "events").mkdir()
    rng = np.random.default_rng(seed)
    user_ids = rng.integers(0, 2**62, users)
    homes = rng.integers(0, locations, (users, 3))
    start = ORIGIN + 2900 * WEEK
    per_file = [events // files + (i < events % files) for i in range(files)]
    for i, n in enumerate(per_file):
        file_rng = np.random.default_rng([seed, i])
        with pq.ParquetWriter(root / "events" / f"part-{i:05d}.parquet", _schema()) as writer:
            for offset in range(0, n, ROW_GROUP):
                writer.write_table(_events(file_rng, min(ROW_GROUP, n - offset), user_ids, homes, start, apps))
    app_ids = np.arange(apps, dtype=np.int64)
    listed = app_ids[rng.random(apps) < 0.9]
    pq.write_table(pa.table({"app_id": listed, "category_id": rng.integers(0, 20, len(listed)).astype(np.int32)}),
                   root / "apps.parquet")
    # cells around a few cities, so that the regions mean something
    cities = rng.uniform([-50, -180], [60, 180], (40, 2))
    schema = pa.schema([("loc_id", pa.int64()), ("lat", pa.float64()), ("lon", pa.float64())])
    with pq.ParquetWriter(root / "locations.parquet", schema) as writer:
        for first in range(0, locations, ROW_GROUP):
            n = min(ROW_GROUP, locations - first)
            city = rng.integers(0, len(cities), n)
            writer.write_table(pa.table({
                "loc_id": np.arange(first, first + n, dtype=np.int64),
                "lat": np.clip(cities[city, 0] + rng.normal(0, 0.3, n), -90, 90),
                "lon": (cities[city, 1] + rng.normal(0, 0.3, n) + 180) % 360 - 180}, schema=schema))
    return root


def _schema() -> pa.Schema:
    return pa.schema([("user_id", pa.int64()), ("ts", pa.timestamp("s", tz="UTC")), ("app_id", pa.int64()),
                      ("loc_id", pa.int64()), ("traffic_bytes", pa.int64()), ("event", pa.string())])


def _events(rng: np.random.Generator, n: int, user_ids: np.ndarray, homes: np.ndarray, start: int,
            apps: int) -> pa.Table:
    user = rng.integers(0, len(user_ids), n)
    app = np.minimum(rng.zipf(1.3, n), apps) - 1
    return pa.table({
        "user_id": user_ids[user],
        "ts": pa.array(start + rng.integers(0, 2 * WEEK, n), pa.int64()).cast(pa.timestamp("s", tz="UTC")),
        "app_id": pa.array(app, mask=rng.random(n) < 0.10),
        "loc_id": pa.array(homes[user, rng.integers(0, 3, n)], mask=rng.random(n) < 0.05),
        "traffic_bytes": pa.array(rng.lognormal(8, 2, n).astype(np.int64), mask=rng.random(n) < 0.02),
        "event": EVENT_NAMES.take(pa.array((rng.random(n) < 0.01).astype(np.int8))),
    }, schema=_schema())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, help="default: events // 2000 (1,000 events per user-week)")
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--apps", type=int, default=APPS)
    parser.add_argument("--locations", type=int, default=LOCATIONS)
    args = parser.parse_args()
    write_dataset(args.out, args.events, args.users or max(1, args.events // 2000), args.files, args.seed,
                  args.apps, args.locations)


if __name__ == "__main__":
    main()
