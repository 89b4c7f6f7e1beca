"""Event records for one chunk of synthetic users, generated with array operations only.

Per user and hour of the window: the routine gives a state (sleep, home, commute, work, out),
the state gives a place and an event rate, Poisson draws (with gamma bursts) give the number
of records. Each record then draws a category from persona taste x state x hour x the user's
own taste, an app from the user's few apps in that category, and a lognormal traffic volume.
Some apps are installed during the window (and used only after) and a few are uninstalled
(and not used after). A few records are location-only, some have no known cell and a few
are exact duplicates, as in real exports.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from trainer.data import synth_personas as personas
from trainer.data.synth_apps import INSTALL_MEDIAN_BYTES, TRAFFIC_MEDIAN, TRAFFIC_SIGMA
from trainer.data.synth_users import OUTING_PREFERENCE, OUTINGS, TIERS, Population
from trainer.data.synth_world import World

EVENT_VALUES = ("use", "install", "uninstall")
USE, INSTALL, UNINSTALL = range(3)
EVENTS_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),  # Parquet has no seconds unit
    pa.field("app_id", pa.int64()),
    pa.field("loc_id", pa.int64()),
    pa.field("traffic_bytes", pa.int64()),
    pa.field("event", pa.dictionary(pa.int8(), pa.string())),  # null: a location-only record
])

DAY_OFF_CHANCE = 0.04  # a workday spent as a free day (leave, sickness)
BURST_SHAPE = 2.0  # gamma shape of hour-to-hour burstiness; smaller is burstier
LOCATION_ONLY_SHARE = 0.08  # records with a cell but no app (network pings)
UNKNOWN_CELL_SHARE = 0.03  # app records whose cell is unknown
DUPLICATE_SHARE = 0.002  # records exported twice
TRIAL_UNINSTALL_CHANCE = 0.2  # an app installed in the window is removed again
UNINSTALLS_PER_USER = 0.1  # mean apps a user had before the window and removes in it
_EARLIEST, _LATEST = np.iinfo(np.int64).min, np.iinfo(np.int64).max
_CATEGORY_BATCH = 1 << 18  # records per batch when drawing categories ([batch, C] floats)


@dataclass(frozen=True)
class Window:
    start: int  # epoch seconds, a whole hour
    days: int

    @property
    def hours(self) -> int:
        return self.days * 24


def chunk_events(world: World, window: Window, users: Population,
                 rng: np.random.Generator) -> pa.Table:
    """All records of the chunk's users, sorted by (user, ts), in EVENTS_SCHEMA."""
    state = _states(world, window, users, rng)  # [U, H]
    cell = _record_cells(window, users, state, rng)  # [N] flat (user, hour) index per record
    user, hour = np.divmod(cell, window.hours)
    ts = window.start + hour * 3600 + rng.integers(0, 3600, size=len(cell))
    state, clock = state.ravel()[cell], _clock(window, users, user, hour)  # [N] each
    place = _places(window, users, state, user, hour, clock, rng)
    category = _categories(world, users, user, state, clock, rng)
    slot = _draw_rows(users.app_set_cdf[user, category], rng.random(len(cell)))
    app = users.app_sets[user, category, slot]
    has_app = rng.random(len(cell)) >= LOCATION_ONLY_SHARE
    known_cell = ~has_app | (rng.random(len(cell)) >= UNKNOWN_CELL_SHARE)
    traffic = np.exp(rng.normal(np.log(TRAFFIC_MEDIAN[category]), TRAFFIC_SIGMA[category]))
    records = dict(user=user, ts=ts, app=np.where(has_app, app, -1),
                   place=np.where(known_cell, place, -1),
                   traffic=np.where(has_app, traffic.astype(np.int64), -1),
                   event=np.where(has_app, USE, -1))
    records = _install_and_uninstall(world, window, users, records, rng)
    records = _duplicate(records, rng)
    # almost sorted already (by user and hour), which the stable sort (timsort) exploits
    order = np.argsort(records["user"] << 32 | (records["ts"] - window.start), kind="stable")
    return _table(world, users, {k: v[order] for k, v in records.items()})


