"""Typed settings of the sparse side: the app and location tables, their sharding and optimizer."""
from dataclasses import dataclass, field


@dataclass
class TableConfig:
    num_embeddings: int = 10_000  # rows; raw ids are hashed into them
    dim: int = 16
    sharding_types: list[str] = field(default_factory=list)  # allowed; empty = planner decides

    def problems(self) -> list[tuple[str, str]]:
        return [(k, "must be positive") for k in ("num_embeddings", "dim") if getattr(self, k) <= 0]


@dataclass
class EmbeddingsConfig:
    app: TableConfig = field(default_factory=TableConfig)
    loc: TableConfig = field(default_factory=TableConfig)
    optimizer: str = "row_wise_adagrad"
    lr: float = 0.05

    def problems(self) -> list[tuple[str, str]]:
        return [("lr", "must be positive")] if self.lr <= 0 else []
