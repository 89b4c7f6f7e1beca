"""The app and location tables as one TorchRec EmbeddingBagCollection, sized from the config.

One table per id key ("app" reads the "app" bags, "loc" the "loc" bags); each slot's bag is
pooled (sum or mean) into one vector. The pooled output is [B*T, E_app + E_loc], app columns
first; the trainer reshapes it to [B, T, E].
"""
import torch
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


def build_tables(cfg: EmbeddingsConfig, device: torch.device | str = "cpu") -> EmbeddingBagCollection:
    """The unsharded collection; on device "meta" it holds no memory, ready for sharding."""
    return EmbeddingBagCollection(tables=table_configs(cfg), device=torch.device(device))


def pooled_dim(cfg: EmbeddingsConfig) -> int:
    """E = E_app + E_loc, the width of the pooled output."""
    return sum(table.dim for table in cfg.tables().values())
