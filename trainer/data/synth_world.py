"""Everything users share in a synthetic dataset: the app catalog, the city, persona tables.

The world is a pure function of (seed, number of apps, number of places), so every chunk of
users, in any process, rebuilds the same world from those three numbers. Ids are sparse:
user, app and place numbers go through a 64-bit mixing function into [0, 2^63), as hashed ids
in real exports do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.data import synth_personas as personas
from umask.spec import mix64
from trainer.data.synth_apps import AppCatalog, make_catalog
from trainer.data.synth_city import City, make_city

LATENT_DIM = 8  # dimension of a user's latent persona vector
PROFILE_DIM = 16  # width of profile_vec in profiles.parquet

# salts that keep the three id spaces (and the RNG streams) apart
USER_IDS, APP_IDS, LOC_IDS = 1, 2, 3
WORLD_STREAM, CHUNK_STREAM = 0, 1


def sparse_ids(seed: int, kind: int, numbers: np.ndarray) -> np.ndarray:
    """[n] int64 ids in [0, 2^63): splitmix64 of (seed, kind, number), top bit dropped."""
    x = np.asarray(numbers, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15
                                                           + kind * 0xD1B54A32D192ED03) % 2**64)
    return (mix64(x) >> np.uint64(1)).astype(np.int64)


@dataclass(frozen=True)
class World:
    seed: int
    catalog: AppCatalog
    city: City
    routines: np.ndarray  # [P, 2, 24] state codes (free day, workday)
    category_mix: np.ndarray  # [P, S, 24, C]
    persona_centres: np.ndarray  # [P, LATENT_DIM]
    taste_loadings: np.ndarray  # [C, LATENT_DIM]: how a user's latent offset shifts tastes
    profile_projection: np.ndarray  # [PROFILE_DIM, LATENT_DIM + 1]


def make_world(seed: int, num_apps: int, num_locations: int) -> World:
    rng = np.random.default_rng([seed, WORLD_STREAM])
    catalog = make_catalog(rng, sparse_ids(seed, APP_IDS, np.arange(num_apps)))
    city = make_city(rng, sparse_ids(seed, LOC_IDS, np.arange(num_locations)))
    return World(
        seed=seed,
        catalog=catalog,
        city=city,
        routines=personas.routines(),
        category_mix=personas.category_mix(),
        persona_centres=rng.normal(0.0, 1.5, size=(personas.NUM_PERSONAS, LATENT_DIM)),
        taste_loadings=rng.normal(0.0, 0.5, size=(personas.NUM_CATEGORIES, LATENT_DIM)),
        profile_projection=rng.normal(0.0, LATENT_DIM ** -0.5,
                                      size=(PROFILE_DIM, LATENT_DIM + 1)),
    )
