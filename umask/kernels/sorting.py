"""Evidence-first token order: sort each sample's tokens once so evidence is contiguous.

The DiT permutes its tokens with `evidence_first_permutation` at the embedder, runs every
block in that order (every op but attention acts per token) and undoes it after the last
block. In that order "evidence keys" is a per-sample prefix of length `evidence.sum(1)`,
which lets the GPU kernel skip whole key tiles and the CPU path gather less.
"""
import torch


def evidence_first_permutation(evidence: torch.Tensor) -> torch.Tensor:
    """perm [B,N] int64 such that evidence.gather(1, perm) is True then False per sample.

    Stable: evidence tokens keep their time order, and so do the others.
    """
    if evidence.dim() != 2 or evidence.dtype != torch.bool:
        raise ValueError(f"evidence must be a bool tensor [B, N], got {evidence.dtype} {tuple(evidence.shape)}")
    return torch.argsort((~evidence).to(torch.uint8), dim=1, stable=True)


def permute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x [B,N,...] -> x[b, perm[b]] [B,N,...]: tokens in the order `perm` gives."""
    index = perm.view(*perm.shape, *([1] * (x.dim() - 2))).expand(*perm.shape, *x.shape[2:])
    return x.gather(1, index)


def unpermute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute_tokens`: x [B,N,...] in perm order -> the original order."""
    index = perm.view(*perm.shape, *([1] * (x.dim() - 2))).expand(*perm.shape, *x.shape[2:])
    return torch.empty_like(x).scatter(1, index, x)
