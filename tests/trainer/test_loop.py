"""The training loop waits for the device only on logged and checkpoint steps (real Trainer, 1 rank).

The Trainer runs in a spawned process of its own (DeepSpeed caches its process groups for the
life of a process), in a one-rank gloo group, with save/restore overridden to skip Ray Train.
In that process the test counts what makes a step wait for the device: the all-reduces
trainer/training/loop.py issues and the copies to the host (Tensor.tolist/item) it makes.
"""
import csv
import os
import queue
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

STEPS, LOG_EVERY, CHECKPOINT_EVERY = 7, 3, 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_and_count(cfg, run_dir: str, port: int) -> dict:
    """In the spawned process: trains cfg.train.steps steps, recording the steps that synchronised."""
    import torch
    import torch.distributed as dist

    import trainer.training.loop as loop

    torch.set_num_threads(1)
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    synced: dict[str, list[int]] = {"all_reduce": [], "to_host": []}
    trainer = None

    class CountingDist:
        """torch.distributed as trainer/training/loop.py sees it, counting the all-reduces it issues."""

        def __getattr__(self, name):
            return getattr(dist, name)

        def all_reduce(self, *args, **kwargs):
            synced["all_reduce"].append(trainer.step)
            return dist.all_reduce(*args, **kwargs)

    def counted(method):
        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == loop.__file__:
                synced["to_host"].append(trainer.step)
            return method(self, *args, **kwargs)
        return wrapper

    class NoRayTrainer(loop.Trainer):
        """The real Trainer; save and restore record instead of going through Ray Train."""
        per_step: dict[int, dict[str, float]] = {}
        saved: dict[int, dict[str, float]] = {}

        def restore(self) -> None:
            pass

        def save(self, metrics: dict[str, float]) -> None:
            self.saved[self.step] = dict(metrics)

        def train_step(self):
            out = super().train_step()
            assert all(isinstance(v, torch.Tensor) for v in out.values.values()), out
            self.per_step[self.step] = {k: float(v) for k, v in out.values.items()}  # the test's own read
            return out

    loop.dist = CountingDist()
    torch.Tensor.tolist = counted(torch.Tensor.tolist)
    torch.Tensor.item = counted(torch.Tensor.item)
    try:
        trainer = NoRayTrainer(cfg, Path(run_dir))
        returned = trainer.train()
    finally:
        dist.destroy_process_group()
    return {"synced": synced, "per_step": trainer.per_step, "saved": trainer.saved, "returned": returned}


def _child(fn, args, results) -> None:
    try:
        results.put((None, fn(*args)))
    except BaseException:
        results.put((traceback.format_exc(), None))


def _run_in_process(fn, *args, timeout: float = 300.0):
    """fn(*args) in a fresh spawned process; its exception comes back as a RuntimeError."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, results), daemon=True)
    proc.start()
    try:
        try:
            error, value = results.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the training process gave no result within {timeout} s") from None
        if error is not None:
            raise RuntimeError(error)
        proc.join(timeout=30)
        return value
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()


def test_metrics_are_reduced_only_on_logged_and_checkpoint_steps(tmp_path, tiny_config):
    cfg = tiny_config("ray.name=sync", "ray.num_workers=1", f"train.steps={STEPS}",
                      f"train.log_every={LOG_EVERY}", f"train.checkpoint_every={CHECKPOINT_EVERY}")
    run_dir = tmp_path / "runs" / "sync"
    out = _run_in_process(_train_and_count, cfg, str(run_dir), _free_port())

    logged, checkpointed = [3, 6, 7], [5, 7]  # every log_every-th and the last; every checkpoint_every-th and the last
    assert out["synced"]["all_reduce"] == [3, 5, 6, 7]  # one all-reduce on each, none on steps 1, 2, 4
    assert out["synced"]["to_host"] == [3, 5, 6, 7]
    assert sorted(out["saved"]) == checkpointed

    with (run_dir / "metrics.csv").open() as f:
        rows = {int(row["step"]): row for row in csv.DictReader(f)}
    assert sorted(rows) == logged
    per_step = out["per_step"]

    def mean(name, steps):
        return sum(per_step[s][name] for s in steps) / len(steps)

    # a logged row is the mean over the steps since the previous logged step
    for step, window in {3: [1, 2, 3], 6: [4, 5, 6], 7: [7]}.items():
        for name in ("loss", "reconstruction", "consistency"):
            assert float(rows[step][name]) == pytest.approx(mean(name, window), abs=2e-6), (step, name)
        assert 0.0 <= float(rows[step]["data_wait"]) <= 1.0
    # a checkpoint between logged steps reports the window so far; the last step reports its own window
    assert out["saved"][5]["loss"] == pytest.approx(mean("loss", [4, 5]), rel=1e-6)
    assert out["saved"][7] == out["returned"]
    assert out["returned"]["loss"] == pytest.approx(per_step[7]["loss"], rel=1e-6)


def _clipped_norms(cfg, run_dir: str, port: int) -> list[tuple[float, float]]:
    """In the spawned process: per step, the gradient norm the trainer logs and the norm of the
    gradients the optimizer is handed (read inside AdamW's step)."""
    import torch
    import torch.distributed as dist

    import trainer.training.loop as loop

    torch.set_num_threads(1)
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        trainer = loop.Trainer(cfg, Path(run_dir))
        params = list(trainer.engine.module.parameters())
        stepped: list[float] = []
        optimizer = trainer.engine.optimizer
        plain_step = optimizer.step

        def step(*args, **kwargs):
            stepped.append(float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])))
            return plain_step(*args, **kwargs)
        optimizer.step = step
        logged = [float(trainer.train_step().values["grad_norm"]) for _ in range(3)]
    finally:
        dist.destroy_process_group()
    return list(zip(logged, stepped))


def test_the_trainer_clips_what_deepspeed_steps_in_fp32_without_zero(tmp_path, tiny_config):
    """fp32 ZeRO-0 on one rank: DeepSpeed's clipping is off (trainer/training/deepspeed_config.py:
    trainer_clips) and the trainer clips to deepspeed.gradient_clipping with the norm it logs."""
    clip = 1e-3  # far below the tiny model's gradient norms, so every step is clipped
    cfg = tiny_config("ray.name=clip", "ray.num_workers=1", f"deepspeed.gradient_clipping={clip}")
    pairs = _run_in_process(_clipped_norms, cfg, str(tmp_path / "runs" / "clip"), _free_port())
    for logged, stepped in pairs:
        assert logged > 10 * clip  # the logged norm is before clipping
        assert stepped == pytest.approx(clip, rel=1e-3)  # what AdamW stepped with
