"""One rank's training: loader -> sharded tables -> U-MASK -> DeepSpeed engine + fused sparse optimizers.

Shaped like torchtitan's Trainer: the constructor builds the parts, and `next_batch`,
`forward_backward`, `train_step`, `save`, `restore` and `train` are methods a model-specific
trainer can override one at a time. It runs inside a Ray Train worker, where the process
group already exists; locally that worker is a CPU process of an embedded Ray.

The metrics do not make a step wait for the device: they stay device tensors, summed in a
MetricWindow, and the ranks average them (one all-reduce, one copy to the host) only on logged
steps and on checkpoint steps, where Ray Train takes them with the checkpoint. What does wait,
once per micro-batch, is the finiteness check before any weight moves (trainer/training/guard.py:
one all-reduce of a few flags).

Faults (docs/reliability.md): a restarted worker group resumes from the newest checkpoint every
rank finished (`restore`); every collective fails after ray.collective_timeout_s instead of
waiting forever for a hung peer; UMASK_FAULTS injects real faults at chosen steps
(trainer/training/faults.py).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import RunConfig, to_yaml
from trainer.data.batch import Batch
from trainer.data.loader import ShardedLoader, check_spec_matches
from umask.spec import SPEC_DIR
from trainer.training.deepspeed_config import deepspeed_config, resolve_precision, trainer_clips
from trainer.training.faults import fault_point
from trainer.training.flat_grads import FlatGradients
from trainer.training.guard import NonFiniteGuard
from trainer.training.malloc import keep_freed_memory
from trainer.training.native_ops import without_runtime_builds
from trainer.training.progress import ProgressLog
from trainer.training.sparse_grad import table_gradient, watch_loss
from umask.errors import UserError


class Trainer:
    """Trains cfg.train.steps optimizer steps on this rank, checkpointing through Ray Train."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        import deepspeed

        from embeddings.ids import IdMapper
        from embeddings.plan import plan_lines
        from embeddings.sharded import ShardedTables
        from embeddings.tables import pooled_dim
        from umask.backbones import build_model
        from umask.model import no_extra_negatives

        keep_freed_memory()  # no page faults for the same activations every step (malloc.py)
        self.cfg = cfg
        self.run_dir = run_dir
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = _device(cfg)
        self.loader = ShardedLoader(cfg.data.features, self.rank, self.world_size,
                                    batch_size=cfg.train.batch_size, seed=cfg.train.seed, splits=("train",),
                                    shuffle_window=cfg.data.shuffle_window)
        self.spec = self.loader.spec  # the model and every checkpoint take the features' spec
        check_spec_matches(self.spec, cfg.data, cfg.data.features)
        torch.manual_seed(cfg.train.seed)  # the same initial tables and dense weights on every rank
        self.ids = IdMapper(cfg.embeddings)
        self.tables = ShardedTables(cfg.embeddings, dist.group.WORLD, self.device)
        if self.rank == 0:
            _write_plan(self.tables.placements, run_dir / "plan.json")
            lines = plan_lines(self.tables.planned, cfg.embeddings)
            (run_dir / "plan.txt").write_text("\n".join(lines) + "\n")  # the driver prints it
            print("\n".join(lines), flush=True)
        model = build_model(cfg.model, self.spec, sparse_dim=pooled_dim(cfg.embeddings),
                            gather_negatives=_other_ranks_rows if self.world_size > 1 else no_extra_negatives)
        without_runtime_builds()  # no C++ compiled here, so no build lock to wait on
        _new_groups_time_out_after(cfg.ray.collective_timeout_s)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(),
            config=deepspeed_config(cfg.deepspeed, cfg.train.batch_size, cfg.ray.use_gpu))
        precision = resolve_precision(cfg.deepspeed, cfg.ray.use_gpu)
        self.flat_grads: FlatGradients | None = None
        if precision == "fp32" and cfg.deepspeed.zero_stage == 0:
            # DeepSpeed's ZeRO-0 gradient all-reduce copies every gradient into a new buffer and
            # back each step (trainer/training/flat_grads.py); on several ranks the gradients live
            # in one buffer reduced in place instead, on one rank nothing needs reducing
            # (forward_backward gives gradient-less parameters the zeros DeepSpeed would have)
            self.engine.enable_backward_allreduce = False
            if self.world_size > 1:
                self.flat_grads = FlatGradients(self.engine.module)
        # the trainer clips (trainer_clips): the norm it logs is the norm it clips with
        self.clip = cfg.deepspeed.gradient_clipping if trainer_clips(cfg.deepspeed, cfg.ray.use_gpu) else 0.0
        # the engine's parameters are in this dtype; the model's float inputs are cast to it
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.guard = NonFiniteGuard(self.engine, cfg.train.nonfinite, cfg.train.nonfinite_patience,
                                    fp16=precision == "fp16",
                                    bare_fp32=precision == "fp32" and cfg.deepspeed.zero_stage == 0)
        self.step = 0
        self.micro_step = 0

    def next_batch(self) -> Batch:
        """The loader's next batch, on the host (ids are hashed there, then everything moves)."""
        return next(self.loader)

    def forward_backward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One micro-batch: lookups, the model's loss, the dense backward, the finiteness check
        on every rank (trainer/training/guard.py), the tables' backward, the dense step."""
        kjt = self.ids.to_kjt(batch.app_values, batch.app_lengths, batch.loc_values,
                              batch.loc_lengths).to(self.device)
        batch = batch.to(self.device)
        pooled = self.tables(kjt)  # [B*T, E]; its backward, where the tables step (fused), comes last
        features = pooled.detach().requires_grad_()  # the dense model's view of the lookups
        slot_sparse = features.to(self.dtype).view(len(batch), batch.observed.shape[1], -1)  # [B, T, E]
        generator = torch.Generator().manual_seed(
            hash((self.cfg.train.seed, self.rank, self.micro_step)) & 0x7FFF_FFFF)
        out = self.engine(dense=batch.dense.to(self.dtype), observed=batch.observed,
                          time_of_week=batch.time_of_week, slot_sparse=slot_sparse, generator=generator)
        loss_grads = watch_loss(out["loss"])
        if self.flat_grads is not None:
            self.flat_grads.attach()
        self.engine.backward(out["loss"])  # the dense gradients only: no weight has moved yet
        boundary = self.engine.is_gradient_accumulation_boundary()
        if self.flat_grads is not None and boundary:
            self.flat_grads.start_all_reduce()  # collective: every rank reaches its boundary alike
        verdict = self.guard.check(self.step + 1, out["loss"], features.grad, batch)  # collective
        if verdict.tables_step and features.grad is not None:  # the tables step here, fused
            pooled.backward(table_gradient(features.grad, loss_grads, self.engine.gradient_accumulation_steps()))
        self.last_batch = batch
        metrics = {k: out[k].detach() for k in ("loss", "reconstruction", "consistency")}
        if boundary:
            if self.flat_grads is not None:
                self.flat_grads.finish_all_reduce()
            elif not self.engine.enable_backward_allreduce:
                for param in self.engine.module.parameters():
                    if param.requires_grad and param.grad is None:
                        param.grad = torch.zeros_like(param)
            metrics["grad_norm"] = self.grad_norm()
            if self.clip and metrics["grad_norm"] is not None:
                torch.nn.utils.clip_grads_with_norm_(self.engine.module.parameters(), self.clip,
                                                     metrics["grad_norm"], foreach=True)
        self.guard.dense_step()  # engine.step(): the dense model steps at accumulation boundaries only
        if "grad_norm" in metrics and metrics["grad_norm"] is None:
            metrics["grad_norm"] = _as_tensor(self.engine.get_global_grad_norm(), self.device)
        self.micro_step += 1
        return metrics

    def grad_norm(self) -> torch.Tensor | None:
        """The dense model's gradient 2-norm before clipping, a 0-dim device tensor (no wait).

        Read between backward and step at an accumulation boundary, where the parameters hold the
        full gradient averaged over ranks. None where DeepSpeed keeps the gradients in its own
        partitions (ZeRO, bf16/fp16): then forward_backward takes the norm DeepSpeed computed.
        """
        if self.flat_grads is not None:
            return self.flat_grads.norm()
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return torch.nn.utils.get_total_norm(grads, foreach=True).float()

    def train_step(self) -> StepMetrics:
        """One optimizer step of the dense model: gradient_accumulation_steps micro-batches.

        Returns this rank's metrics of the step without waiting for the device: the model's
        as device tensors (means over the micro-batches), and the step's host time and the part
        of it spent waiting for the loader, as floats. `train` averages them over ranks.
        """
        started = time.perf_counter()
        waited = 0.0
        parts = []
        for _ in range(self.engine.gradient_accumulation_steps()):
            asked = time.perf_counter()
            batch = self.next_batch()
            waited += time.perf_counter() - asked
            parts.append(self.forward_backward(batch))
        self.step += 1
        skipped = self.guard.step_outcome(self.step, self.last_batch)
        values = {k: torch.stack([p[k] for p in parts]).mean()
                  for k in ("loss", "reconstruction", "consistency")}
        values["grad_norm"] = parts[-1]["grad_norm"]  # the step's one boundary: its last micro-batch
        return StepMetrics(values, seconds=time.perf_counter() - started, waited=waited, skipped=skipped)

    def save(self, metrics: dict[str, float]) -> None:
        """Writes this rank's checkpoint and reports it to Ray Train, which publishes it once every
        rank has reported (a checkpoint a rank died in the middle of is never resumed from)."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="umask-ckpt-") as folder:
            self.write_checkpoint(Path(folder))
            fault_point("save", self.step, self.rank, self.run_dir)
            # Ray's report waits for every rank with no time limit; this barrier has the
            # collective timeout, so a rank that hangs before reporting fails the step instead
            dist.barrier()
            ray.train.report({"step": self.step, **metrics},
                             checkpoint=ray.train.Checkpoint.from_directory(folder))

    def write_checkpoint(self, folder: Path) -> None:
        """This rank's part of a checkpoint of the current step, into `folder` (collective)."""
        from trainer.training.checkpoint import save_checkpoint

        save_checkpoint(folder, rank=self.rank, world_size=self.world_size, run_name=self.cfg.ray.name,
                        step=self.step, engine=self.engine, tables=self.tables,
                        loader_state=self.loader.state_dict(), config_yaml=to_yaml(self.cfg),
                        spec_dir=Path(self.cfg.data.features) / SPEC_DIR)

    def restore(self) -> None:
        """Continues from the run's newest checkpoint that every rank finished and that verifies.

        On a local or mounted storage path: the run folder's complete checkpoints, newest first
        (trainer/training/checkpoint.py: complete_checkpoints, which also finds the checkpoint of
        a worker group that failed before Ray Train registered it); a damaged one is passed over,
        loudly, for the one before, and if every one is damaged the run stops rather than start
        over. On remote storage (a URI): Ray Train's latest registered checkpoint.
        """
        import ray.train

        from trainer.training.checkpoint import CheckpointDamaged, complete_checkpoints

        if not self.cfg.train.resume:
            return
        if "://" in self.cfg.ray.storage_path:
            checkpoint = ray.train.get_checkpoint()
            if checkpoint is None:
                return
            with checkpoint.as_directory() as folder:
                self.load_checkpoint(Path(folder))
            candidates = [checkpoint.path]
        else:
            candidates = complete_checkpoints(self.run_dir)
            damaged = []
            for folder in candidates:
                try:
                    self.load_checkpoint(folder)  # verification agrees across ranks: all pass over it alike
                except CheckpointDamaged as err:
                    damaged.append(str(err))
                    print(f"not resuming from {folder}: {err}", flush=True)
                    continue
                candidates = [folder]
                break
            else:
                if damaged:
                    raise UserError(f"{self.run_dir}: none of its {len(damaged)} checkpoints verifies (the "
                                    f"newest: {damaged[0]}); refusing to start the run over")
                return
        if self.rank == 0:
            print(f"resumed at step {self.step} from {candidates[0]}", flush=True)

    def load_checkpoint(self, folder: Path) -> None:
        """Continues from the checkpoint in `folder` (collective): verified first, then engine,
        tables, loader position and step; at another world size than the checkpoint's too
        (trainer/training/checkpoint.py: resharding)."""
        from trainer.training.checkpoint import load_checkpoint

        self.step, loader_state = load_checkpoint(
            folder, rank=self.rank, world_size=self.world_size, run_name=self.cfg.ray.name,
            engine=self.engine, tables=self.tables)
        if loader_state.get("world_size") == self.world_size:
            self.loader.load_state_dict(loader_state)
        else:
            left_out = self.loader.load_resharded_state(loader_state)
            if self.rank == 0:
                now = self.loader.state_dict()
                where = (f"the rest of epoch {now['epoch']} is dealt to the {self.world_size} workers"
                         if "bridge" in now else f"the data continues at epoch {now['epoch']}, batch 0")
                print(f"resharded {folder} from {loader_state.get('world_size')} workers to {self.world_size}: "
                      f"{where}" + (f" ({left_out} examples of epoch {loader_state['epoch']} left out: they "
                                    "fill no batch on every worker)" if left_out else ""), flush=True)
        self.micro_step = self.step * self.engine.gradient_accumulation_steps()
        for group in self.engine.optimizer.param_groups:  # the checkpoint brought its own; the config's win
            group["lr"], group["weight_decay"] = self.cfg.deepspeed.lr, self.cfg.deepspeed.weight_decay

    def train(self) -> dict[str, float]:
        """Trains up to cfg.train.steps; returns the metrics of the last logged window.

        Logged metrics are means over the steps since the previous logged step (the window)
        and over ranks; data_wait is the share of the window's host time spent waiting for the
        loader. A checkpoint step between logged steps reports the window so far to Ray Train
        and keeps the window open. After a resume, the first window starts at the resumed step.
        """
        self.restore()
        examples_per_step = (self.cfg.train.batch_size * self.world_size
                             * self.engine.gradient_accumulation_steps())
        trackers = self.trackers() if self.rank == 0 else None
        progress = ProgressLog(self.run_dir, self.cfg.train.steps, self.cfg.train.log_every,
                               self.rank == 0, start_step=self.step, trackers=trackers)
        window = MetricWindow()
        metrics: dict[str, float] = {}
        finished = False
        try:
            while self.step < self.cfg.train.steps:
                window.add(self.train_step())
                fault_point("step", self.step, self.rank, self.run_dir)
                logged = progress.due(self.step)
                checkpoint = self.step % self.cfg.train.checkpoint_every == 0 or self.step == self.cfg.train.steps
                if logged or checkpoint:  # the same steps on every rank: the all-reduce inside is collective
                    metrics = window.mean_over_ranks(totals={
                        f"out_of_contract_{k}": v for k, v in self.ids.out_of_contract().items()}
                        | self.tables.uvm_cache_counts(), per_rank=self.memory_peaks())
                    metrics["lr"] = float(self.engine.get_lr()[0])
                    if "uvm_cache_unique_ids" in metrics:  # fused_uvm_caching tables (GPU)
                        metrics["uvm_cache_hit_rate"] = 1.0 - (metrics.pop("uvm_cache_unique_misses")
                                                               / max(metrics.pop("uvm_cache_unique_ids"), 1.0))
                progress.step(self.step, examples_per_step, metrics if logged else None)
                if logged:
                    window = MetricWindow()
                if checkpoint:
                    self.save(metrics)
            finished = True
        except RuntimeError as err:
            raise _timed_out(err, self.step + 1, self.rank, self.cfg.ray.collective_timeout_s) or err
        finally:
            if trackers is not None:
                trackers.close(finished)
        return metrics

    def memory_peaks(self) -> dict[str, float]:
        """This rank's peak resident memory so far (and on GPU its peak allocated HBM), in GiB."""
        from trainer.training.memory import GIB, peak_device_bytes, peak_rss_bytes

        peaks = {"peak_rss_gb": peak_rss_bytes() / GIB}
        if self.device.type == "cuda":
            peaks["peak_hbm_gb"] = peak_device_bytes() / GIB
        return peaks

    def trackers(self):
        """Rank 0's TensorBoard writer and MLflow run (cfg.tracking; trainer/training/tracking.py)."""
        from omegaconf import OmegaConf

        from trainer.training.tracking import Trackers

        return Trackers(self.run_dir, self.cfg.tracking, self.cfg.ray.name,
                        OmegaConf.to_container(OmegaConf.structured(self.cfg)))


