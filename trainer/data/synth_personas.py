"""The latent personas behind the synthetic users: daily routines and app-category tastes.

A persona fixes two things. Its routine says, for each hour of a workday and of a free day,
whether its users sleep, stay home, commute, work or may go out. Its taste weights the 20 app
categories; the place and the hour of day re-weight them (news on the morning commute, office
apps at work, video and games in the evening at home). These tables are small constants, the
same for every seed: the seed only changes which users get which persona and how each user
deviates from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CATEGORY_NAMES = (
    "social", "messaging", "news", "video", "games", "music", "office", "email", "maps",
    "shopping", "finance", "food", "travel", "fitness", "education", "photo", "tools",
    "reading", "weather", "lifestyle",
)
NUM_CATEGORIES = len(CATEGORY_NAMES)
_CATEGORY = {name: i for i, name in enumerate(CATEGORY_NAMES)}

# states of a user in one hour; MAYBE_OUT appears only in routines and resolves to OUT or HOME
SLEEP, HOME, COMMUTE, WORK, OUT, MAYBE_OUT = range(6)
NUM_STATES = 5

# relative events per hour in each state (SLEEP > 0: night-time notifications get answered)
STATE_ACTIVITY = np.array([0.03, 1.0, 1.6, 0.6, 0.8])

# how each state re-weights categories; unnamed categories keep weight 1
_STATE_AFFINITY = {
    SLEEP: {"messaging": 2.0, "tools": 2.0, "social": 1.2},
    HOME: {"video": 2.0, "games": 1.5, "shopping": 1.3, "food": 1.5, "reading": 1.3},
    COMMUTE: {"news": 3.0, "music": 3.0, "maps": 2.0, "reading": 1.5, "social": 1.3,
              "video": 0.7, "office": 0.5},
    WORK: {"office": 5.0, "email": 4.0, "messaging": 1.5, "finance": 1.2, "games": 0.2,
           "video": 0.3, "shopping": 0.6},
    OUT: {"maps": 3.0, "photo": 3.0, "food": 2.0, "shopping": 2.0, "travel": 1.5, "social": 1.3,
          "office": 0.3},
}

# how the hour of day re-weights categories, as (first hour, last hour + 1, weights)
_HOUR_AFFINITY = (
    (6, 10, {"news": 2.5, "weather": 3.0, "email": 1.5}),
    (12, 14, {"food": 2.0, "social": 1.3}),
    (19, 24, {"video": 2.0, "games": 1.7, "social": 1.3}),
    (0, 4, {"games": 1.5, "video": 1.5, "messaging": 1.3}),
)


@dataclass(frozen=True)
class Persona:
    """One latent user type: its share of users, routine and category taste."""
    name: str
    share: float
    wake: int  # hour of waking on a workday
    bed: int  # hour of falling asleep; >= 24 means after midnight
    work: tuple[int, int] | None  # [start, end) hours on workdays; None: every day is free
    roams: bool  # works at changing places (sales, delivery) instead of one office
    evening_out: tuple[int, int]  # hours a workday evening may be spent out
    free_out: tuple[int, int]  # hours a free day may be spent out
    out_chance: tuple[float, float]  # chance of going out on a workday / on a free day
    taste: dict[str, float]  # category weights; unnamed categories weigh 0.15


PERSONAS = (
    Persona("office_worker", 0.22, 7, 23, (9, 18), False, (19, 22), (11, 18), (0.25, 0.6),
            {"office": 3, "email": 3, "messaging": 3, "news": 2, "social": 2, "music": 1.5,
             "video": 1.5, "finance": 1.2}),
    Persona("student", 0.14, 8, 25, (9, 16), False, (18, 23), (13, 22), (0.4, 0.7),
            {"social": 4, "messaging": 4, "games": 4, "video": 4, "education": 3, "music": 3,
             "photo": 2}),
    Persona("night_owl", 0.08, 13, 28, None, False, (22, 24), (20, 24), (0.1, 0.3),
            {"games": 8, "video": 4, "messaging": 2, "social": 2, "music": 1.5}),
    Persona("retiree", 0.10, 6, 22, None, False, (17, 19), (9, 12), (0.2, 0.6),
            {"news": 5, "video": 4, "weather": 3, "reading": 3, "fitness": 2, "messaging": 2,
             "finance": 1}),
    Persona("field_sales", 0.08, 6, 23, (8, 19), True, (20, 22), (10, 16), (0.2, 0.4),
            {"maps": 5, "email": 4, "messaging": 4, "travel": 3, "finance": 2, "office": 2,
             "news": 2}),
    Persona("social_shopper", 0.14, 9, 24, (10, 17), False, (18, 23), (11, 20), (0.4, 0.7),
            {"social": 6, "shopping": 5, "messaging": 4, "photo": 3, "lifestyle": 3, "food": 2,
             "video": 2}),
    Persona("parent", 0.12, 6, 22, (9, 15), False, (16, 18), (10, 17), (0.5, 0.7),
            {"messaging": 3, "shopping": 3, "food": 3, "lifestyle": 3, "photo": 3,
             "education": 2, "social": 2, "news": 1.5}),
    Persona("fitness_fan", 0.12, 6, 22, (9, 17), False, (6, 8), (7, 12), (0.6, 0.8),
            {"fitness": 6, "music": 5, "maps": 3, "social": 2, "food": 1.5, "photo": 1.5}),
)
NUM_PERSONAS = len(PERSONAS)
PERSONA_SHARES = np.array([p.share for p in PERSONAS]) / sum(p.share for p in PERSONAS)


def _weights(named: dict[str, float], default: float) -> np.ndarray:
    out = np.full(NUM_CATEGORIES, default)
    for name, weight in named.items():
        out[_CATEGORY[name]] = weight
    return out


def _day(persona: Persona, workday: bool) -> np.ndarray:
    """[24] state codes of one day; free days start later and end later."""
    wake, bed = (persona.wake, persona.bed) if workday else (persona.wake + 2, persona.bed + 1)
    hours = np.arange(24)
    asleep = (hours < wake) & (hours >= bed - 24) if bed >= 24 else (hours < wake) | (hours >= bed)
    day = np.where(asleep, SLEEP, HOME)
    if workday and persona.work is not None:
        start, end = persona.work
        day[start:end] = WORK
        day[start - 1] = day[end] = COMMUTE
        out_first, out_last = persona.evening_out
    else:
        out_first, out_last = persona.free_out
    block = day[out_first:out_last]
    block[block == HOME] = MAYBE_OUT
    return day


def routines() -> np.ndarray:
    """[P, 2, 24] state codes: routine[p, 1] is persona p's workday, routine[p, 0] a free day."""
    return np.stack([np.stack([_day(p, False), _day(p, True)]) for p in PERSONAS]).astype(np.int8)


def works_on_weekdays() -> np.ndarray:
    """[P] bool: the persona has workdays (Monday to Friday)."""
    return np.array([p.work is not None for p in PERSONAS])


def roams_at_work() -> np.ndarray:
    """[P] bool: work hours are spent at changing places, not at one workplace."""
    return np.array([p.roams for p in PERSONAS])


def out_chances() -> np.ndarray:
    """[P, 2] chance of going out on a free day (column 0) and on a workday (column 1)."""
    return np.array([(p.out_chance[1], p.out_chance[0]) for p in PERSONAS])


def category_mix() -> np.ndarray:
    """[P, S, 24, C] persona taste x state affinity x hour-of-day affinity (unnormalized)."""
    taste = np.stack([_weights(p.taste, 0.15) for p in PERSONAS])  # [P, C]
    state = np.stack([_weights(_STATE_AFFINITY[s], 1.0) for s in range(NUM_STATES)])  # [S, C]
    hour = np.ones((24, NUM_CATEGORIES))
    for first, last, named in _HOUR_AFFINITY:
        hour[first:last] *= _weights(named, 1.0)
    return taste[:, None, None, :] * state[None, :, None, :] * hour[None, None, :, :]
