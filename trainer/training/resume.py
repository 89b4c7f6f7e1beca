"""Before any worker starts: can this run's config continue the run's latest checkpoint?

Rerunning `u-mask train` with the same ray.name resumes from the latest checkpoint, which holds
the config it was trained with (config.yaml). Some keys may change on resume and some may not;
`check_resume` refuses the second kind on the driver, in one error naming each key with its
value in the checkpoint and in this run, instead of every worker failing inside DeepSpeed,
DCP or the loader (and Ray Train restarting them ray.max_failures times to fail again).

May change: learning rates, weight decay, clipping, accumulation, loss and mask settings,
steps, logging and checkpoint intervals, sharding types (DCP places the saved rows under the
new plan), Ray resources, and ray.num_workers (resharding: trainer/training/checkpoint.py; the
tables move with DCP, the engine through DeepSpeed's universal checkpoint, the loader deals the
rest of the interrupted epoch to the new world, trainer/data/loader.py). The run's config
wins for every hyperparameter (trainer/training/loop.py sets the dense optimizer's lr and weight
decay after loading).
May not change:
- a table's optimizer-state layout, which the planner on the workers decides (embeddings/
  checkpoint.py refuses there, naming the table);
- deepspeed.zero_stage, except between 1 and 2, whose checkpoints are the same files: the run
  continues with the same losses, and weights equal up to float32 rounding (ZeRO-2 sums the
  gradients in another order; tests/trainer/test_engines.py). DeepSpeed cannot continue a
  stage-0 checkpoint (a bare
  torch optimizer's state) under ZeRO or the reverse, nor ZeRO-3's under 1 or 2 or the reverse:
  its universal checkpoint (ds_to_universal) converts between stages 1 and 2 only; tried here
  1/2 -> 3 fails in DeepSpeed's loader (KeyError 'optimizer_state_dict'), 3 -> 1/2 finds no
  model states, anything -> 0 has no universal loader;
- deepspeed.precision (as resolved: auto is bf16 on GPU, fp32 on CPU): the optimizer's master
  weights and the engine's files differ per precision;
- embeddings.<table>.num_embeddings and dim, embeddings.optimizer: the tables' and their
  optimizer state's shapes;
- embeddings.<table>.collision (hash <-> zch): the saved rows belong to the ids that the
  checkpoint's mapping sent there, and zch's id -> row map is the managed-collision modules'
  own saved state;
- embeddings.<table>.compute_kernel (fused <-> fused_uvm_caching): the tables' state was
  written by the other FBGEMM kernel, and moving a checkpoint between kernels has never been
  run here (fused_uvm_caching needs a GPU), so it is refused rather than guessed at;
- any key that changes the dense model's parameter shapes (model.*, the data.* keys of the
  feature spec, the table dims): found by building the new model on the meta device and
  comparing with the checkpoint's dense.safetensors header;
- train.batch_size, train.seed, data.shuffle_window, and the features themselves: the saved
  loader position names examples only under them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from embeddings.config import TableConfig
from trainer.config import RunConfig
from trainer.training.checkpoint import checkpoint_step, latest_checkpoint
from trainer.training.deepspeed_config import resolve_precision
from umask.errors import UserError
from umask.spec import CONFIG_KEYS, SPEC_DIR, FeatureSpec, load_spec

# ZeRO stages whose checkpoints DeepSpeed loads into each other (same files, same layout)
_INTERCHANGEABLE_STAGES = ({1, 2},)


def check_resume(cfg: RunConfig, run_dir: Path, spec: FeatureSpec) -> Path | None:
    """The checkpoint the run will resume from (None: it starts afresh); a UserError naming each
    key that this config may not change against it. `spec`: the feature spec of cfg's features."""
    if not cfg.train.resume or not Path(run_dir).is_dir():
        return None
    folder = latest_checkpoint(Path(run_dir))
    if folder is None:
        return None
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{folder / 'config.yaml'}: cannot read the checkpoint's config ({err})") from None
    problems = resume_problems(saved, cfg, folder, spec)
    if problems:
        raise UserError(
            f"run {cfg.ray.name!r} would resume from {folder} (step {checkpoint_step(folder)}), but this "
            "config cannot continue it:\n  " + "\n  ".join(problems) + "\nSet these keys back to the "
            "checkpoint's values, or start a new run (another ray.name, or train.resume=false in an "
            "empty run folder)")
    return folder