def _states(world: World, window: Window, users: Population, rng: np.random.Generator):
    """[U, H] state of every user in every hour of the window (int8)."""
    first_day, offset = divmod(window.start // 3600, 24)
    days = (offset + window.hours + 23) // 24  # calendar days the window touches
    weekday = (first_day + np.arange(days) + 3) % 7  # [D], 1970-01-01 was a Thursday
    n = len(users.persona)
    workday = (personas.works_on_weekdays()[users.persona][:, None] & (weekday < 5)[None, :]
               & (rng.random((n, days)) >= DAY_OFF_CHANCE)).astype(np.int64)  # [U, D]
    goes_out = rng.random((n, days)) < personas.out_chances()[users.persona[:, None], workday]
    # routine[p, workday, shift + 1, hour]: the routine seen on a clock running `shift` hours late
    shifted = np.stack([np.roll(world.routines, shift, axis=2) for shift in (-1, 0, 1)], axis=2)
    code = shifted[users.persona[:, None], workday, users.clock_shift[:, None] + 1]  # [U, D, 24]
    state = np.where(code == personas.MAYBE_OUT,
                     np.where(goes_out[:, :, None], personas.OUT, personas.HOME), code)
    return state.astype(np.int8).reshape(n, days * 24)[:, offset:offset + window.hours]


def _clock(window: Window, users: Population, user: np.ndarray, hour: np.ndarray) -> np.ndarray:
    """[N] hour of day on each record's user's own clock."""
    return (window.start // 3600 + hour - users.clock_shift[user]) % 24


def _record_cells(window: Window, users: Population, state: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """[N] flat (user * H + hour) index of every use record, one entry per record."""
    rate = personas.STATE_ACTIVITY.astype(np.float32)[state]  # [U, H]
    rate[np.arange(window.hours)[None, :] < users.first_hour[:, None]] = 0.0
    scale = users.expected_events / np.maximum(rate.sum(axis=1), 1e-9)
    burst = rng.standard_gamma(BURST_SHAPE, size=rate.shape, dtype=np.float32) / BURST_SHAPE
    rate *= scale[:, None] * burst
    counts = rng.poisson(rate).ravel()
    return np.repeat(np.arange(counts.size), counts)


def _places(window: Window, users: Population, state: np.ndarray, user: np.ndarray,
            hour: np.ndarray, clock: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N] place number of each record: home, work, a commute cell or an outing place."""
    days = window.days + 1  # a window not starting at midnight touches one more day
    outing_of_day = rng.choice(OUTINGS, size=(len(users.persona), days), p=OUTING_PREFERENCE)
    roaming = rng.choice(OUTINGS, size=len(user))
    roams = personas.roams_at_work()[users.persona[user]]
    day = (hour + (window.start // 3600) % 24) // 24
    at_work = np.where(roams, users.outings[user, roaming], users.work[user])
    return np.select(
        [state == personas.WORK, state == personas.COMMUTE, state == personas.OUT],
        [at_work, users.commute[user, (clock >= 12).astype(int)],
         users.outings[user, outing_of_day[user, day]]],
        default=users.home[user])


def _categories(world: World, users: Population, user: np.ndarray, state: np.ndarray,
                clock: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N] category of each record, drawn in batches so memory stays [batch, C]."""
    mix = world.category_mix.reshape(-1, personas.NUM_CATEGORIES).astype(np.float32)  # [P*S*24, C]
    taste = users.taste.astype(np.float32)
    row = (users.persona[user] * personas.NUM_STATES + state) * 24 + clock  # [N] row of mix
    out = np.empty(len(user), dtype=np.int64)
    for lo in range(0, len(user), _CATEGORY_BATCH):
        hi = min(lo + _CATEGORY_BATCH, len(user))
        cdf = np.cumsum(mix[row[lo:hi]] * taste[user[lo:hi]], axis=1)  # [batch, C], unnormalized
        uniform = rng.random(hi - lo, dtype=np.float32) * cdf[:, -1]
        out[lo:hi] = _draw_rows(cdf, uniform)
    return out


def _draw_rows(cdf: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Index drawn from each row of a [n, k] CDF by inverse transform."""
    return np.minimum((cdf < uniform[:, None]).sum(axis=1), cdf.shape[1] - 1)


@dataclass(frozen=True)
class _AppChanges:
    """Installs or uninstalls: one per (user, app) key = user * num_apps + app, keys sorted."""
    key: np.ndarray
    ts: np.ndarray
    place: np.ndarray
    traffic: np.ndarray  # -1: unknown

    def records(self, num_apps: int, event: int) -> dict:
        return dict(user=self.key // num_apps, ts=self.ts, app=self.key % num_apps,
                    place=self.place, traffic=self.traffic,
                    event=np.full(len(self.key), event))


def _install_and_uninstall(world: World, window: Window, users: Population, records: dict,
                           rng: np.random.Generator) -> dict:
    """Adds install/uninstall records; drops uses before an install and after an uninstall."""
    num_apps = len(world.catalog.app_ids)
    key = np.where(records["app"] >= 0, records["user"] * num_apps + records["app"], -1)
    pick = _use_picker(records, len(users.persona), rng)
    installs = _installs(window, users, records, key, pick, rng)
    removals = _uninstalls(window, records, key, installs, pick, rng)
    keep = (key < 0) | ((records["ts"] >= _lookup(installs.key, installs.ts, key, _EARLIEST))
                        & (records["ts"] < _lookup(removals.key, removals.ts, key, _LATEST)))
    added = [installs.records(num_apps, INSTALL), removals.records(num_apps, UNINSTALL)]
    return {k: np.concatenate([v[keep]] + [a[k] for a in added]) for k, v in records.items()}


def _use_picker(records: dict, num_users: int, rng: np.random.Generator):
    """pick(mean): random use records, about mean (a number or [U]) for each user with any."""
    uses = np.flatnonzero(records["app"] >= 0)  # grouped by user, as records come in user order
    per_user = np.bincount(records["user"][uses], minlength=num_users)
    first_use = np.concatenate([[0], np.cumsum(per_user)[:-1]])

    def pick(mean: np.ndarray) -> np.ndarray:
        who = np.repeat(np.arange(num_users),
                        rng.poisson(np.broadcast_to(mean, num_users)) * (per_user > 0))
        return uses[first_use[who] + (rng.random(len(who)) * per_user[who]).astype(np.int64)]

    return pick


def _installs(window: Window, users: Population, records: dict, key: np.ndarray, pick,
              rng: np.random.Generator) -> _AppChanges:
    """Apps installed in the window, each some minutes before a use of it (its anchor)."""
    anchor = pick(np.array([t.installs for t in TIERS])[users.tier])
    unique_key, first = np.unique(key[anchor], return_index=True)
    anchor = anchor[first]
    ts = np.maximum(records["ts"][anchor] - rng.integers(60, 1800, size=len(anchor)),
                    window.start)
    size = np.exp(rng.normal(np.log(INSTALL_MEDIAN_BYTES), 0.8, size=len(anchor)))
    return _AppChanges(unique_key, ts, records["place"][anchor], size.astype(np.int64))


def _uninstalls(window: Window, records: dict, key: np.ndarray, installs: _AppChanges, pick,
                rng: np.random.Generator) -> _AppChanges:
    """Some new apps tried and removed again, some older apps removed after a last use."""
    trial = rng.random(len(installs.key)) < TRIAL_UNINSTALL_CHANCE
    # an install precedes its anchor use by under 30 minutes, so a tried app is used once
    trial_ts = (installs.ts[trial] + 1800
                + rng.exponential(3 * 86400, size=trial.sum()).astype(np.int64))
    older = pick(UNINSTALLS_PER_USER)
    older = older[~np.isin(key[older], installs.key)]
    removal_key = np.concatenate([installs.key[trial], key[older]])
    ts = np.concatenate([trial_ts, records["ts"][older] + rng.integers(60, 1800, size=len(older))])
    place = np.concatenate([installs.place[trial], records["place"][older]])
    inside = ts < window.start + window.hours * 3600
    removal_key, first = np.unique(removal_key[inside], return_index=True)
    return _AppChanges(removal_key, ts[inside][first], place[inside][first],
                       np.full(len(removal_key), -1))


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, missing: int) -> np.ndarray:
    """values[keys == query] per query (keys sorted and unique), `missing` where absent."""
    if len(keys) == 0:
        return np.full(len(query), missing)
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[at] == query, values[at], missing)


def _duplicate(records: dict, rng: np.random.Generator) -> dict:
    again = np.flatnonzero(rng.random(len(records["user"])) < DUPLICATE_SHARE)
    return {k: np.concatenate([v, v[again]]) for k, v in records.items()}


def _table(world: World, users: Population, records: dict) -> pa.Table:
    """Numbers to ids; -1 marks a null."""
    app, place, traffic, event = (records[k] for k in ("app", "place", "traffic", "event"))
    return pa.table([
        pa.array(users.user_ids[records["user"]], pa.int64()),
        pa.array(records["ts"] * 1000, pa.timestamp("ms", tz="UTC")),
        pa.array(world.catalog.app_ids[np.maximum(app, 0)], pa.int64(), mask=app < 0),
        pa.array(world.city.loc_ids[np.maximum(place, 0)], pa.int64(), mask=place < 0),
        pa.array(traffic, pa.int64(), mask=traffic < 0),
        pa.DictionaryArray.from_arrays(pa.array(event.astype(np.int8), mask=event < 0),
                                       pa.array(EVENT_VALUES)),
    ], schema=EVENTS_SCHEMA)
