"""Where each table lives: the TorchRec sharding plan, constrained per table by the config.

`check_sharding_types(cfg, device_type)` is pure and imports no TorchRec, so the driver calls
it before any worker starts: a config that asks for a sharding type or compute kernel this
hardware cannot run (row-wise and UVM caching need CUDA) fails there with the table, what was
asked for and what is on offer, instead of deep inside the planner on every worker.
`plan_tables` runs the real planner (TorchRec imported inside it, for the same reason) and
returns its plan with the planner's memory estimate per shard and the memory it had per rank;
`describe_plan` turns the result into plain values, and `plan_lines` into the lines printed at
the start of a run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
# every sharded kind keeps its rows in the table's FBGEMM kernel (embeddings.<table>.compute_kernel:
# fused, or fused_uvm_caching on GPU), whose optimizer runs in backward.
_KERNEL = {"data_parallel": "dense"}


def check_sharding_types(cfg: EmbeddingsConfig, device_type: str) -> dict[str, list[str]]:
    """Per table, the sharding types the planner may choose on `device_type` ("cpu" or "cuda").

    Raises UserError naming the table and key for a sharding type or compute kernel that
    `device_type` cannot run (row-wise and fused_uvm_caching need CUDA)."""
    if device_type not in AVAILABLE_SHARDING_TYPES:
        raise UserError(f"embeddings: no sharding support for device type {device_type!r}; "
                        f"use one of {sorted(AVAILABLE_SHARDING_TYPES)}")
    available = list(AVAILABLE_SHARDING_TYPES[device_type])
    allowed = {}
    for name, table in cfg.tables().items():
        if table.compute_kernel == "fused_uvm_caching" and device_type != "cuda":
            raise UserError(
                f"embeddings.{name}.compute_kernel: fused_uvm_caching keeps the table in host memory "
                f"and caches its hot rows in GPU memory (HBM); it needs CUDA GPUs (ray.use_gpu=true), "
                f"and on {device_type} the whole shard is in host memory already: use fused")
        if table.collision == "zch" and device_type != "cuda":
            raise UserError(
                f"embeddings.{name}.collision: zch (TorchRec's managed collisions) shards row_wise "
                f"only, which TorchRec 1.8 offers on CUDA GPUs alone (ray.use_gpu=true); on "
                f"{device_type} use collision=hash")
        requested = list(table.sharding_types) or available
        if table.collision == "zch":  # TorchRec shards the managed-collision modules row-wise only
            if table.sharding_types and "row_wise" not in table.sharding_types:
                raise UserError(f"embeddings.{name}.sharding_types: {requested} with collision=zch; "
                                f"managed-collision tables shard row_wise only")
            requested = ["row_wise"]
        if not table.sharding_types and name in replicated(cfg):
            requested = ["data_parallel"]
        if table.compute_kernel == "fused_uvm_caching":  # a replicated table has no cache
            requested = [t for t in requested if t != "data_parallel"]
        missing = [t for t in requested if t not in available]
        if missing:
            raise UserError(
                f"embeddings.{name}.sharding_types: {missing} cannot run on {device_type} "
                f"(asked for {requested}); available on {device_type}: {available}"
                + (". Row-wise sharding needs CUDA GPUs." if device_type == "cpu" else ""))
        allowed[name] = requested
    return allowed


def table_bytes(cfg: EmbeddingsConfig, name: str) -> int:
    """Bytes of one whole table: fp32 rows plus the optimizer's state (one fp32 per row for
    row-wise Adagrad, one per element for Adagrad)."""
    table = cfg.tables()[name]
    state = table.num_embeddings * (1 if cfg.optimizer == "row_wise_adagrad" else table.dim)
    return 4 * (table.num_embeddings * table.dim + state)


def replicated(cfg: EmbeddingsConfig) -> list[str]:
    """The tables planned data_parallel (a whole copy on every rank) by the size rule.

    A table is replicated when it asks for no sharding type, is hashed (zch shards row-wise)
    with the fused kernel (a UVM cache needs a sharded table), and its rows and optimizer
    state take at most embeddings.replicate_max_mb MB and at most the memory each rank offers
    the planner (planner_memory_gb less planner_reserved_share, when set). Why: a sharded
    table costs three all-to-alls per step whatever its size (ids, pooled vectors, their
    gradients), each a rendezvous of all ranks; a replicated one costs a dense all-reduce and a
    dense optimizer step of the whole table, proportional to its size (0.4 ms for a 0.26 MB
    all-reduce on 2 gloo ranks here, 30 ms for 25.6 MB, and 190 ms for a row-wise Adagrad step
    of 200,000 x 32 rows under load; docs/training.md). Small tables are cheaper replicated.
    """
    limit = cfg.replicate_max_mb * 2**20
    if cfg.planner_memory_gb:
        limit = min(limit, cfg.planner_memory_gb * 2**30 * (1 - cfg.planner_reserved_share))
    return [name for name, table in cfg.tables().items()
            if not table.sharding_types and table.collision == "hash" and table.compute_kernel == "fused"
            and table_bytes(cfg, name) <= limit]


@dataclass(frozen=True)
class TablePlacement:
    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]  # one per shard; a data-parallel table is on every rank
    shard_dims: tuple[int, ...]  # columns per shard, in shard order
    shard_rows: tuple[int, ...] = ()  # rows per shard, in shard order
    # The planner's estimate per shard, in bytes of device memory (HBM on GPU, RAM on CPU)
    # and of host memory (a UVM-cached table's rows; equal to shard_device_bytes on CPU): the
    # rows, their optimizer state and the lookups' working memory. Empty for a plan made
    # elsewhere (TorchRec's planner called directly).
    shard_device_bytes: tuple[int, ...] = ()
    shard_host_bytes: tuple[int, ...] = ()


def _estimate_stats():
    """A TorchRec planner Stats that keeps the chosen plan's storage estimate per table and shard."""
    from torchrec.distributed.planner.types import Stats

    class EstimateStats(Stats):
        def __init__(self):
            self.by_table: dict[str, list[tuple[int, int, int]]] = {}  # table -> [(rank, hbm, ddr)]

        def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals,
                num_plans, run_time, best_plan, *args, **kwargs) -> None:
            for option in best_plan:
                self.by_table[option.name] = [(shard.rank, shard.storage.hbm, shard.storage.ddr)
                                              for shard in option.shards]

    return EstimateStats()


