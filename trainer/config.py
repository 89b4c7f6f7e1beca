"""The run configuration: typed sections, YAML composition, `key=value` overrides, validation.

A run's config is built from the dataclass defaults, then YAML files (each may name others
under `defaults:`, merged first, as Hydra users expect), then command-line `key=value`
overrides. Unknown keys, wrong types and impossible values fail here, before any worker
starts, with the key and the file (or command line) that set it.
"""
from __future__ import annotations

import dataclasses
import typing
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from embeddings.config import EmbeddingsConfig
from umask.config import ModelConfig
from umask.spec import CONFIG_KEYS, DenseLayout, FeatureSpec, time_problems
from umask.errors import UserError


class ConfigError(UserError):
    """A config problem, worded for the user: which key, which file, what is wrong."""


@dataclass
class DataConfig:
    """Where the data is and how featurize turns it into examples.

    The keys of umask.spec.CONFIG_KEYS (slot_seconds, slots, num_categories, num_regions,
    category_value, split_salt and the split fractions) become the feature spec that featurize
    writes; training refuses features whose spec disagrees with them. The others may change
    between featurize and train.
    """

    source: str = "data/synth"  # a contract dataset: events/ (or events.parquet), apps.parquet, ...
    features: str = "data/features"  # featurize output, read by the loader
    invalid_rows: str = "quarantine"  # strict: fail on the first invalid row; quarantine: set it aside
    slot_seconds: int = 3600  # slot length; must divide a day: 900, 1800, 3600, 7200, ...
    slots: int = 168  # T, slots per example window (168 hourly slots = one week; 336 half-hours)
    num_categories: int = 20  # C, app categories in apps.parquet (category_id in [0, C))
    num_regions: int = 32  # K, regions when locations.parquet has no region_id
    category_value: str = "count"  # count | bytes: what the app-category channels measure
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    cold_fraction: float = 0.05  # held-out users evaluated as cold-start
    split_salt: int = 0  # changes which users fall in which split
    num_shards: int = 8  # hash partitions of the featurized output
    row_group_size: int = 512  # examples per Parquet row group (the loader's unit of work)
    shuffle_window: int = 4  # row groups whose rows the loader shuffles together (memory: 2 windows per rank)
    featurize_workers: int = 2  # CPUs of the embedded Ray featurize starts (tasks at a time); a cluster's own CPUs otherwise
    # featurize's Ray tasks: input rows per read task (whole row groups), the memory each task
    # reserves (Ray's `memory` resource; it also sizes the read buffers and refuses buckets too
    # large for it), and retries of a task whose worker died
    read_task_rows: int = 8_000_000
    task_memory_mb: int = 3072
    task_retries: int = 3
    # ts outside [plausible_start, plausible_end) (UTC ISO dates or times) is an invalid row:
    # epoch-0 placeholders, sentinels like 9999-12-31, ms or ns where seconds are meant
    plausible_start: str = "2000-01-01"
    plausible_end: str = "2100-01-01"

    def plausible_range(self) -> tuple[int, int]:
        """[start, end) of a valid event ts, in epoch seconds (naive times are UTC)."""
        return _epoch_seconds(self.plausible_start), _epoch_seconds(self.plausible_end)

    def feature_spec(self) -> FeatureSpec:
        """The feature spec these settings give before any side table is read (no maps, no
        region centroids): enough to size a model. featurize adds the rest."""
        return FeatureSpec(**{key: getattr(self, key) for key in CONFIG_KEYS})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.invalid_rows not in ("strict", "quarantine"):
            out.append(("invalid_rows", "must be 'strict' or 'quarantine'"))
        if self.category_value not in ("count", "bytes"):
            out.append(("category_value", "must be 'count' or 'bytes'"))
        out += time_problems(self.slot_seconds, self.slots)
        for key in ("num_categories", "num_regions", "num_shards", "row_group_size", "featurize_workers",
                    "read_task_rows", "task_memory_mb"):
            if getattr(self, key) <= 0:
                out.append((key, "must be positive"))
        if self.task_retries < 0:
            out.append(("task_retries", "must be 0 or more"))
        try:
            start, end = self.plausible_range()
            if start >= end:
                out.append(("plausible_start", "must be before plausible_end"))
        except ValueError as err:
            out.append(("plausible_start", f"plausible_start/end must be ISO dates: {err}"))
        for key in ("val_fraction", "test_fraction", "cold_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                out.append((key, "must be in [0, 1)"))
        if self.val_fraction + self.test_fraction + self.cold_fraction >= 1.0:
            out.append(("val_fraction", "val + test + cold fractions leave no training users"))
        per_example = self.slots * DenseLayout(self.num_categories, self.num_regions).num_channels
        if self.row_group_size * per_example >= 2**31:
            out.append(("row_group_size", f"a row group would hold 2^31 or more dense values "
                                          f"({per_example} per example); lower it"))
        return out


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # examples per rank per micro-batch
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    resume: bool = True  # continue from the run's latest checkpoint when one exists
    # A step whose loss or gradients are not finite on any rank is caught before the tables or
    # the dense model step (trainer/training/guard.py). skip: no weight changes on any rank, the
    # step is counted in skipped_steps and its batch logged; stop: the run ends, naming the batch.
    nonfinite: str = "skip"
    nonfinite_patience: int = 10  # this many skipped steps in a row stop the run even under skip

    def problems(self) -> list[tuple[str, str]]:
        out = [(k, "must be positive") for k in ("steps", "batch_size", "log_every", "checkpoint_every",
                                                  "nonfinite_patience") if getattr(self, k) <= 0]
        if self.nonfinite not in ("skip", "stop"):
            out.append(("nonfinite", "must be 'skip' or 'stop'"))
        return out


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    gradient_clipping: float = 1.0
    gradient_accumulation_steps: int = 1
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or fp32 | bf16 | fp16

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.zero_stage not in (0, 1, 2, 3):
            out.append(("zero_stage", "must be 0, 1, 2 or 3"))
        if self.lr <= 0:
            out.append(("lr", "must be positive"))
        if self.gradient_accumulation_steps <= 0:
            out.append(("gradient_accumulation_steps", "must be positive"))
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            out.append(("precision", "must be auto, fp32, bf16 or fp16"))
        if self.precision == "fp16" and self.zero_stage == 0:
            # DeepSpeed 0.19 scales the loss only for its ZeRO optimizers; its fp16 optimizer
            # without ZeRO still divides the gradients by the loss scale, and never sees an overflow
            out.append(("precision", "fp16 needs deepspeed.zero_stage 1, 2 or 3 (without ZeRO, DeepSpeed "
                                     "0.19 divides unscaled gradients by the loss scale)"))
        return out


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else start an embedded Ray
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    storage_path: str = "runs"  # shared storage on a multi-node cluster
    name: str = "umask"  # run name: rerunning with the same name resumes
    # Worker-group failures (a worker killed, a node lost, a timed-out collective) survived by
    # restarting every worker from the latest checkpoint; -1: retry forever, 0: never.
    max_failures: int = 3
    # A collective (the tables' all-to-all, gradient all-reduce, a checkpoint's barriers) that
    # waits longer than this for a peer fails the step instead of hanging: a hung or dead rank
    # becomes an error, then a restart (max_failures). Must exceed the slowest checkpoint write.
    collective_timeout_s: int = 600

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.num_workers <= 0:
            out.append(("num_workers", "world size must be at least 1"))
        if self.cpus_per_worker <= 0:
            out.append(("cpus_per_worker", "must be positive"))
        if self.max_failures < -1:
            out.append(("max_failures", "must be -1 (retry forever) or >= 0"))
        if self.collective_timeout_s <= 0:
            out.append(("collective_timeout_s", "must be positive"))
        return out


@dataclass
class TrackingConfig:
    """Where rank 0 logs the training's figures besides metrics.csv (trainer/training/tracking.py)."""

    tensorboard: bool = True  # event files in the run folder: `tensorboard --logdir runs`
    mlflow_uri: Optional[str] = None  # an MLflow tracking URI (http://..., file:///...); None: no MLflow
    mlflow_experiment: str = "u-mask"  # the MLflow experiment the run is logged under


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def problems(self) -> list[tuple[str, str]]:
        """Problems that span sections (each section checks its own keys)."""
        out = []
        if self.deepspeed.precision == "fp16" and not self.ray.use_gpu:
            # DeepSpeed refuses fp16 on CPUs without AVX512-FP16/AMX-FP16 ("Type fp16 is not
            # supported on your device"), and where it accepts it, it is no faster than fp32
            out.append(("deepspeed.precision", "fp16 needs GPU workers (ray.use_gpu=true); "
                                               "on CPU workers use fp32 or bf16"))
        return out



def _epoch_seconds(iso: str) -> int:
    """Epoch seconds of an ISO date or date-time; naive ones are UTC. ValueError if not ISO."""
    moment = datetime.fromisoformat(iso)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def load_config(paths: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- each YAML (its `defaults:` first) <- `key=value` overrides; validated."""
    merged = OmegaConf.structured(RunConfig)
    sources: list[tuple[str, dict]] = []
    for path in paths:
        for name, layer in _yaml_layers(Path(path), seen=()):
            sources.append((name, layer))
            merged = _merge(merged, layer, name)
    if overrides:
        layer = _parse_overrides(overrides)
        sources.append(("the command line", layer))
        merged = _merge(merged, layer, "the command line")
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)  # resolves ${...} interpolations
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]} (set in {_origin(key, sources)})") from None
    problems = list(_problems(cfg))
    if problems:
        lines = [f"{key}: {msg} (set in {_origin(key, sources)})" for key, msg in problems]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Writes the fully resolved config, which `load_config([path])` reads back unchanged."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def _yaml_layers(path: Path, seen: tuple[Path, ...]):
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `defaults` includes itself through {' -> '.join(map(str, seen))}")
    try:
        layer = _literal_scalars(yaml.load(path.read_text(), Loader=yaml.BaseLoader) or {}, RunConfig)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(layer, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    includes = layer.pop("defaults", [])
    if not isinstance(includes, list):
        raise ConfigError(f"{path}: `defaults` must be a list of YAML paths relative to this file")
    for include in includes:
        yield from _yaml_layers(path.parent / include, seen + (path,))
    yield str(path), layer


def _parse_overrides(overrides) -> dict:
    layer: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: expected key=value, got {item!r}")
        node = layer
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.load(raw, Loader=yaml.BaseLoader) if raw != "" else ""
    return _literal_scalars(layer, RunConfig)


def _literal_scalars(layer, schema):
    """A YAML layer read with every scalar as its literal text (yaml.BaseLoader), typed here.

    YAML 1.1's implicit typing would turn `ray.name=010` into 8, `no` into False and
    2026-11-01 into a date; instead string keys keep the text as written, and omegaconf
    converts the text of int, float and bool keys by the key's declared type. Only null
    (`null`, `~` or empty) is decided here: None, except for keys declared `str`.
    """
    if not isinstance(layer, dict):
        return layer
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    out = {}
    for key, value in layer.items():
        declared = hints.get(key)
        if isinstance(value, dict):
            out[key] = _literal_scalars(value, declared)
        elif isinstance(value, str) and value in ("null", "~", "") and declared is not str:
            out[key] = None
        else:
            out[key] = value
    return out


def _merge(merged: DictConfig, layer: dict, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        if "not in" in reason or "Key '" in reason and "not" in reason:
            reason = "unknown key"
        raise ConfigError(f"{source}: {key}: {reason}") from None


def _problems(cfg: Any, prefix: str = ""):
    if hasattr(cfg, "problems"):
        for key, msg in cfg.problems():
            yield prefix + key, msg
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                yield from _problems(value, prefix + f.name + ".")


def _origin(dotted: str, sources: list[tuple[str, dict]]) -> str:
    for name, layer in reversed(sources):
        node: Any = layer
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return name
    return "the defaults in trainer/config.py"
