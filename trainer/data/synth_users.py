"""Synthetic users: persona, activity tier, personal places, personal apps and profile vector.

A user is a latent vector near their persona's centre; the offset shifts their category tastes
(so two office workers differ, consistently over time) and, through a fixed noisy projection,
their profile_vec. Activity tiers spread users from dense (hundreds of events a week) to a
handful of records, plus cold-start users who appear only in the last days of the window.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from trainer.data import synth_personas as personas
from trainer.data.synth_city import LEISURE, OFFICE, RESIDENTIAL, TRANSIT, City
from trainer.data.synth_world import PROFILE_DIM, USER_IDS, World, sparse_ids


@dataclass(frozen=True)
class Tier:
    name: str
    share: float
    events: tuple[float, float]  # log-uniform range of expected events per week (or per window)
    per_window: bool  # events counts the whole window, not a week
    installs: float  # mean number of apps installed during the window


TIERS = (
    Tier("dense", 0.10, (150, 600), False, 1.5),
    Tier("regular", 0.35, (20, 150), False, 0.8),
    Tier("sparse", 0.30, (3, 20), False, 0.2),
    Tier("rare", 0.15, (2, 8), True, 0.05),
    Tier("cold_start", 0.10, (30, 200), False, 2.0),
)
TIER_NAMES = tuple(t.name for t in TIERS)
COLD_START = TIER_NAMES.index("cold_start")
_TIER_SHARES = np.array([t.share for t in TIERS])

APPS_PER_CATEGORY = 4  # K, the apps a user reaches for within one category
OUTINGS = 3  # favourite places for going out, picked with falling frequency
OUTING_PREFERENCE = np.array([0.6, 0.3, 0.1])
PROFILE_COVERAGE = 0.9  # share of users the data owner has a profile for
_COMMUTE_CANDIDATES = 256  # transit cells tried per chunk when routing commutes


@dataclass(frozen=True)
class Population:
    """Per-user arrays for one chunk of U users."""
    user_ids: np.ndarray  # [U] int64
    persona: np.ndarray  # [U] int
    tier: np.ndarray  # [U] int
    clock_shift: np.ndarray  # [U] hours the user's day runs late (+) or early (-)
    first_hour: np.ndarray  # [U] first hour of the window the user is active in
    expected_events: np.ndarray  # [U] expected use records over the active part of the window
    taste: np.ndarray  # [U, C] multiplicative taste offsets
    home: np.ndarray  # [U] place numbers
    work: np.ndarray  # [U]
    outings: np.ndarray  # [U, OUTINGS]
    commute: np.ndarray  # [U, 2] cells passed on the way to work and on the way home
    app_sets: np.ndarray  # [U, C, K] app numbers
    app_set_cdf: np.ndarray  # [U, C, K] cumulative preference among the K apps
    profile: np.ndarray  # [U, PROFILE_DIM] float32
    has_profile: np.ndarray  # [U] bool

    def profiles_table(self) -> pa.Table:
        """profiles.parquet rows for the users the data owner has a profile for."""
        keep = np.flatnonzero(self.has_profile)
        values = pa.array(self.profile[keep].ravel(), pa.float32())
        return pa.table({"user_id": pa.array(self.user_ids[keep], pa.int64()),
                         "profile_vec": pa.FixedSizeListArray.from_arrays(values, PROFILE_DIM)})


def make_population(world: World, rng: np.random.Generator, first_user: int, n: int,
                    hours: int) -> Population:
    """n users numbered from first_user, active within a window of `hours` hours."""
    persona = rng.choice(personas.NUM_PERSONAS, size=n, p=personas.PERSONA_SHARES)
    tier = rng.choice(len(TIERS), size=n, p=_TIER_SHARES)
    offset = rng.normal(0.0, 0.6, size=(n, world.persona_centres.shape[1]))
    taste = np.exp(offset @ world.taste_loadings.T
                   + rng.normal(0.0, 0.7, size=(n, personas.NUM_CATEGORIES)))
    first_hour, expected = _activity(rng, tier, hours)
    home, work, outings, commute = _places(rng, world.city, n)
    app_sets, app_set_cdf = _app_sets(rng, world, n)
    latent = world.persona_centres[persona] + offset  # [U, LATENT_DIM]
    activity = (np.log(expected * 168 / np.maximum(hours - first_hour, 1)) - np.log(30)) / 1.5
    profile = (np.concatenate([latent, activity[:, None]], axis=1) @ world.profile_projection.T
               + rng.normal(0.0, 1.5, size=(n, PROFILE_DIM)))
    return Population(
        user_ids=sparse_ids(world.seed, USER_IDS, np.arange(first_user, first_user + n)),
        persona=persona, tier=tier, clock_shift=rng.integers(-1, 2, size=n),
        first_hour=first_hour, expected_events=expected, taste=taste,
        home=home, work=work, outings=outings, commute=commute,
        app_sets=app_sets, app_set_cdf=app_set_cdf,
        profile=profile.astype(np.float32), has_profile=rng.random(n) < PROFILE_COVERAGE)


def cold_start_days(days: int) -> int:
    """Cold-start users appear within this many final days of the window."""
    return max(1, round(days / 7))


def _activity(rng: np.random.Generator, tier: np.ndarray, hours: int):
    """First active hour and expected number of use records, per user."""
    days = hours // 24
    cold = tier == COLD_START
    cold_days = cold_start_days(days)
    first_day = days - cold_days + rng.integers(0, cold_days, size=len(tier))
    first_hour = np.where(cold, first_day * 24 + rng.integers(0, 24, size=len(tier)), 0)
    low = np.array([TIERS[t].events[0] for t in range(len(TIERS))])[tier]
    high = np.array([TIERS[t].events[1] for t in range(len(TIERS))])[tier]
    per_window = np.array([t.per_window for t in TIERS])[tier]
    rate = np.exp(rng.uniform(np.log(low), np.log(high)))
    expected = np.where(per_window, rate, rate * (hours - first_hour) / 168)
    return first_hour, expected


def _places(rng: np.random.Generator, city: City, n: int):
    """Home, work, favourite outings and the two commute cells of each user."""
    home = _popular_places(rng, city, RESIDENTIAL, n)
    work = _popular_places(rng, city, OFFICE, n)
    outings = _popular_places(rng, city, LEISURE, n * OUTINGS).reshape(n, OUTINGS)
    transit = city.places_of(TRANSIT)
    candidates = rng.choice(transit, size=min(_COMMUTE_CANDIDATES, len(transit)), replace=False)
    start = np.stack([city.lat[home], city.lon[home]], axis=1)  # [U, 2]
    end = np.stack([city.lat[work], city.lon[work]], axis=1)
    cells = np.stack([city.lat[candidates], city.lon[candidates]], axis=1)  # [M, 2]
    commute = np.empty((n, 2), dtype=np.int64)
    for leg, along in enumerate((1 / 3, 2 / 3)):
        point = start + (end - start) * along
        gap = (point[:, None, :] - cells[None, :, :]) * np.array([1.0, 0.62])  # [U, M, 2]
        commute[:, leg] = candidates[np.argmin((gap ** 2).sum(axis=2), axis=1)]
    return home, work, outings, commute


def _popular_places(rng: np.random.Generator, city: City, land_use: int, n: int) -> np.ndarray:
    places = city.places_of(land_use)
    cdf = np.cumsum(city.popularity[places])
    picks = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    return places[np.minimum(picks, len(places) - 1)]


def _app_sets(rng: np.random.Generator, world: World, n: int):
    """[U, C, K] apps drawn by popularity in every category, and each user's preference CDF."""
    shape = (n, personas.NUM_CATEGORIES, APPS_PER_CATEGORY)
    categories = np.broadcast_to(np.arange(personas.NUM_CATEGORIES)[None, :, None], shape)
    apps = world.catalog.draw(categories, rng.random(shape))
    preference = rng.gamma(0.7, size=shape)
    cdf = np.cumsum(preference, axis=2) / preference.sum(axis=2, keepdims=True)
    cdf[..., -1] = 1.0
    return apps, cdf