@dataclasses.dataclass
class StepMetrics:
    """One optimizer step on one rank, as train_step measured it without waiting for the device."""
    values: dict[str, torch.Tensor]  # 0-dim tensors on the device: loss, reconstruction, consistency
    seconds: float  # the step's host time
    waited: float  # the part of `seconds` spent waiting for the loader
    skipped: str | None = None  # why no weight took the step: "nonfinite", "loss_scale" (guard.py)


class MetricWindow:
    """The steps since the last logged one: the metrics' sums on the device, host times as floats.

    `add` queues one small addition on the device and never waits for it; `mean_over_ranks` is
    the host-device synchronisation: one all-reduce and one copy to the host.
    """

    def __init__(self):
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # [len(names)] float32, on the device
        self.steps = 0  # the steps whose values are in sums: skipped steps' are not
        self.seconds = 0.0
        self.waited = 0.0
        self.skipped = {"nonfinite": 0, "loss_scale": 0}  # skipped steps by reason (guard.py)

    def add(self, step: StepMetrics) -> None:
        values = torch.stack([v.detach().float() for v in step.values.values()])
        if step.skipped is not None:  # the same on every rank; its loss may be NaN
            self.skipped[step.skipped] += 1
            values = torch.zeros_like(values)
        else:
            self.steps += 1
        self.names = list(step.values)
        self.sums = values if self.sums is None else self.sums + values
        self.seconds += step.seconds
        self.waited += step.waited

    def mean_over_ranks(self, totals: dict[str, float] | None = None,
                        per_rank: dict[str, float] | None = None) -> dict[str, float]:
        """Each metric's mean over the window, and data_wait (the window's share of host time
        spent waiting for the loader), each averaged over ranks; each of `totals` (this
        rank's counts) summed over ranks; and each of `per_rank` as one value per rank
        (`<name>_rank<r>`). One all-reduce for all of them."""
        if self.sums is None:
            raise ValueError("no step in the window")
        totals, per_rank = totals or {}, per_rank or {}
        world, rank = dist.get_world_size(), dist.get_rank()
        data_wait = torch.tensor([self.waited / max(self.seconds, 1e-9)], device=self.sums.device)
        counts = torch.tensor(list(totals.values()), dtype=torch.float32, device=self.sums.device)
        # each rank fills its own slot of a [names, world] block, so the mean times world is every rank's value
        slots = torch.zeros(len(per_rank), world, device=self.sums.device)
        slots[:, rank] = torch.tensor(list(per_rank.values()), dtype=torch.float32)
        # a window of skipped steps only has no means: 0/0 gives NaN
        means = _mean_over_ranks(torch.cat([self.sums / self.steps, data_wait, counts * world,
                                            slots.flatten() * world]))
        names = [f"{name}_rank{r}" for name in per_rank for r in range(world)]
        return {**dict(zip([*self.names, "data_wait", *totals, *names], means)),
                "skipped_steps": float(self.skipped["nonfinite"]),
                "loss_scale_skips": float(self.skipped["loss_scale"])}


