"""The app and location tables as one TorchRec EmbeddingBagCollection, sized from the config.

One table per id key ("app" reads the "app" bags, "loc" the "loc" bags); each slot's bag is
pooled (sum or mean) into one vector. The pooled output is [B*T, E_app + E_loc], app columns
first; the trainer reshapes it to [B, T, E].

With collision=zch the collection is TorchRec's ManagedCollisionEmbeddingBagCollection: each
table's MCHManagedCollisionModule gives every raw id a row of its own while rows are free, and
every zch_eviction_interval batches frees the rows of the least frequently seen ids
(DistanceLFU_EvictionPolicy), instead of hashing ids onto shared rows.
"""
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from embeddings.config import EmbeddingsConfig

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_configs(cfg: EmbeddingsConfig) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=name, feature_names=[name], num_embeddings=table.num_embeddings,
                           embedding_dim=table.dim, pooling=_POOLING[cfg.pooling])
        for name, table in cfg.tables().items()
    ]


def build_tables(cfg: EmbeddingsConfig, device: torch.device | str = "cpu", world_size: int = 1) -> nn.Module:
    """The unsharded collection; on device "meta" it holds no memory, ready for sharding.

    An EmbeddingBagCollection, or with collision=zch a ManagedCollisionEmbeddingBagCollection
    whose managed-collision modules have one bucket per rank of `world_size` (TorchRec shards
    them row-wise, a whole number of buckets per rank)."""
    device = torch.device(device)
    configs = table_configs(cfg)
    tables = EmbeddingBagCollection(tables=configs, device=device)
    if not cfg.zch():
        return tables
    from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
    from torchrec.modules.mc_modules import (DistanceLFU_EvictionPolicy, MCHManagedCollisionModule,
                                             ManagedCollisionCollection)

    managed = {config.name: MCHManagedCollisionModule(
        zch_size=config.num_embeddings, device=device, eviction_policy=DistanceLFU_EvictionPolicy(),
        eviction_interval=cfg.zch_eviction_interval, buckets=world_size) for config in configs}
    return ManagedCollisionEmbeddingBagCollection(tables, ManagedCollisionCollection(managed, configs))


def pooled_dim(cfg: EmbeddingsConfig) -> int:
    """E = E_app + E_loc, the width of the pooled output."""
    return sum(table.dim for table in cfg.tables().values())
