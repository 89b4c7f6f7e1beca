"""Which network a run trains: U-MASK's diffusion transformer or the learned baseline.

`model.backbone` (umask/config.py) picks it; the trainer, eval, complete and resume build
their model here so that both kinds go through the same path.
"""
from typing import Callable

from torch import Tensor, nn

from umask.config import ModelConfig
from umask.mae import MaskedAutoencoder
from umask.model import UMask, no_extra_negatives
from umask.spec import FeatureSpec


def build_model(cfg: ModelConfig, spec: FeatureSpec, sparse_dim: int, profile_dim: int = 0,
                gather_negatives: Callable[[Tensor], Tensor] = no_extra_negatives) -> nn.Module:
    """UMask (backbone "dit") or MaskedAutoencoder (backbone "mae") sized by cfg and spec;
    sparse_dim: the pooled app + loc embedding width E of slot_sparse [B,T,E]."""
    kind = MaskedAutoencoder if cfg.backbone == "mae" else UMask
    return kind(cfg, spec, sparse_dim, profile_dim, gather_negatives)
