"""The self key of mode evidence_keys with include_self: one extra softmax term per target.

A target query sees the evidence keys plus its own key. Both paths attend to the evidence
keys with a fused kernel and treat the own key as a single extra term: the CPU path merges
it into the kernel's output through the log-sum-exp, the Triton forward folds it into its
online softmax, and both add its gradient here, elementwise in O(N*D) per head (inside
the Triton dQ kernel it pushed D=64/128 tiles into register spills).
"""
import torch


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def self_scores(q: torch.Tensor, k: torch.Tensor, evidence: torch.Tensor, scale: float) -> torch.Tensor:
    """[B,H,N]: each target query's score against its own key; -inf for evidence queries,
    whose own key is already one of the evidence keys."""
    acc = accumulation_dtype(q)
    scores = torch.linalg.vecdot(q.to(acc), k.to(acc)) * scale
    return scores.masked_fill(evidence[:, None, :], float("-inf"))


def add_self_key_gradients(dq, dk, dv, dout, q, k, v, out, lse, evidence, scale) -> None:
    """Add the self term's share to dq, dk, dv [B,H,N,D] in place.

    P_ii = exp(s_ii - lse_i) with the full row's lse, dS_ii = P_ii dO_i.(v_i - O_i).
    """
    acc = accumulation_dtype(q)
    p_self = torch.exp(self_scores(q, k, evidence, scale) - lse.to(acc))  # [B,H,N], 0 off targets
    ds_self = p_self * torch.linalg.vecdot(dout.to(acc), (v.to(acc) - out.to(acc)))
    coefficient = (scale * ds_self)[..., None]  # [B,H,N,1]
    dq.addcmul_(coefficient, k)
    dk.addcmul_(coefficient, q)
    dv.addcmul_(p_self[..., None], dout)
