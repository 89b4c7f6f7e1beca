"""`u-mask data synth --generator metro`: a second synthetic source, built unlike the personas one.

The quality check (`make quality`) scores every method on two sources so that no result rests
on the one dataset the model was tuned on. This generator shares no code or table with
trainer/data/synth_*.py: no routine states, no Poisson bursts, no install events. Instead:

- 18 app categories and 12 regions (locations.parquet carries a precomputed region_id), so
  the pipeline runs with C=18, K=12 (configs/quality-metro.yaml);
- six persona kinds (shift worker on rotating day/night weeks, courier who roams the city,
  freelancer with an irregular day, teenager, weekend-only user, tourist), each an hourly
  propensity for workdays and weekends built from Gaussian bumps, a category taste and a
  place rule;
- each user's share of active hours is drawn log-uniformly between 3 % and 60 %; an active
  hour holds 1 + Poisson(rate) events, rate log-normal per user;
- per-event traffic is log-normal with a median of 8 KB (8192 bytes), times a per-category
  factor (video-like categories heavier, chat lighter);
- 10 % of users are cold-start: they appear only in the window's last 1-5 days;
- 15 % of users have one noisy one-off week: hours shifted by 3-9 h, a trip region and a
  fresh random taste;
- user ids are sparse 62-bit integers, ts is int64 epoch seconds, 4 % of records have no
  loc_id.

Everything is vectorised over users x hours with numpy; users come in chunks of
CHUNK_USERS, chunk i drawing from its own stream seeded by (seed, METRO_STREAM, i), so the
same arguments give the same Parquet content. No profiles.parquet (it is optional).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from trainer.data.synth import EVENTS_DIR, SynthSummary, _prepare, _start_seconds, _write
from umask.errors import UserError

CATEGORY_NAMES = ("chat", "feed", "clips", "streaming", "arcade", "audio", "docs", "mail",
                  "navigation", "retail", "banking", "delivery", "rides", "health", "learning",
                  "camera", "utilities", "books")
NUM_CATEGORIES = len(CATEGORY_NAMES)  # 18
NUM_REGIONS = 12
CHUNK_USERS = 2000
METRO_STREAM = 7  # keeps this generator's streams apart from the personas generator's
TRAFFIC_MEDIAN_BYTES = 8192.0
TRAFFIC_SIGMA = 1.0
ACTIVE_SHARE_RANGE = (0.03, 0.60)
COLD_START_SHARE = 0.10
ONE_OFF_WEEK_SHARE = 0.15
NO_LOC_SHARE = 0.04
_C = {name: i for i, name in enumerate(CATEGORY_NAMES)}
# heavier or lighter traffic per event than the median, per category
_TRAFFIC_FACTOR = np.ones(NUM_CATEGORIES)
for _name, _factor in {"clips": 4.0, "streaming": 8.0, "arcade": 2.0, "audio": 3.0, "chat": 0.3,
                       "mail": 0.5, "banking": 0.4, "camera": 2.5, "utilities": 0.3}.items():
    _TRAFFIC_FACTOR[_C[_name]] = _factor


def _bumps(*peaks: tuple[float, float, float]) -> np.ndarray:
    """A 24-hour propensity from Gaussian bumps (hour, width in hours, height), circular."""
    hours = np.arange(24)[:, None]
    centre, width, height = (np.array(v, float) for v in zip(*peaks))
    distance = np.minimum(np.abs(hours - centre), 24 - np.abs(hours - centre))
    return 0.02 + (height * np.exp(-0.5 * (distance / width) ** 2)).sum(1)


def _taste(**weights: float) -> np.ndarray:
    out = np.full(NUM_CATEGORIES, 0.2)
    for name, weight in weights.items():
        out[_C[name]] = weight
    return out / out.sum()


# kind: (share of users, workday propensity [24], weekend propensity [24], taste [C], place rule)
# place rules: "fixed" home + work region, "roam" a random region every active hour,
# "home" one region, "trip" a home region for the first half of the window and another after
_KINDS = {
    "shift_worker": (0.20, _bumps((7, 2, 1), (15, 3, 1), (23, 2, 0.8)), _bumps((12, 4, 1)),
                     _taste(chat=3, clips=2, health=3, audio=2, delivery=2), "fixed"),
    "courier": (0.15, _bumps((9, 3, 1), (14, 3, 1), (18, 2, 0.8)), _bumps((13, 4, 0.6)),
                _taste(navigation=6, rides=3, chat=3, audio=3, delivery=2), "roam"),
    "freelancer": (0.20, _bumps((11, 4, 1), (22, 3, 0.8)), _bumps((14, 5, 0.8)),
                   _taste(docs=5, mail=4, chat=2, banking=2, streaming=2, books=1.5), "home"),
    "teen": (0.20, _bumps((7, 1, 0.6), (16, 2, 1), (21, 2, 1.2)), _bumps((15, 5, 1.2)),
             _taste(clips=5, arcade=5, feed=4, chat=4, camera=2, learning=1.5), "fixed"),
    "weekend_user": (0.15, _bumps((20, 2, 0.3)), _bumps((11, 3, 1), (17, 3, 1.2)),
                     _taste(retail=5, streaming=4, feed=3, banking=2, delivery=2), "home"),
    "tourist": (0.10, _bumps((10, 3, 1), (15, 3, 1), (20, 2, 1)), _bumps((12, 4, 1)),
                _taste(camera=6, navigation=5, rides=3, feed=3, books=1), "trip"),
}
KIND_NAMES = tuple(_KINDS)


def synthesize_metro(out: str | Path, users: int, days: int = 28, seed: int = 0, apps: int = 2000,
                     locations: int = 500, start: str = "2026-11-02",
                     on_progress: Callable[[int, int], None] | None = None) -> SynthSummary:
    """Writes events/part-NNNNN.parquet, apps.parquet and locations.parquet to `out`.

    users >= 1, days >= 2, apps >= 18 (one per category at least), locations >= 12; a
    UserError names the argument otherwise. ts are epoch seconds (int64), traffic_bytes int64.
    """
    began = time.perf_counter()
    for key, value, minimum in (("users", users, 1), ("days", days, 2), ("apps", apps, NUM_CATEGORIES),
                                ("locations", locations, NUM_REGIONS), ("seed", seed, 0)):
        if value < minimum:
            raise UserError(f"synth --generator metro: --{key} must be at least {minimum}, got {value}")
    out = Path(out)
    start_s = _start_seconds(start)
    _prepare(out)
    world = np.random.default_rng([seed, METRO_STREAM])
    app_category = np.concatenate([np.arange(NUM_CATEGORIES),
                                   world.integers(0, NUM_CATEGORIES, apps - NUM_CATEGORIES)])
    app_ids = world.choice(10**9, apps, replace=False).astype(np.int64) + 10**6
    loc_region = np.concatenate([np.arange(NUM_REGIONS),
                                 world.integers(0, NUM_REGIONS, locations - NUM_REGIONS)])
    loc_ids = np.arange(locations, dtype=np.int64) * 17 + 100_003
    centres = world.uniform([39.7, 116.1], [40.1, 116.7], (NUM_REGIONS, 2))
    spots = centres[loc_region] + world.normal(0, 0.01, (locations, 2))
    _write(pa.table({"app_id": app_ids, "category_id": app_category.astype(np.int32),
                     "name": [f"{CATEGORY_NAMES[c]}-{i}" for i, c in enumerate(app_category)]}),
           out / "apps.parquet")
    _write(pa.table({"loc_id": loc_ids, "lat": spots[:, 0], "lon": spots[:, 1],
                     "region_id": loc_region.astype(np.int32)}), out / "locations.parquet")
    catalog = _Catalog(app_ids, app_category, loc_ids, loc_region)
    events, files = 0, 0
    for index, first in enumerate(range(0, users, CHUNK_USERS)):
        count = min(CHUNK_USERS, users - first)
        rng = np.random.default_rng([seed, METRO_STREAM, index])
        table = _chunk(rng, catalog, count, days, start_s)
        _write(table, out / EVENTS_DIR / f"part-{index:05d}.parquet")
        events, files = events + table.num_rows, files + 1
        if on_progress is not None:
            on_progress(first + count, users)
    return SynthSummary(users, events, files + 2, time.perf_counter() - began)


class _Catalog:
    """Apps per category (sorted by popularity rank) and locations per region."""

    def __init__(self, app_ids, app_category, loc_ids, loc_region):
        self.app_ids, self.loc_ids = app_ids, loc_ids
        order = np.argsort(app_category, kind="stable")
        self.apps_sorted = app_ids[order]
        self.app_start = np.searchsorted(app_category[order], np.arange(NUM_CATEGORIES))
        self.app_count = np.bincount(app_category, minlength=NUM_CATEGORIES)
        order = np.argsort(loc_region, kind="stable")
        self.locs_sorted = loc_ids[order]
        self.loc_start = np.searchsorted(loc_region[order], np.arange(NUM_REGIONS))
        self.loc_count = np.bincount(loc_region, minlength=NUM_REGIONS)


def _chunk(rng: np.random.Generator, catalog: _Catalog, n: int, days: int, start_s: int) -> pa.Table:
    """The events of n users over `days` days as one contract table."""
    hours = 24 * days
    kinds = list(_KINDS.values())
    kind = rng.choice(len(kinds), n, p=[k[0] for k in kinds])  # [n]
    workday = np.stack([k[1] for k in kinds])  # [kinds,24]
    weekend = np.stack([k[2] for k in kinds])
    taste = np.stack([k[3] for k in kinds])  # [kinds,C]
    rule = np.array([k[4] for k in kinds])[kind]  # [n]
    hour = np.arange(hours)
    hour_of_day, day = hour % 24, hour // 24
    is_weekend = ((_weekday(start_s) + day) % 7) >= 5  # [H]
    # each user's own clock: the persona's curve shifted by up to +-2 h
    shift = rng.integers(-2, 3, n)
    local = (hour_of_day[None, :] - shift[:, None]) % 24  # [n,H]
    # shift workers alternate day and night weeks
    night_week = (kind == KIND_NAMES.index("shift_worker"))[:, None] & ((day[None, :] // 7) % 2 == 1)
    local = np.where(night_week, (local + 10) % 24, local)
    # noisy one-off week: hours moved by 3-9 h, a trip region, a random taste
    one_off = rng.random(n) < ONE_OFF_WEEK_SHARE
    odd_week = rng.integers(0, max(days // 7, 1), n)
    in_odd = one_off[:, None] & ((day[None, :] // 7) == odd_week[:, None])  # [n,H]
    local = np.where(in_odd, (local + rng.integers(3, 10, n)[:, None]) % 24, local)
    propensity = np.where(is_weekend[None, :], weekend[kind[:, None], local], workday[kind[:, None], local])
    # calibrate each user's mean hourly activation to its drawn active share
    low, high = np.log(ACTIVE_SHARE_RANGE[0]), np.log(ACTIVE_SHARE_RANGE[1])
    share = np.exp(rng.uniform(low, high, n))  # [n]
    p = np.clip(propensity * (share / propensity.mean(1))[:, None], 0, 0.97)
    first_day = np.where(rng.random(n) < COLD_START_SHARE, days - rng.integers(1, 6, n), 0)
    active = (rng.random((n, hours)) < p) & (day[None, :] >= first_day[:, None])
    user, at = np.nonzero(active)  # one row per active hour
    per_hour = 1 + rng.poisson(np.exp(rng.normal(0.5, 0.6, n))[user])
    user, at = np.repeat(user, per_hour), np.repeat(at, per_hour)
    events = len(user)
    # category: the user's taste (Dirichlet around the kind's), replaced in the odd week
    user_taste = rng.dirichlet(np.ones(NUM_CATEGORIES), n) * 0.3 + 0.7 * taste[kind]
    odd_taste = rng.dirichlet(np.full(NUM_CATEGORIES, 0.5), n)
    weights = np.where(in_odd[user, at][:, None], odd_taste[user], user_taste[user])
    category = _draw_rows(rng, weights)
    # app: a popularity rank within the category (Zipf), shifted by the user's own favourite
    # (geometric, mostly 0-2): the popular apps are everyone's, with a personal tail
    favourite = rng.geometric(0.4, (n, NUM_CATEGORIES)) - 1
    rank = (rng.zipf(1.8, events) - 1 + favourite[user, category]) % catalog.app_count[category]
    app = catalog.apps_sorted[catalog.app_start[category] + rank]
    # region by the kind's place rule; work hours of fixed users in the work region
    home, work, trip = (rng.integers(0, NUM_REGIONS, n) for _ in range(3))
    busy = (~is_weekend[at]) & (local[user, at] >= 9) & (local[user, at] < 17)
    region = np.where(busy & (rule[user] == "fixed"), work[user], home[user])
    region = np.where(rule[user] == "roam", rng.integers(0, NUM_REGIONS, events), region)
    region = np.where((rule[user] == "trip") & (at >= hours // 2), trip[user], region)
    region = np.where(in_odd[user, at], trip[user], region)
    spot = rng.integers(0, 1 << 30, events) % np.minimum(catalog.loc_count[region], 3)
    loc = catalog.locs_sorted[catalog.loc_start[region] + spot]
    traffic = rng.lognormal(np.log(TRAFFIC_MEDIAN_BYTES), TRAFFIC_SIGMA, events) * _TRAFFIC_FACTOR[category]
    ts = start_s + at.astype(np.int64) * 3600 + rng.integers(0, 3600, events)
    user_ids = rng.choice(1 << 62, n, replace=False).astype(np.int64)
    no_loc = rng.random(events) < NO_LOC_SHARE
    return pa.table({
        "user_id": pa.array(user_ids[user], pa.int64()),
        "ts": pa.array(ts, pa.int64()),
        "app_id": pa.array(app, pa.int64()),
        "loc_id": pa.array(np.where(no_loc, 0, loc), pa.int64(), mask=no_loc),
        "traffic_bytes": pa.array(traffic.astype(np.int64), pa.int64()),
    })


def _draw_rows(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One index per row of weights [N,C] (rows need not sum to 1), by inverse CDF; [N]."""
    cdf = np.cumsum(weights, 1)
    u = rng.random(len(weights)) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(1), weights.shape[1] - 1)


def _weekday(start_s: int) -> int:
    """Monday = 0 of the window's first day (1970-01-01 was a Thursday)."""
    return int((start_s // 86400 + 3) % 7)
