"""Float64 oracle of mask-guided attention: the definition every fast path is tested against.

It materialises the [B,H,N,N] scores on purpose; it is for tests and gradcheck, never for
training. Rows with no allowed key output 0 (softmax of an empty set is defined as 0 here).
"""
import math

import torch

MODES = ("evidence_keys", "evidence_causal", "bias")


def allowed_keys(evidence: torch.Tensor, mode: str, include_self: bool = True) -> torch.Tensor:
    """[B,N,N] bool: allowed[b, i, j] says whether query i may attend to key j.

    evidence_keys:   j is evidence, or j == i when include_self.
    evidence_causal: evidence queries see evidence keys; target queries see every key.
    bias:            every key (the mask acts through the bias instead).
    """
    b, n = evidence.shape
    key_is_evidence = evidence[:, None, :].expand(b, n, n)  # [B,N(q),N(k)]
    if mode == "evidence_keys":
        if not include_self:
            return key_is_evidence.clone()
        return key_is_evidence | torch.eye(n, dtype=torch.bool, device=evidence.device)
    if mode == "evidence_causal":
        return key_is_evidence | ~evidence[:, :, None]
    if mode == "bias":
        return torch.ones(b, n, n, dtype=torch.bool, device=evidence.device)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def key_bias_per_key(evidence: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """[B,H,N]: key_bias[h, 0] on evidence keys, key_bias[h, 1] on generated keys."""
    # [H,2] -> [B,H,N] by choosing the column with the key's kind
    return torch.where(evidence[:, None, :], key_bias[None, :, 0, None], key_bias[None, :, 1, None])


def mask_guided_attention_reference(q, k, v, evidence, mode, key_bias=None, include_self=True):
    """Same contract as `umask.kernels.mask_guided_attention`, computed in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B,H,N,N]
    if mode == "bias":
        scores = scores + key_bias_per_key(evidence, key_bias.double())[:, :, None, :]
    allowed = allowed_keys(evidence, mode, include_self)[:, None]  # [B,1,N,N]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows: NaN -> 0
    return probs @ v