@dataclass(frozen=True)
class PlannedTables:
    """The plan of the tables and what the planner knew when it made it."""
    sharding_plan: ShardingPlan  # TorchRec's, for DistributedModelParallel
    placements: dict[str, TablePlacement]  # per table: where it went and its estimated memory
    device_type: str
    rank_memory_bytes: int  # per rank: embeddings.planner_memory_gb, or TorchRec's default
    rank_available_bytes: int  # of it, what the planner could fill (less the reserved share)
    uvm_cache_stats: bool = field(default=False)  # the sharder gathers UVM cache statistics


def sharders_for(cfg: EmbeddingsConfig) -> list[ModuleSharder]:
    """The sharders planning and DistributedModelParallel use: one EmbeddingBagCollectionSharder,
    told to gather FBGEMM's UVM cache statistics when a table is UVM-cached; with collision=zch
    TorchRec's managed-collision sharder around it."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    caching = any(t.compute_kernel == "fused_uvm_caching" for t in cfg.tables().values())
    tables = EmbeddingBagCollectionSharder(fused_params={"gather_uvm_cache_stats": True} if caching else None)
    if not cfg.zch():
        return [tables]
    from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder

    return [ManagedCollisionEmbeddingBagCollectionSharder(ebc_sharder=tables)]


def plan_tables(cfg: EmbeddingsConfig, world_size: int, device_type: str,
                sharders: list[ModuleSharder], pg: Optional[dist.ProcessGroup] = None) -> PlannedTables:
    """The sharding plan of `build_tables(cfg)` over `world_size` ranks, with its memory estimates.

    With a process group every rank must call it: rank 0 plans and broadcasts, so all ranks
    shard alike (and all raise the same UserError when nothing fits). `sharders` must be the
    ones later given to DistributedModelParallel. A UVM-cached table (compute_kernel
    fused_uvm_caching) gets TorchRec's CacheParams with the table's cache_load_factor.
    """
    import torch.distributed as dist
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import (KernelConfig, PlannerError, TopologyFactory,
                                                    TrainerConfig)
    from torchrec.distributed.types import CacheParams

    from embeddings.tables import build_tables

    allowed = check_sharding_types(cfg, device_type)
    constraints = {}
    for name, table in cfg.tables().items():
        kernels = sorted({_KERNEL.get(t, table.compute_kernel) for t in allowed[name]})
        caching = table.compute_kernel == "fused_uvm_caching"
        constraints[name] = ParameterConstraints(
            sharding_types=allowed[name], compute_kernels=kernels,
            min_partition=table.column_shard_dim or None,
            cache_params=CacheParams(load_factor=table.cache_load_factor) if caching else None)
    memory = int(cfg.planner_memory_gb * 2**30) or None  # None: TorchRec's default
    memory_cap = {"hbm_cap_bytes" if device_type == "cuda" else "ddr_cap_bytes": memory}
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, **memory_cap),
        kernel_config=KernelConfig(compute_device=device_type))
    # The tables are the only module planned here (DeepSpeed owns the dense model), so the
    # reservation is a plain share of memory, not TorchRec's guess at dense tensor sizes.
    reservation = FixedPercentageStorageReservation(cfg.planner_reserved_share)
    estimates = _estimate_stats()
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, debug=False,
                                       storage_reservation=reservation, stats=[estimates])
    module = build_tables(cfg, device="meta", world_size=world_size)
    # Rank 0 plans and sends the plan, or its failure, to the others: like TorchRec's
    # collective_plan, but a failure must not leave the other ranks waiting for a plan.
    outcome: list = [None]
    if pg is None or dist.get_rank(pg) == 0:
        try:
            plan = planner.plan(module, sharders)
            memory_kind = "hbm" if device_type == "cuda" else "ddr"
            outcome = [PlannedTables(
                sharding_plan=plan, placements=describe_plan(plan, estimates.by_table, device_type),
                device_type=device_type,
                rank_memory_bytes=getattr(topology.devices[0].storage, memory_kind),
                rank_available_bytes=getattr(
                    reservation.last_reserved_topology.devices[0].storage, memory_kind),
                uvm_cache_stats=any(t.compute_kernel == "fused_uvm_caching"
                                    for t in cfg.tables().values()))]
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


def describe_plan(plan: ShardingPlan, estimates: dict[str, list[tuple[int, int, int]]] | None = None,
                  device_type: str = "cpu") -> dict[str, TablePlacement]:
    """table name -> where it went, for logs and tests.

    estimates: the planner's storage per table and shard, [(rank, hbm bytes, ddr bytes)] in
    the shards' order; without it the placements carry no memory estimate."""
    out = {}
    for module_plan in plan.plan.values():
        for table, sharding in module_plan.items():
            shards = sharding.sharding_spec.shards if sharding.sharding_spec is not None else []
            storage = (estimates or {}).get(table, [])
            device = [hbm if device_type == "cuda" else ddr for _, hbm, ddr in storage]
            out[table] = TablePlacement(
                sharding_type=sharding.sharding_type,
                compute_kernel=sharding.compute_kernel,
                ranks=tuple(sharding.ranks or ()),
                shard_dims=tuple(int(s.shard_sizes[1]) for s in shards),
                shard_rows=tuple(int(s.shard_sizes[0]) for s in shards),
                shard_device_bytes=tuple(device),
                shard_host_bytes=tuple(ddr for _, _, ddr in storage))
    return out


