"""`u-mask train`: the Ray driver. Light work only: validate, check the plan fits, submit the workers.

With no Ray address (ray.address unset and no RAY_ADDRESS), it starts an embedded Ray on this
machine bound to 127.0.0.1; under `ray job submit` (RAY_ADDRESS set by the job) it joins the
cluster. Either way the same worker loop (trainer/training/loop.py) runs in Ray Train's workers.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from trainer.config import RunConfig, save_config
from umask.errors import UserError


def train(cfg: RunConfig):
    """Runs the training job and returns Ray Train's Result (metrics and the last checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    from embeddings.plan import check_sharding_types
    from trainer.data.loader import check_spec_matches, read_spec

    check_sharding_types(cfg.embeddings, "cuda" if cfg.ray.use_gpu else "cpu")
    # Workers do not share the driver's working directory: give them absolute paths.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, source=str(Path(cfg.data.source).resolve()),
        features=str(Path(cfg.data.features).resolve())))
    # fails here, on the driver, if featurize has not run or made other features than cfg says
    check_spec_matches(read_spec(Path(cfg.data.features)), cfg.data, cfg.data.features)
    storage = _absolute_storage(cfg.ray.storage_path)
    run_dir = Path(storage) / cfg.ray.name
    if run_dir.exists() and not cfg.train.resume:
        raise UserError(f"run {cfg.ray.name!r} already exists in {storage}; "
                        "choose another ray.name or set train.resume=true to continue it")
    save_config(cfg, run_dir / "config.yaml")
    _start_ray(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_main,
        train_loop_config={"cfg": cfg, "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **cfg.ray.resources_per_worker}),
        run_config=RayRunConfig(
            name=cfg.ray.name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": _worker_env(cfg)}),
    )
    try:
        return trainer.fit()
    except WorkerGroupError as err:
        raise _worker_user_error(err) or err


def _worker_user_error(err) -> UserError | None:
    """A UserError raised on the workers, as one message naming the ranks; None for other errors."""
    by_message: dict[str, list[int]] = {}
    for rank, failure in sorted(err.worker_failures.items()):
        cause = failure
        while cause is not None and not isinstance(cause, UserError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is None:
            return None
        by_message.setdefault(str(cause), []).append(rank)
    return UserError("; ".join(f"on rank {', '.join(map(str, ranks))}: {message}"
                               for message, ranks in by_message.items()))


def _worker_main(loop_config: dict) -> None:
    """The body of every Ray Train worker (TorchRec and DeepSpeed are imported here, not on the driver)."""
    import logging
    import warnings

    from trainer.training.loop import Trainer

    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    Trainer(loop_config["cfg"], Path(loop_config["run_dir"])).train()


def _start_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # Embedded: stay on loopback (Ray otherwise binds the machine's address) and give the
    # workers exactly the CPUs they ask for plus one for Ray Train's controller.
    ray.init(num_cpus=int(cfg.ray.num_workers * cfg.ray.cpus_per_worker) + 1,
             _node_ip_address="127.0.0.1", include_dashboard=False)


def _worker_env(cfg: RunConfig) -> dict[str, str]:
    env = {
        # Ray Train tees print() into a logger that prints it again: every line came out twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not cfg.ray.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for GPUs at import
    return env


def _absolute_storage(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())
