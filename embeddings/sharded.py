"""The app and location tables sharded over a process group, with their optimizer fused into backward.

Only the tables go through DistributedModelParallel, built with init_data_parallel=False:
DeepSpeed owns the dense model, and TorchRec must not wrap anything else in DDP. The optimizer
(row-wise Adagrad or Adagrad, lr from the config) is attached in backward
before sharding, so the sharder fuses it into FBGEMM's kernel: a sharded table steps during
backward, touching only the rows that were looked up, and needs no optimizer.step() call.
A data-parallel (replicated) table is the exception: TorchRec keeps it as a plain weight inside
its own DDP and leaves its optimizer to the caller. A comm hook on that DDP steps the same
optimizer right after the gradient all-reduce, so every table steps in backward and the
trainer never calls step() for any of them.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.config import EmbeddingsConfig
from embeddings.plan import plan_tables, sharders_for
from embeddings.tables import build_tables

_OPTIMIZERS = {"row_wise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad}


class _ReplicatedStep:
    """Comm-hook state: the process group and each flat replicated weight's optimizer."""

    def __init__(self, pg: dist.ProcessGroup):
        self.pg = pg
        self.optimizers: dict[nn.Parameter, torch.optim.Optimizer] = {}


def _allreduce_then_step(state: _ReplicatedStep,
                         bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the bucket's gradients, step their optimizers, hand back zeros.

    DDP's own optimizer-in-backward hook needs an accelerator stream, so this one does the same
    synchronously; the all-reduce blocks inside backward, which every rank runs alike. The
    gradient is used up by the step, so the bucket (which DDP copies into .grad) is zeroed and
    the next backward starts from nothing, as a fused table's does. On one rank there is
    nothing to average, and no collective is issued.
    """
    buffer = bucket.buffer()
    if dist.get_world_size(state.pg) > 1:
        dist.all_reduce(buffer, group=state.pg)
        buffer.div_(dist.get_world_size(state.pg))
    for flat, grad in zip(bucket.parameters(), bucket.gradients()):
        flat.grad = grad
        state.optimizers[flat].step()
    buffer.zero_()
    done = torch.futures.Future()
    done.set_result(buffer)
    return done


class ShardedTables(nn.Module):
    """`forward(kjt) -> pooled [B*T, E_app + E_loc]` for this rank's batch; every rank calls it.

    `plan` is TorchRec's ShardingPlan, `placements` the same as plain values per table.
    `optimizer` is a keyed view of every table's in-backward optimizer (never step() it: the
    tables step in backward). `state_dict()` is weights and optimizer state together, flat,
    as embeddings.checkpoint saves them.
    """

    def __init__(self, cfg: EmbeddingsConfig, pg: dist.ProcessGroup, device: torch.device):
        super().__init__()
        # materialised shard by shard on `device`: each rank allocates and initialises its own only
        tables = build_tables(cfg, device="meta", world_size=dist.get_world_size(pg))
        # torch's (TorchRec 1.8 deprecates its own wrapper in favour of it); the sharder reads
        # the optimizer class and kwargs it leaves on each weight and fuses them.
        _apply_optimizer_in_backward(_OPTIMIZERS[cfg.optimizer], tables.parameters(),
                                     {"lr": cfg.lr, "eps": cfg.eps})
        sharders = sharders_for(cfg)
        self.planned = plan_tables(cfg, dist.get_world_size(pg), device.type, sharders, pg)
        self.plan = self.planned.sharding_plan
        self.placements = self.planned.placements
        self.dmp = DistributedModelParallel(
            tables, env=ShardingEnv.from_process_group(pg), device=device, plan=self.plan,
            sharders=sharders, init_data_parallel=False)
        keyed = [("", self.dmp.fused_optimizer)]
        # Fused weights carry their fused optimizer; the others are replicated tables' weights:
        # [rows, dim] views into one flat weight that TorchRec's own DDP all-reduces. That DDP
        # sits in the sharded collection's lookups, a plain list TorchRec 1.8 does not register
        # as submodules, so it is only reachable through the private `_lookups`.
        replicated = {name: param for name, param in self.dmp.named_parameters()
                      if not hasattr(param, "_in_backward_optimizers")}
        for ddp in self._lookups():
            if not isinstance(ddp, DistributedDataParallel):
                continue
            step = _ReplicatedStep(pg)
            for flat in ddp.parameters():
                views = {name: view for name, view in replicated.items()
                         if view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()}
                # Row-wise state needs [rows, dim], so the optimizer sees the per-table views;
                # their .grad reads the flat weight's gradient.
                step.optimizers[flat] = _OPTIMIZERS[cfg.optimizer](
                    list(views.values()), lr=cfg.lr, eps=cfg.eps)
                keyed.append(("", KeyedOptimizer(views, step.optimizers[flat].state,
                                                 step.optimizers[flat].param_groups)))
            ddp.register_comm_hook(step, _allreduce_then_step)
        self.optimizer = CombinedOptimizer(keyed)

    def _lookups(self) -> list[nn.Module]:
        """The sharded collection's lookups (with collision=zch, those of the collection inside
        the managed-collision one)."""
        sharded = self.dmp.module
        return getattr(sharded, "_embedding_module", sharded)._lookups

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.dmp(kjt)  # with collision=zch: (pooled, remapped ids or None)
        pooled = pooled[0] if isinstance(pooled, tuple) else pooled
        return pooled.values()  # [B*T, E_app + E_loc], app columns first

    def uvm_cache_counts(self) -> dict[str, float]:
        """This rank's UVM-cached (fused_uvm_caching) lookups since the start, from FBGEMM's
        cache statistics: `uvm_cache_unique_ids` (distinct rows a batch asked for, summed over
        batches) and `uvm_cache_unique_misses` (those not in the HBM cache); the hit rate is
        1 - misses / ids. Empty when no table is UVM-cached (their kernels gather nothing)."""
        if not self.planned.uvm_cache_stats:
            return {}
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            SplitTableBatchedEmbeddingBagsCodegen, UVMCacheStatsIndex)

        ids = misses = 0.0
        for lookup in self._lookups():
            for kernel in lookup.modules():
                if (isinstance(kernel, SplitTableBatchedEmbeddingBagsCodegen)
                        and kernel.gather_uvm_cache_stats and kernel.lxu_cache_weights.numel()):
                    stats = kernel.get_uvm_cache_stats().tolist()
                    ids += stats[UVMCacheStatsIndex.num_unique_indices]
                    misses += stats[UVMCacheStatsIndex.num_unique_misses]
        return {"uvm_cache_unique_ids": ids, "uvm_cache_unique_misses": misses}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor: `tables.<param>` and `optimizer.<param>.<slot>`, for DCP.

        Sharded entries are ShardedTensor holding this rank's shards; all are views of the
        live state, so DCP can load into them in place. Tensors only: the optimizer's
        hyperparameters belong to the config.
        """
        state: dict[str, torch.Tensor] = {
            f"tables.{name}": value for name, value in self.dmp.state_dict().items()}
        for param, slots in self.optimizer.state_dict()["state"].items():
            for slot, value in slots.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {param}.{slot} is {type(value).__name__}, "
                                    f"not a tensor")
                state[f"optimizer.{param}.{slot}"] = value
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores what `state_dict()` gave, under the same sharding plan."""
        self.dmp.load_state_dict({name.removeprefix("tables."): value
                                  for name, value in state.items() if name.startswith("tables.")})
        optim_state = self.optimizer.state_dict()
        for param, slots in optim_state["state"].items():
            for slot in slots:
                slots[slot] = state[f"optimizer.{param}.{slot}"]
        self.optimizer.load_state_dict(optim_state)
