"""Typed settings of the U-MASK model: sizes of U-SCOPE and the DiT, diffusion, masks, losses.

Plain dataclasses (no omegaconf import: umask/ depends on torch only); trainer/config.py
composes them into the run config, and configs/model/*.yaml name the sizes.
"""
from dataclasses import dataclass


@dataclass
class ModelConfig:
    size: str = "tiny"  # the name of the preset in configs/model/ that set these numbers
    hidden: int = 64  # DiT width
    depth: int = 2  # DiT blocks
    heads: int = 4
    user_dim: int = 32  # z_u

    def problems(self) -> list[tuple[str, str]]:
        out = [(k, "must be positive") for k in ("hidden", "depth", "heads", "user_dim")
               if getattr(self, k) <= 0]
        if self.heads > 0 and self.hidden % self.heads:
            out.append(("heads", f"must divide hidden ({self.hidden})"))
        return out
