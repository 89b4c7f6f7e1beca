"""`u-mask train`: the Ray driver. Light work only: validate, check the plan fits, submit the workers.

With no Ray address (ray.address unset and no RAY_ADDRESS), it starts an embedded Ray on this
machine bound to 127.0.0.1; under `ray job submit` (RAY_ADDRESS set by the job) it joins the
cluster. Either way the same worker loop (trainer/training/loop.py) runs in Ray Train's workers.

Quiet by default: the driver shows rank 0's logged steps (read from metrics.csv as they are
written, trainer/training/progress.py), and the workers' and libraries' output goes to
<run>/logs/rank-<r>.log; verbose shows it all (trainer/training/worker_logs.py, which lists
each noisy line and what was done about it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

from trainer.config import RunConfig, save_config
from trainer.training.cluster import check_cluster, cluster_address, join_cluster
from umask.errors import UserError


def train(cfg: RunConfig, verbose: bool | None = None,
          on_row: Callable[[dict[str, str]], None] | None = None):
    """Runs the training job and returns Ray Train's Result (metrics and the last checkpoint).

    verbose: show the workers' and libraries' logs on the terminal instead of writing them to
    <run>/logs/rank-<r>.log (None: the U_MASK_VERBOSE environment variable decides).
    on_row(row): called on this process, from a thread, with each row rank 0 appends to
    <run>/metrics.csv (strings by column) while the training runs.
    Raises UserError for problems found on the driver or raised by the workers as UserError.
    """
    from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig,
                           ScalingConfig, WorkerGroupError)
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.training.progress import follow_csv
    from trainer.training.worker_logs import verbose_from_env

    from embeddings.plan import check_sharding_types
    from trainer.data.loader import check_spec_matches, read_spec
    from trainer.training.resume import check_resume

    check_sharding_types(cfg.embeddings, "cuda" if cfg.ray.use_gpu else "cpu")
    check_cluster(cfg)  # on a cluster: its address answers, takes our token, and the paths are shared
    # Workers do not share the driver's working directory: give them absolute paths.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, source=str(Path(cfg.data.source).resolve()),
        features=str(Path(cfg.data.features).resolve())))
    # fails here, on the driver, if featurize has not run or made other features than cfg says
    spec = read_spec(Path(cfg.data.features))
    check_spec_matches(spec, cfg.data, cfg.data.features)
    storage = _absolute_storage(cfg.ray.storage_path)
    run_dir = Path(storage) / cfg.ray.name
    if run_dir.exists() and not cfg.train.resume:
        raise UserError(f"run {cfg.ray.name!r} already exists in {storage}; "
                        "choose another ray.name or set train.resume=true to continue it")
    if "://" not in storage:  # a resume this config cannot continue fails here, naming the keys
        check_resume(cfg, run_dir, spec)
    save_config(cfg, run_dir / "config.yaml")
    verbose = verbose_from_env() if verbose is None else verbose
    _start_ray(cfg, verbose)
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_main,
        train_loop_config={"cfg": cfg, "run_dir": str(run_dir), "verbose": verbose},
        # every collective of the worker group's process group fails after this instead of
        # waiting forever for a hung or dead peer (the loop gives DeepSpeed's groups the same)
        torch_config=TorchConfig(timeout_s=cfg.ray.collective_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **cfg.ray.resources_per_worker}),
        run_config=RayRunConfig(
            name=cfg.ray.name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (resources requested, worker group started, checkpoint
            # reported) are not ours to show; its warnings and errors still are
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            worker_runtime_env={"env_vars": _worker_env(cfg)}),
    )
    following = follow_csv(run_dir / "metrics.csv", on_row) if on_row else contextlib.nullcontext()
    try:
        with following:
            return trainer.fit()
    except WorkerGroupError as err:
        user_error = _worker_user_error(err)
        if user_error is not None:
            raise user_error from None
        if not verbose:
            err.add_note(f"The workers' own logs: {run_dir / 'logs'}/rank-<r>.log")
        raise


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
    import warnings

    import ray.train

    from trainer.training.worker_logs import process_output_to, rank_log

    run_dir = Path(loop_config["run_dir"])
    quiet = not loop_config.get("verbose", False)
    output = (process_output_to(rank_log(run_dir, ray.train.get_context().get_world_rank())) if quiet
              else contextlib.nullcontext())
    with output:
        from trainer.training.loop import Trainer

        warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
        logging.getLogger("torchrec").setLevel(logging.WARNING)
        Trainer(loop_config["cfg"], run_dir).train()


def _start_ray(cfg: RunConfig, verbose: bool) -> None:
    import ray

    if ray.is_initialized():
        return
    joined = cluster_address(cfg.ray.address)
    if joined:
        join_cluster(*joined, log_to_driver=verbose, logging_level=_driver_log_level(verbose))
        return
    # Embedded: the workers get exactly the CPUs they ask for, plus one for Ray Train's controller.
    start_embedded_ray(int(cfg.ray.num_workers * cfg.ray.cpus_per_worker) + 1, verbose)


def stop_embedded_ray(grace_s: float = 10.0) -> None:
    """ray.shutdown() of the Ray this process started, then SIGKILL, by process id, any of its
    processes still alive after grace_s seconds: Ray's shutdown ends its raylet, and a worker
    is to exit when its raylet goes, but a Ray Train controller was seen alive 12 minutes after
    a test session's shutdown, holding 500 MB."""
    import psutil
    import ray

    started = psutil.Process().children(recursive=True)  # raylet, GCS, agents and the workers
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def start_embedded_ray(num_cpus: int, verbose: bool = False, env_vars: dict[str, str] | None = None) -> None:
    """Starts a Ray on this machine for `u-mask train` (and the tests): on loopback only (Ray
    otherwise binds the machine's address), with its dashboard, whose State API Ray Train's
    placement-group cleaner polls (without it, it logged "Failed to query" every second).
    Quiet unless verbose: the workers' output stays in their log files, not on this terminal."""
    import ray

    if not verbose:
        # Ray's default for a new local cluster is token authentication, and it says so with a
        # warning at every start, which reads like a problem: the default stays, the line goes
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            _DropTokenNotice())
    env = {
        # One machine, nobody drains it: Ray Train's node-preemption watcher has nothing to watch,
        # and starting it made Ray core log an alarming but harmless error (worker_logs.py)
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        **(env_vars or {}),
    }
    # address="local": always a new Ray, never one a `ray start` left on this machine, which
    # ray.init would otherwise join (and refuse num_cpus for)
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=verbose,
             logging_level=_driver_log_level(verbose), runtime_env={"env_vars": env})


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _driver_log_level(verbose: bool) -> int:
    """Ray's own logger on this process: INFO lines such as "Started a local Ray instance." only
    when verbose; its warnings always."""
    return logging.INFO if verbose else logging.WARNING


def _worker_env(cfg: RunConfig) -> dict[str, str]:
    env = {
        # Ray Train tees print() into a logger that prints it again: every line came out twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not cfg.ray.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for GPUs at import
    # rank 0 logs to MLflow (tracking.py): it needs the driver's MLflow settings and credentials
    env.update({k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")})
    from trainer.training.faults import ENV as FAULTS

    if os.environ.get(FAULTS):  # fire drills and the fault tests (trainer/training/faults.py)
        env[FAULTS] = os.environ[FAULTS]
    return env


def _absolute_storage(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())
