"""Where each table lives: the TorchRec sharding plan, constrained per table by the config.

`check_sharding_types(cfg, device_type)` is pure and imports no TorchRec, so the driver calls
it before any worker starts: a config that asks for a sharding type this hardware cannot run
(row-wise needs CUDA) fails there with the table, the types asked for and the types on offer,
instead of deep inside the planner on every worker. `plan_tables` runs the real planner
(TorchRec imported inside it, for the same reason); `describe_plan` turns its result into
plain values a log line or a test can read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from embeddings.config import SHARDING_TYPES, EmbeddingsConfig
from umask.errors import UserError

if TYPE_CHECKING:
    import torch.distributed as dist
    from torchrec.distributed.types import ModuleSharder, ShardingPlan

# What TorchRec 1.8's planner can place per device type (verified on CPU: row-wise kinds fail
# there with "No available sharding type and compute kernel combination").
AVAILABLE_SHARDING_TYPES = {
    "cpu": ("data_parallel", "table_wise", "column_wise", "table_column_wise"),
    "cuda": SHARDING_TYPES,
}
# A replicated table is updated through DDP's all-reduce, so it keeps a plain (dense) weight;
# every sharded kind keeps its rows in FBGEMM's fused kernel, whose optimizer runs in backward.
_KERNEL = {"data_parallel": "dense"}
_FUSED = "fused"


def check_sharding_types(cfg: EmbeddingsConfig, device_type: str) -> dict[str, list[str]]:
    """Per table, the sharding types the planner may choose on `device_type` ("cpu" or "cuda")."""
    if device_type not in AVAILABLE_SHARDING_TYPES:
        raise UserError(f"embeddings: no sharding support for device type {device_type!r}; "
                        f"use one of {sorted(AVAILABLE_SHARDING_TYPES)}")
    available = list(AVAILABLE_SHARDING_TYPES[device_type])
    allowed = {}
    for name, table in cfg.tables().items():
        requested = list(table.sharding_types) or available
        missing = [t for t in requested if t not in available]
        if missing:
            raise UserError(
                f"embeddings.{name}.sharding_types: {missing} cannot run on {device_type} "
                f"(asked for {requested}); available on {device_type}: {available}"
                + (". Row-wise sharding needs CUDA GPUs." if device_type == "cpu" else ""))
        allowed[name] = requested
    return allowed


@dataclass(frozen=True)
class TablePlacement:
    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]  # one per shard; a data-parallel table is on every rank
    shard_dims: tuple[int, ...]  # columns per shard, in shard order


def plan_tables(cfg: EmbeddingsConfig, world_size: int, device_type: str,
                sharders: list[ModuleSharder], pg: Optional[dist.ProcessGroup] = None) -> ShardingPlan:
    """The sharding plan of `build_tables(cfg)` over `world_size` ranks.

    With a process group every rank must call it: rank 0 plans and broadcasts, so all ranks
    shard alike (and all raise the same UserError when nothing fits). `sharders` must be the
    ones later given to DistributedModelParallel.
    """
    import torch.distributed as dist
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import (KernelConfig, PlannerError, TopologyFactory,
                                                    TrainerConfig)

    from embeddings.tables import build_tables

    allowed = check_sharding_types(cfg, device_type)
    constraints = {}
    for name, table in cfg.tables().items():
        kernels = sorted({_KERNEL.get(t, _FUSED) for t in allowed[name]})
        constraints[name] = ParameterConstraints(
            sharding_types=allowed[name], compute_kernels=kernels,
            min_partition=table.column_shard_dim or None)
    memory = int(cfg.planner_memory_gb * 2**30) or None  # None: TorchRec's default
    memory_cap = {"hbm_cap_bytes" if device_type == "cuda" else "ddr_cap_bytes": memory}
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, **memory_cap),
        kernel_config=KernelConfig(compute_device=device_type))
    # The tables are the only module planned here (DeepSpeed owns the dense model), so the
    # reservation is a plain share of memory, not TorchRec's guess at dense tensor sizes.
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=constraints, debug=False,
        storage_reservation=FixedPercentageStorageReservation(cfg.planner_reserved_share))
    module = build_tables(cfg, device="meta")
    # Rank 0 plans and sends the plan, or its failure, to the others: like TorchRec's
    # collective_plan, but a failure must not leave the other ranks waiting for a plan.
    outcome: list = [None]
    if pg is None or dist.get_rank(pg) == 0:
        try:
            outcome = [planner.plan(module, sharders)]
        except PlannerError as err:
            outcome = [f"embeddings: no sharding plan fits the tables on {world_size} "
                       f"{device_type} rank(s) with the configured constraints {allowed}: "
                       f"{str(err).splitlines()[0].strip()} Allow more sharding types, add "
                       f"ranks, raise embeddings.planner_memory_gb or shrink the tables "
                       f"(num_embeddings, dim)."]
    if pg is not None:
        dist.broadcast_object_list(outcome, src=dist.get_global_rank(pg, 0), group=pg)
    if isinstance(outcome[0], str):
        raise UserError(outcome[0])
    return outcome[0]


def describe_plan(plan: ShardingPlan) -> dict[str, TablePlacement]:
    """table name -> where it went, for logs and tests."""
    out = {}
    for module_plan in plan.plan.values():
        for table, sharding in module_plan.items():
            shards = sharding.sharding_spec.shards if sharding.sharding_spec is not None else []
            out[table] = TablePlacement(
                sharding_type=sharding.sharding_type,
                compute_kernel=sharding.compute_kernel,
                ranks=tuple(sharding.ranks or ()),
                shard_dims=tuple(int(s.shard_sizes[1]) for s in shards))
    return out
