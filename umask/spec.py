"""The feature spec: the one description of featurized data that every stage agrees on.

featurize writes it beside the examples (`<features>/spec/`), every checkpoint carries a copy,
the model sizes itself from it, and eval, complete and the export bundle read it instead of
re-deriving anything from a run config or refitting anything on data. It imports numpy and
pyarrow only (no torch, Ray, DeepSpeed or TorchRec), so a downstream loader can use it.

A spec folder holds:
  spec.json               the settings below, the sha256 of each map file, and `digest`
  app_categories.parquet  (app_id int64, category int32 in [0, C)): the app-to-category map
  loc_regions.parquet     (loc_id int64, region int32 in [0, K], K = unknown): the
                          location-to-region map featurize used

What it fixes:
- time: slot_seconds (divides a day), slots T per window, slots per day and week, and the
  window origin (Monday 1970-01-05T00:00Z): window w of a user covers
  [origin + w*T*slot_seconds, ...) and time_of_week = ((t - origin) mod week) // slot_seconds;
- the dense layout (DenseLayout) of C categories and K regions, and what the category
  channels measure (count or bytes);
- the split rule (salt and fractions) and the shard salt;
- the id hashing rule (`stable_hash`, `table_rows`): splitmix64 (Steele, Lea, Flood,
  "Fast splittable pseudorandom number generators", OOPSLA 2014; Vigna's finalizer);
- the regions: their source (precomputed region_id, k-means centroids, or none), the
  centroids (unit vectors, for assigning new coordinates without refitting) and the rule
  for loc_ids no table lists (stable_hash(loc_id, REGION_SALT) mod K);
- the sparsity bucket edges that summary and eval report along;
- `statistics`: what featurize measured of its own examples, per split (umask/statistics.py):
  counts, sparsity buckets, per-channel mean/std/max over observed slots, id occurrences; the
  train split's are the normalisation statistics.

Versioning: FORMAT is semver. A reader accepts a spec of its own major version and refuses
another with a message naming both; a new minor version only adds keys. `digest` is the
sha256 of the canonical JSON of every setting plus the map files' digests: two features
folders with equal digests describe the same slots.
"""
from __future__ import annotations

import hashlib
import json
import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from umask.errors import UserError

FORMAT = "1.1.0"  # 1.1: `statistics` filled by featurize
SPEC_DIR = "spec"  # a spec folder's name inside a features folder, a checkpoint and a bundle
SPEC_JSON = "spec.json"
APP_CATEGORIES = "app_categories.parquet"
LOC_REGIONS = "loc_regions.parquet"
MAP_ROW_GROUP = 1 << 20  # rows per row group of loc_regions.parquet

DAY_SECONDS = 86_400
WEEK_SECONDS = 7 * DAY_SECONDS
WINDOW_ORIGIN = 345_600  # 1970-01-05T00:00:00Z, a Monday: windows and time_of_week count from it
SPARSITY_EDGES = (0.05, 0.15, 0.3, 0.5)  # observed-slot share buckets: <=5 %, <=15 %, <=30 %, <=50 %, more
SPLITS = ("train", "val", "test", "cold")
SHARD_SALT = 0x5348415244  # separates the shard hash from the split hash of the same user
REGION_SALT = 0x524547494F4E  # the hash of a loc_id no locations table lists
TIME_OF_WEEK_MAX = 32767  # time_of_week is int16 in the examples
REGION_SOURCES = ("region_id", "kmeans", "none")

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
ID_HASH = ("splitmix64: rows = (mix64(uint64(id) + 0x9E3779B97F4A7C15) >> 1) mod num_rows; "
           "salted: mix64(uint64(v) + 0x9E3779B97F4A7C15 * (salt + 1))")

# the spec keys a run config also names (data.<key>), which training must agree with
CONFIG_KEYS = ("slot_seconds", "slots", "num_categories", "num_regions", "category_value",
               "split_salt", "val_fraction", "test_fraction", "cold_fraction")


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: [n] uint64 -> [n] uint64, the same on every machine."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stable_hash(values: np.ndarray, salt: int) -> np.ndarray:
    """[n] int64 -> [n] uint64: mix64 of the values offset by golden * (salt + 1) (wrapping)."""
    offset = np.uint64((_GOLDEN * (salt + 1)) & _MASK64)
    with np.errstate(over="ignore"):
        return mix64(np.asarray(values).astype(np.int64, copy=False).view(np.uint64) + offset)