def _timed_out(err: RuntimeError, step: int, rank: int, seconds: float) -> UserError | None:
    """A collective's timeout (gloo: "Timed out waiting 600000ms for recv operation") as one line
    for the user; None for any other error."""
    if "timed out" not in str(err).lower():
        return None
    return UserError(f"step {step}: rank {rank} waited more than ray.collective_timeout_s={seconds} s for "
                     f"the other ranks in a collective ({str(err).splitlines()[0][-120:]}): a rank is hung "
                     "or dead; its log shows where it stopped")


def _new_groups_time_out_after(seconds: float) -> None:
    """Process groups made from here on fail a collective after `seconds`, as the world group does.

    Ray Train gives the world group ray.collective_timeout_s, but DeepSpeed makes groups of its
    own (its data-parallel copy of the world, used for the ZeRO reductions) with torch's default
    (30 minutes for gloo, 10 for nccl), which torch reads from these module globals.
    """
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if hasattr(c10d, name):
            setattr(c10d, name, timedelta(seconds=seconds))


def _write_plan(placements: dict, path: Path) -> None:
    """table -> sharding type, compute kernel, ranks and shard widths, as the planner chose them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: dataclasses.asdict(p) for name, p in placements.items()}, indent=1))


def _device(cfg: RunConfig) -> torch.device:
    if not cfg.ray.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def _mean_over_ranks(values: torch.Tensor) -> list[float]:
    """[n] metrics -> their means over ranks, in one all-reduce (on the model's device: nccl needs it).

    It waits for the device (the copy to the host): train calls it on logged and checkpoint steps only.
    """
    values = values.detach().float()
    dist.all_reduce(values)
    return (values / dist.get_world_size()).tolist()


def _as_tensor(value, device: torch.device) -> torch.Tensor:
    """DeepSpeed's global gradient norm (a float, a tensor or None) as a 0-dim tensor; NaN when None."""
    if value is None:
        return torch.tensor(float("nan"), device=device)
    return torch.as_tensor(value, dtype=torch.float32, device=device).detach().reshape(())


def _other_ranks_rows(x: torch.Tensor) -> torch.Tensor:
    """[n, d] on each rank -> [(world - 1) * n, d]: the other ranks' rows, as InfoNCE negatives.

    The all-gather is differentiable, so each rank's rows also get gradient as others' negatives.
    """
    from torch.distributed._functional_collectives import all_gather_single

    # torch.distributed.nn.functional.all_gather is deprecated; torch points here instead (differentiable)
    rows = all_gather_single(x.contiguous(), gather_dim=0, group=dist.group.WORLD)  # [world*n, d]
    rows = rows.view(dist.get_world_size(), *x.shape)
    return torch.cat([r for i, r in enumerate(rows) if i != dist.get_rank()], dim=0)
