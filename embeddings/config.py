"""Typed settings of the sparse side: the app and location tables, their sharding and optimizer."""
from dataclasses import dataclass, field

# TorchRec's sharding type names (torchrec.distributed.types.ShardingType values), spelled out
# here so the config validates on a driver that never imports torchrec.
SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise",
                  "row_wise", "table_row_wise", "grid_shard")
POOLINGS = ("sum", "mean")
# FBGEMM compute kernels (torchrec EmbeddingComputeKernel values) a sharded table may ask for:
# "fused" keeps its rows in the device's memory; "fused_uvm_caching" keeps them in host memory
# with the hot rows cached in HBM (GPU only). A data_parallel table is always "dense".
COMPUTE_KERNELS = ("fused", "fused_uvm_caching")
# Raw id -> row: "hash" is the spec's splitmix64 mod rows (umask.spec.table_rows); "zch" is
# TorchRec's managed collisions (zero-collision hashing: ids get rows of their own, evicted LFU).
COLLISIONS = ("hash", "zch")
OPTIMIZERS = ("row_wise_adagrad", "adagrad")


@dataclass
class TableConfig:
    num_embeddings: int = 10_000  # rows; raw ids are hashed into them
    dim: int = 16
    sharding_types: list[str] = field(default_factory=list)  # allowed; empty = any this hardware has
    column_shard_dim: int = 0  # column-wise shard width (must divide dim); 0 = TorchRec's default
    compute_kernel: str = "fused"  # fused | fused_uvm_caching (GPU: rows in host memory, hot ones in HBM)
    cache_load_factor: float = 0.2  # fused_uvm_caching: the share of the table's rows the HBM cache holds
    collision: str = "hash"  # raw id -> row: hash (splitmix64 mod rows) | zch (managed, GPU row_wise only)

    def problems(self) -> list[tuple[str, str]]:
        out = [(k, "must be positive") for k in ("num_embeddings", "dim") if getattr(self, k) <= 0]
        unknown = [t for t in self.sharding_types if t not in SHARDING_TYPES]
        if unknown:
            out.append(("sharding_types", f"unknown {unknown}; choose from {list(SHARDING_TYPES)}"))
        if self.column_shard_dim < 0:
            out.append(("column_shard_dim", "must be 0 (TorchRec's default) or positive"))
        elif self.column_shard_dim and self.dim > 0 and self.dim % self.column_shard_dim:
            out.append(("column_shard_dim", f"must divide dim ({self.dim})"))
        if self.compute_kernel not in COMPUTE_KERNELS:
            out.append(("compute_kernel", f"must be one of {list(COMPUTE_KERNELS)}"))
        elif self.compute_kernel == "fused_uvm_caching" and self.sharding_types == ["data_parallel"]:
            out.append(("compute_kernel", "fused_uvm_caching shards the table: a data_parallel "
                                          "(replicated) table keeps a dense weight"))
        if not 0.0 < self.cache_load_factor <= 1.0:
            out.append(("cache_load_factor", "must be in (0, 1]"))
        if self.collision not in COLLISIONS:
            out.append(("collision", f"must be one of {list(COLLISIONS)}"))
        return out


@dataclass
class EmbeddingsConfig:
    app: TableConfig = field(default_factory=TableConfig)
    loc: TableConfig = field(default_factory=TableConfig)
    pooling: str = "sum"  # how a slot's bag of ids becomes one vector: sum | mean
    optimizer: str = "row_wise_adagrad"  # fused into backward: row_wise_adagrad | adagrad
    lr: float = 0.05
    eps: float = 1e-8  # Adagrad's denominator guard
    # Memory per rank the planner may fill: HBM on GPU, RAM on CPU; 0 = TorchRec's default.
    planner_memory_gb: float = 0.0
    planner_reserved_share: float = 0.15  # of it, left to activations and the dense model
    # A table with no sharding_types asked for, whose rows and optimizer state take at most
    # this many MB, is replicated on every rank (data_parallel): no all-to-all, but a dense
    # all-reduce and optimizer step of the whole table per step (embeddings.plan.replicated).
    replicate_max_mb: float = 2.0
    # collision=zch: every this many training batches the managed-collision modules evict the
    # rows of the least frequently seen ids (LFU, discounted by age) to make room for new ids
    zch_eviction_interval: int = 1000

    def zch(self) -> bool:
        """Whether the tables use TorchRec's managed collisions (collision=zch on every table)."""
        return all(table.collision == "zch" for table in self.tables().values())

    def tables(self) -> dict[str, TableConfig]:
        """The tables by name, in the order of their columns in the pooled output."""
        return {"app": self.app, "loc": self.loc}

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.pooling not in POOLINGS:
            out.append(("pooling", f"must be one of {list(POOLINGS)}"))
        if self.optimizer not in OPTIMIZERS:
            out.append(("optimizer", f"must be one of {list(OPTIMIZERS)}"))
        if self.lr <= 0:
            out.append(("lr", "must be positive"))
        if self.eps <= 0:
            out.append(("eps", "must be positive"))
        if self.planner_memory_gb < 0:
            out.append(("planner_memory_gb", "must be 0 (TorchRec's default) or positive"))
        if not 0.0 <= self.planner_reserved_share < 1.0:
            out.append(("planner_reserved_share", "must be in [0, 1)"))
        if self.replicate_max_mb < 0:
            out.append(("replicate_max_mb", "must be 0 (never replicate on its own) or positive"))
        if self.zch_eviction_interval <= 0:
            out.append(("zch_eviction_interval", "must be positive"))
        collisions = {name: table.collision for name, table in self.tables().items()}
        if len(set(collisions.values())) > 1:  # TorchRec's MC collection manages every table it has
            out.append(("app.collision", f"zch must be set on every table or none (got {collisions}): "
                                         "TorchRec's ManagedCollisionEmbeddingBagCollection manages "
                                         "each table of the collection"))
        return out