def table_rows(ids: np.ndarray, num_rows: int) -> np.ndarray:
    """Embedding-table rows [n] int64 in [0, num_rows) of raw ids [n] int64 of any value.

    The top 63 bits of stable_hash(id, salt 0) mod num_rows: the first output of a
    splitmix64 generator seeded with the id.
    """
    return ((stable_hash(ids, 0) >> np.uint64(1)) % np.uint64(num_rows)).astype(np.int64)


def bucket_labels(edges: tuple[float, ...] = SPARSITY_EDGES) -> list[str]:
    """Names of the sparsity buckets of `edges`: "[0, e0]", "(e0, e1]", ..., "(e_last, 1]"."""
    bounds = (0.0, *edges, 1.0)
    return [f"({lo:g}, {hi:g}]" if i else f"[{lo:g}, {hi:g}]" for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]


def sparsity_bucket(observed_share: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Bucket index [n] of observed-slot shares [n] in [0, 1]: 0 for share <= edges[0], ...,
    len(edges) above the last edge (a share equal to an edge belongs to the lower bucket)."""
    return np.searchsorted(np.asarray(edges), observed_share, side="left")


def time_problems(slot_seconds: int, slots: int) -> list[tuple[str, str]]:
    """What the time grid (slot length in seconds, slots per window) cannot be; (key, message)."""
    out = []
    if slot_seconds <= 0 or DAY_SECONDS % slot_seconds:
        out.append(("slot_seconds", "must divide a day (86400 s): e.g. 900, 1800, 3600, 7200"))
    elif WEEK_SECONDS // slot_seconds > TIME_OF_WEEK_MAX:
        out.append(("slot_seconds", "a week would have more slots than time_of_week (int16) can "
                                    "number; use slots of 19 s or more"))
    if slots <= 0:
        out.append(("slots", "must be positive"))
    return out


class DenseLayout:
    """Where each channel family sits in an example's F dense channels per slot.

    [0, C]        app-category usage, log1p(count or bytes); index C = unknown category
    [C+1, C+K+1]  share of the slot's location records per region; index C+1+K = unknown
    C+K+2         activity: log1p(number of events in the slot)
    C+K+3         volume: log1p(traffic bytes in the slot)
    """

    def __init__(self, num_categories: int, num_regions: int):
        self.num_categories = num_categories
        self.num_regions = num_regions
        self.category = slice(0, num_categories + 1)
        self.region = slice(num_categories + 1, num_categories + num_regions + 2)
        self.activity = num_categories + num_regions + 2
        self.volume = num_categories + num_regions + 3
        self.num_channels = num_categories + num_regions + 4

    def channel_names(self) -> list[str]:
        """The F channel names in order: category_0 .. category_{C-1}, category_unknown,
        region_0 .. region_{K-1}, region_unknown, activity, volume."""
        return ([f"category_{c}" for c in range(self.num_categories)] + ["category_unknown"]
                + [f"region_{k}" for k in range(self.num_regions)] + ["region_unknown", "activity", "volume"])

    def as_dict(self) -> dict:
        return {"channels": self.num_channels,
                "category": [self.category.start, self.category.stop],
                "unknown_category": self.num_categories,
                "region": [self.region.start, self.region.stop],
                "unknown_region": self.region.stop - 1,
                "activity": self.activity, "volume": self.volume}


@dataclass(frozen=True)
class FeatureSpec:
    """The settings of a spec folder's spec.json (module docstring); maps are in FeatureMaps."""

    slot_seconds: int
    slots: int  # T, slots per example window
    num_categories: int  # C
    num_regions: int  # K
    category_value: str = "count"  # count | bytes: what the category channels measure
    split_salt: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    cold_fraction: float = 0.05
    window_origin: int = WINDOW_ORIGIN
    shard_salt: int = SHARD_SALT
    region_salt: int = REGION_SALT
    region_source: str = "none"  # region_id | kmeans | none
    region_centroids: tuple[tuple[float, float, float], ...] = ()  # [K][3] unit-sphere k-means centroids
    sparsity_edges: tuple[float, ...] = SPARSITY_EDGES
    statistics: dict = field(default_factory=dict)  # per split, umask/statistics.py; {} before 1.1
    files: dict = field(default_factory=dict)  # map file name -> sha256
    format: str = FORMAT

    def __post_init__(self):
        problems = time_problems(self.slot_seconds, self.slots)
        if self.region_source not in REGION_SOURCES:
            problems.append(("region_source", f"must be one of {REGION_SOURCES}"))
        if self.region_centroids and len(self.region_centroids) != self.num_regions:
            problems.append(("region_centroids", f"{len(self.region_centroids)} centroids for "
                                                 f"{self.num_regions} regions"))
        if problems:
            raise UserError("feature spec: " + "; ".join(f"{k}: {m}" for k, m in problems))

    @property
    def slots_per_day(self) -> int:
        return DAY_SECONDS // self.slot_seconds

    @property
    def slots_per_week(self) -> int:
        """The range of time_of_week: it is in [0, slots_per_week)."""
        return WEEK_SECONDS // self.slot_seconds

    @property
    def window_seconds(self) -> int:
        return self.slots * self.slot_seconds

    @property
    def layout(self) -> DenseLayout:
        return DenseLayout(self.num_categories, self.num_regions)

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of every setting, map digests included."""
        return hashlib.sha256(_canonical(self._settings()).encode()).hexdigest()

    def time_of_week(self, slot_start: np.ndarray) -> np.ndarray:
        """Slot of the week [..] int16 (0 = Monday 00:00 UTC) of slot starts in epoch seconds."""
        return (((slot_start - self.window_origin) % WEEK_SECONDS) // self.slot_seconds).astype(np.int16)

    def mismatches(self, settings: dict) -> list[str]:
        """`key (spec value vs given value)` for each CONFIG_KEYS entry of `settings` that differs."""
        return [f"{key} ({getattr(self, key)!r} in the features, {settings[key]!r} in the config)"
                for key in CONFIG_KEYS if key in settings and settings[key] != getattr(self, key)]

    def to_json(self) -> dict:
        """spec.json's content: the settings, derived facts for readers, and the digest."""
        return {**self._settings(), "slots_per_day": self.slots_per_day,
                "slots_per_week": self.slots_per_week, "dense_layout": self.layout.as_dict(),
                "id_hash": ID_HASH, "digest": self.digest}

    @classmethod
    def from_json(cls, data: dict, where: str) -> FeatureSpec:
        """The spec of a parsed spec.json; `where` names the file in errors."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object")
        version = str(data.get("format", ""))
        if version.split(".")[0] != FORMAT.split(".")[0]:
            raise UserError(f"{where}: feature spec format {version or 'missing'}; this version "
                            f"reads format {FORMAT.split('.')[0]}.x (re-run `u-mask data featurize`)")
        names = {f.name for f in fields(cls)}
        # the fields without a default: slot_seconds, slots, num_categories, num_regions
        missing = [f.name for f in fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise UserError(f"{where}: missing keys {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in names}
        values["region_centroids"] = tuple(tuple(c) for c in values.get("region_centroids", ()))
        values["sparsity_edges"] = tuple(values.get("sparsity_edges", SPARSITY_EDGES))
        spec = cls(**values)
        if "digest" in data and data["digest"] != spec.digest:
            raise UserError(f"{where}: digest does not match its settings; the file was edited")
        return spec

    def _settings(self) -> dict:
        settings = asdict(self)
        settings["region_centroids"] = [list(c) for c in self.region_centroids]
        settings["sparsity_edges"] = list(self.sparsity_edges)
        return settings


@dataclass(frozen=True)
class FeatureMaps:
    """The spec's lookups: app -> category and loc -> region, sorted by id; picklable."""

    app_ids: np.ndarray  # [A] int64, sorted, unique
    categories: np.ndarray  # [A] int32 in [0, C)
    loc_ids: np.ndarray  # [L] int64, sorted, unique
    regions: np.ndarray  # [L] int32 in [0, K] (K = listed without a usable region)

    @staticmethod
    def empty() -> FeatureMaps:
        return FeatureMaps(np.empty(0, np.int64), np.empty(0, np.int32),
                           np.empty(0, np.int64), np.empty(0, np.int32))

    def category(self, app_ids: np.ndarray, spec: FeatureSpec) -> np.ndarray:
        """Category [n] int64 of raw app ids: the map's, or C (unknown) for unlisted apps."""
        found, pos = _find(self.app_ids, app_ids)
        return np.where(found, self.categories[pos] if len(pos) else 0, spec.num_categories).astype(np.int64)

    def region(self, loc_ids: np.ndarray, spec: FeatureSpec) -> np.ndarray:
        """Region [n] int64 in [0, K] of raw loc ids: the map's; an unlisted loc_id goes to
        stable_hash(loc_id, region_salt) mod K, so the same place always lands in the same region."""
        found, pos = _find(self.loc_ids, loc_ids)
        hashed = (stable_hash(loc_ids, spec.region_salt) % np.uint64(spec.num_regions)).astype(np.int64)
        return np.where(found, self.regions[pos] if len(pos) else 0, hashed).astype(np.int64)


def unit_vectors(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Points [N, 3] on the unit sphere of (lat, lon) [N] in degrees."""
    lat_r, lon_r = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(lat_r) * np.cos(lon_r), np.cos(lat_r) * np.sin(lon_r), np.sin(lat_r)], axis=1)


def nearest_centroid(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index [N] int32 of the nearest of centroids [K, 3] to each of points [N, 3] (unit_vectors).

    Squared Euclidean distance in 3-d, the metric the k-means fit minimises, so that
    clusters do not break at the antimeridian.
    """
    out = np.empty(len(points), np.int32)
    norms = (centroids ** 2).sum(axis=1)  # [K]
    chunk = max(1, (1 << 22) // max(len(centroids), 1))  # [chunk, K] distances at a time: 32 MB a temporary
    for start in range(0, len(points), chunk):
        block = points[start:start + chunk]
        # |p - c|^2 without |p|^2, which does not change the argmin; the dot products summed
        # dimension by dimension, not by a matmul, whose rounding can depend on the block's size:
        # featurize assigns a place in blocks of any size and must get the same region
        dots = sum(block[:, d, None] * centroids[None, :, d] for d in range(points.shape[1]))
        out[start:start + chunk] = np.argmin(norms - 2.0 * dots, axis=1)
    return out


def save_spec(folder: str | Path, spec: FeatureSpec, maps: FeatureMaps) -> FeatureSpec:
    """Writes the spec folder (maps first, spec.json last); returns the spec with file digests."""
    files = write_maps(folder, maps.app_ids, maps.categories, [(maps.loc_ids, maps.regions)])
    spec = dataclasses.replace(spec, files=files)
    save_spec_json(folder, spec)
    return spec


def write_maps(folder: str | Path, app_ids: np.ndarray, categories: np.ndarray,
               loc_chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, str]:
    """Writes the map files of a spec folder; returns {file name: sha256}. The location map
    comes in chunks of (loc_ids, regions) whose concatenation is sorted (featurize on Ray
    streams it range by range) and is written in row groups of MAP_ROW_GROUP rows whatever
    the chunks, so the same map gives the same bytes however it was chunked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"app_id": pa.array(app_ids, pa.int64()),
                             "category": pa.array(categories, pa.int32())}), folder / APP_CATEGORIES)
    schema = pa.schema([("loc_id", pa.int64()), ("region", pa.int32())])
    with pq.ParquetWriter(folder / LOC_REGIONS, schema) as writer:
        held: list[pa.Table] = []
        for loc_ids, regions in loc_chunks:
            held.append(pa.Table.from_arrays([pa.array(loc_ids, pa.int64()), pa.array(regions, pa.int32())],
                                             schema=schema))
            table = pa.concat_tables(held)
            full = len(table) // MAP_ROW_GROUP * MAP_ROW_GROUP
            if full:
                writer.write_table(table.slice(0, full), row_group_size=MAP_ROW_GROUP)
            held = [table.slice(full)]
        if held and len(held[0]):
            writer.write_table(held[0], row_group_size=MAP_ROW_GROUP)
    return {name: file_sha256(folder / name) for name in (APP_CATEGORIES, LOC_REGIONS)}


def save_spec_json(folder: str | Path, spec: FeatureSpec) -> None:
    """Writes (atomically) spec.json alone, for a folder that already holds the map files of
    spec.files: featurize copies the maps its tasks used and adds the statistics last."""
    folder = Path(folder)
    tmp = folder / (SPEC_JSON + ".tmp")
    tmp.write_text(json.dumps(spec.to_json(), indent=1) + "\n")
    tmp.replace(folder / SPEC_JSON)


def load_spec(folder: str | Path) -> FeatureSpec:
    """The spec of a spec folder; a UserError naming the file when it is missing or invalid."""
    path = Path(folder) / SPEC_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; features made before the feature spec existed must be "
                        "featurized again (`u-mask data featurize`)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read it as JSON ({err})") from None
    return FeatureSpec.from_json(data, str(path))


def load_maps(folder: str | Path, spec: FeatureSpec) -> FeatureMaps:
    """The app and location maps of a spec folder, after their sha256 match spec.files."""
    folder = Path(folder)
    for name, digest in spec.files.items():
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: missing from the feature spec folder")
        if file_sha256(folder / name) != digest:
            raise UserError(f"{folder / name}: checksum does not match {SPEC_JSON}; the file was modified")
    apps = pq.read_table(folder / APP_CATEGORIES)
    locs = pq.read_table(folder / LOC_REGIONS)
    return FeatureMaps(apps.column("app_id").to_numpy(), apps.column("category").to_numpy(),
                       locs.column("loc_id").to_numpy(), locs.column("region").to_numpy())


def _find(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found [n] bool, position [n]) of ids in sorted_ids."""
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), bool), np.zeros(0, np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids, pos


def _canonical(data: dict) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (hashlib.file_digest)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