def resume_problems(saved: dict, cfg: RunConfig, folder: Path, spec: FeatureSpec) -> list[str]:
    """One line per key that differs in a way the checkpoint cannot be continued under."""
    out = []

    def differs(key: str, now: Any, why: str, default: Any = None) -> None:
        was = _get(saved, key)
        was = default if was is None else was  # a checkpoint from before the key existed had its default
        if was != now:
            out.append(f"{key}: {was!r} in the checkpoint, {now!r} in this run; {why}")

    was_stage, stage = _get(saved, "deepspeed.zero_stage"), cfg.deepspeed.zero_stage
    if was_stage != stage and not any({was_stage, stage} <= pair for pair in _INTERCHANGEABLE_STAGES):
        out.append(f"deepspeed.zero_stage: {was_stage!r} in the checkpoint, {stage!r} in this run; "
                   "DeepSpeed continues a checkpoint under another ZeRO stage only between 1 and 2")
    was_precision = _saved_precision(saved)
    precision = resolve_precision(cfg.deepspeed, cfg.ray.use_gpu)
    if was_precision != precision:
        out.append(f"deepspeed.precision: {was_precision!r} in the checkpoint, {precision!r} in this run "
                   "(auto resolved); the engine's files and master weights are per precision")
    for name, table in cfg.embeddings.tables().items():
        for key in ("num_embeddings", "dim"):
            differs(f"embeddings.{name}.{key}", getattr(table, key), "the table's shape")
        differs(f"embeddings.{name}.collision", table.collision, "ids map to other rows under the other "
                "collision (hash: splitmix64 mod rows; zch: the managed-collision modules' saved map)",
                default=TableConfig.collision)
        differs(f"embeddings.{name}.compute_kernel", table.compute_kernel, "the table's state was written by "
                "the other FBGEMM kernel; continuing it under another one is not supported",
                default=TableConfig.compute_kernel)
    differs("embeddings.optimizer", cfg.embeddings.optimizer, "the tables' optimizer state has another layout")
    differs("train.batch_size", cfg.train.batch_size, "the saved loader position counts batches of it")
    differs("train.seed", cfg.train.seed, "the saved loader position is in its shuffle")
    differs("data.shuffle_window", cfg.data.shuffle_window, "the saved loader position is in its shuffle")
    saved_spec = _saved_spec(folder)
    if saved_spec is not None and saved_spec.digest != spec.digest:
        out.append(f"data.features: {cfg.data.features} holds other features than the checkpoint was "
                   f"trained on (feature spec {spec.digest}, the checkpoint's {saved_spec.digest}); the "
                   "saved loader position and the model's inputs belong to those")
    out += _dense_shape_problems(saved, cfg, folder, spec)
    return out


def _dense_shape_problems(saved: dict, cfg: RunConfig, folder: Path, spec: FeatureSpec) -> list[str]:
    """The dense model this config builds against the checkpoint's weights: the keys that differ
    when a parameter's shape does, or nothing."""
    import torch
    from safetensors import safe_open

    from embeddings.tables import pooled_dim
    from umask.backbones import build_model

    dense_file = folder / "dense.safetensors"
    try:
        with safe_open(str(dense_file), framework="pt") as f:
            saved_shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - OSError, or safetensors' SafetensorError
        raise UserError(f"{dense_file}: cannot read its header ({err})") from None
    with torch.device("meta"):
        model = build_model(cfg.model, spec, sparse_dim=pooled_dim(cfg.embeddings))
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    differing = sorted(key for key in saved_shapes.keys() | shapes.keys()
                       if saved_shapes.get(key) != shapes.get(key))
    if not differing:
        return []
    example = differing[0]
    keys = (_changed_keys(saved, cfg, "model")
            + [f"data.{k}" for k in CONFIG_KEYS if _get(saved, f"data.{k}") != getattr(cfg.data, k)]
            + [f"embeddings.{name}.dim" for name, table in cfg.embeddings.tables().items()
               if _get(saved, f"embeddings.{name}.dim") != table.dim])
    what = ", ".join(keys) if keys else "no model.* key, so the model's code changed"
    return [f"the dense model's shapes differ from the checkpoint's ({len(differing)} tensors, e.g. {example}: "
            f"{saved_shapes.get(example)} in the checkpoint, {shapes.get(example)} now); keys changed: {what}"]


def _changed_keys(saved: dict, cfg: RunConfig, section: str) -> list[str]:
    from omegaconf import OmegaConf

    now = OmegaConf.to_container(OmegaConf.structured(getattr(cfg, section)))
    return [f"{section}.{key}" for key in _flat_diff(saved.get(section) or {}, now)]


def _flat_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _flat_diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _saved_precision(saved: dict) -> str:
    from trainer.config import DeepSpeedConfig

    precision = _get(saved, "deepspeed.precision") or "auto"
    return resolve_precision(DeepSpeedConfig(precision=precision), bool(_get(saved, "ray.use_gpu")))


def _saved_spec(folder: Path) -> FeatureSpec | None:
    try:
        return load_spec(folder / SPEC_DIR)
    except (UserError, OSError, ValueError, json.JSONDecodeError):
        return None
