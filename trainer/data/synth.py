"""`u-mask data synth`: writes a realistic synthetic dataset in the data contract.

Output (docs/data-contract.md): `events/part-NNNNN.parquet` (one file per chunk of users),
`apps.parquet`, `locations.parquet` (lat/lon without region_id, so the pipeline's clustering
runs) and `profiles.parquet`. Users are generated in chunks of CHUNK_USERS; chunk i draws from
its own RNG stream seeded by (seed, i), so chunks are independent (they run in parallel with
--workers), the output is the same for a seed whatever the number of workers, and memory
depends on the chunk size, not on the number of users.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.data.synth_events import Window, chunk_events
from trainer.data.synth_personas import NUM_CATEGORIES
from trainer.data.synth_users import make_population
from trainer.data.synth_world import CHUNK_STREAM, PROFILE_DIM, World, make_world
from umask.errors import UserError

CHUNK_USERS = 5000
DEFAULT_START = "2026-11-02"  # a Monday
TABLES = ("apps.parquet", "locations.parquet", "profiles.parquet")
EVENTS_DIR = "events"


@dataclass(frozen=True)
class SynthSummary:
    users: int
    events: int
    files: int
    seconds: float

    def line(self, out: Path) -> str:
        return (f"synth: {self.users} users, {self.events} events, {self.files} files "
                f"in {self.seconds:.1f} s -> {out}")


def synthesize(out: str | Path, users: int, days: int = 28, seed: int = 0, apps: int = 2000,
               locations: int = 500, start: str | datetime = DEFAULT_START,
               workers: int = 1, chunk_users: int = CHUNK_USERS,
               on_progress: Callable[[int, int], None] | None = None) -> SynthSummary:
    """Writes the dataset to `out`; the same arguments give the same Parquet content.

    chunk_users is part of the dataset's definition (it fixes the RNG streams); workers is not.
    on_progress(users written, users) after each chunk of chunk_users users.
    """
    began = time.perf_counter()
    _check_sizes(users=users, days=days, apps=apps, locations=locations, seed=seed,
                 workers=workers, chunk_users=chunk_users)
    out = Path(out)
    window = Window(_start_seconds(start), days)
    _prepare(out)
    world = _world(seed, apps, locations)
    _write(world.catalog.table(), out / "apps.parquet")
    _write(world.city.table(), out / "locations.parquet")
    chunks = [(i, first, min(chunk_users, users - first))
              for i, first in enumerate(range(0, users, chunk_users))]
    tasks = [(out, seed, apps, locations, window, *chunk) for chunk in chunks]
    profiles_path = out / "profiles.parquet"
    events = 0
    with _chunk_map(workers) as run, _atomic_writer(profiles_path, _profiles_schema()) as profiles:
        for done, (count, profile_rows) in enumerate(run(_write_chunk, tasks), 1):
            events += count
            profiles.write_table(profile_rows)
            if on_progress is not None:
                on_progress(min(done * chunk_users, users), users)
    return SynthSummary(users, events, len(chunks) + len(TABLES), time.perf_counter() - began)


def _write_chunk(task) -> tuple[int, pa.Table]:
    """Generates and writes one chunk's events; returns its record count and profile rows."""
    out, seed, apps, locations, window, index, first_user, n = task
    world = _world(seed, apps, locations)
    rng = np.random.default_rng([seed, CHUNK_STREAM, index])
    users = make_population(world, rng, first_user, n, window.hours)
    events = chunk_events(world, window, users, rng)
    _write(events, out / EVENTS_DIR / f"part-{index:05d}.parquet")
    return events.num_rows, users.profiles_table()


@functools.lru_cache(maxsize=1)
def _world(seed: int, apps: int, locations: int) -> World:
    return make_world(seed, apps, locations)


def _profiles_schema() -> pa.Schema:
    return pa.schema([pa.field("user_id", pa.int64()),
                      pa.field("profile_vec", pa.list_(pa.float32(), PROFILE_DIM))])


def _check_sizes(**values: int) -> None:
    minimum = dict(users=1, days=2, apps=NUM_CATEGORIES, locations=4, seed=0, workers=1,
                   chunk_users=1)
    for key, value in values.items():
        if value < minimum[key]:
            raise UserError(f"synth: --{key.replace('_', '-')} must be at least {minimum[key]}, "
                            f"got {value}")


def _start_seconds(start: str | datetime) -> int:
    """Epoch seconds of the window's first hour; naive times are UTC."""
    if isinstance(start, str):
        try:
            start = datetime.fromisoformat(start)
        except ValueError:
            raise UserError(f"synth: --start {start!r} is not a date (YYYY-MM-DD) "
                            "or time (YYYY-MM-DDTHH:00)") from None
    if start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    seconds = int(start.timestamp())
    if seconds % 3600:
        raise UserError(f"synth: --start {start.isoformat()} must be a whole hour")
    return seconds


def _prepare(out: Path) -> None:
    """Makes `out` ready: new, empty, or holding only an earlier synth output (replaced)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"synth: --out {out} is a file, not a directory")
    events = out / EVENTS_DIR
    ours = set(TABLES) | {EVENTS_DIR}
    foreign = [p.name for p in out.iterdir()
               if p.name not in ours and not _is_temporary(p)] if out.is_dir() else []
    if events.is_dir():
        foreign += [f"{EVENTS_DIR}/{p.name}" for p in events.iterdir()
                    if not (_is_temporary(p) or _is_part(p))]
    if foreign:
        raise UserError(f"synth: --out {out} holds files synth did not write "
                        f"({', '.join(sorted(foreign)[:5])}); choose a new or empty directory")
    if events.is_dir():
        for part in events.iterdir():
            part.unlink()
    events.mkdir(parents=True, exist_ok=True)


def _is_part(path: Path) -> bool:
    return path.is_file() and path.name.startswith("part-") and path.suffix == ".parquet"


def _is_temporary(path: Path) -> bool:
    """A file an interrupted synth left behind (see _atomic_writer)."""
    return path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp")


def _write(table: pa.Table, path: Path) -> None:
    """Writes under a hidden name first, so readers never see a half-written file."""
    with _atomic_writer(path, table.schema) as writer:
        writer.write_table(table)


@contextmanager
def _atomic_writer(path: Path, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A ParquetWriter to a hidden temporary name, renamed into place on success."""
    temporary = path.with_name(f".{path.name}.tmp")
    writer = pq.ParquetWriter(temporary, schema)
    try:
        yield writer
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(temporary, path)


@contextmanager
def _chunk_map(workers: int) -> Iterator[Callable]:
    """`map` in this process (workers=1) or over a process pool; results come back in order."""
    if workers == 1:
        yield map
        return
    # spawn, not fork: forking a process that runs pyarrow's thread pools can deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool.map