def plan_lines(planned: PlannedTables, cfg: EmbeddingsConfig) -> list[str]:
    """The plan as printed at the start of a run: per table where it went, and why it fits.

    The "why" is the planner's own arithmetic: its memory estimate of each shard against
    what each rank offers it (embeddings.planner_memory_gb, less planner_reserved_share).
    """
    gib = 2**30

    def size(nbytes: int) -> str:
        return f"{nbytes / 2**20:.2f} MiB" if nbytes < gib / 10 else f"{nbytes / gib:.2f} GiB"

    memory = "HBM" if planned.device_type == "cuda" else "RAM"
    source = (f"embeddings.planner_memory_gb={cfg.planner_memory_gb:g}" if cfg.planner_memory_gb
              else "TorchRec's default, embeddings.planner_memory_gb=0")
    # TorchRec's reservation takes its share of HBM only: a CPU rank's RAM is offered whole
    reserved = (f"less planner_reserved_share={cfg.planner_reserved_share:g}"
                if planned.rank_available_bytes < planned.rank_memory_bytes else "none of it reserved")
    lines = []
    per_rank: dict[int, int] = {}
    for name, p in planned.placements.items():
        table = cfg.tables()[name]
        shards = ", ".join(
            f"rank {rank}: {rows:,} x {dims}, ~{size(device)}"
            + (f" {memory} + {size(host)} host" if planned.device_type == "cuda" and host else "")
            for rank, rows, dims, device, host in zip(p.ranks, p.shard_rows, p.shard_dims,
                                                      p.shard_device_bytes, p.shard_host_bytes))
        if p.sharding_type == "data_parallel":
            shards = f"a copy on each of ranks {list(p.ranks)}" + (
                f", ~{size(p.shard_device_bytes[0])} each" if p.shard_device_bytes else "")
            if name in replicated(cfg):
                shards += f" (replicated by size: at most embeddings.replicate_max_mb={cfg.replicate_max_mb:g} MB)"
        for rank, device in zip(p.ranks, p.shard_device_bytes):
            per_rank[rank] = per_rank.get(rank, 0) + device
        lines.append(f"  {name} ({table.num_embeddings:,} x {table.dim}): {p.sharding_type}, "
                     f"kernel {p.compute_kernel}; {shards}")
    header = (f"embedding plan: each {planned.device_type} rank offers the tables "
              f"{planned.rank_available_bytes / gib:.2f} GiB of {memory} ({source}, {reserved})")
    if per_rank:  # one header line for both: a run's opening lines are few (make demo's budget)
        fullest = max(per_rank, key=per_rank.get)
        header += (f"; the fullest, rank {fullest}, is planned ~{size(per_rank[fullest])} "
                   f"({per_rank[fullest] / max(planned.rank_available_bytes, 1):.0%})")
    return [header] + lines
