"""The self key of mode evidence_keys with include_self: one extra softmax term per target.

A target query sees the evidence keys plus its own key. Both paths attend to the evidence
keys with a fused kernel and treat the own key as a single extra term: the CPU path merges
it into the kernel's output through the log-sum-exp, the Triton forward folds it into its
online softmax, and both take its gradient here, elementwise in O(N*D) per head (inside
the Triton dQ kernel it pushed D=64/128 tiles into register spills).
"""
import torch


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def self_scores(q: torch.Tensor, k: torch.Tensor, evidence: torch.Tensor, scale: float) -> torch.Tensor:
    """[B,H,N]: each target query's score against its own key; -inf for evidence queries,
    whose own key is already one of the evidence keys."""
    acc = accumulation_dtype(q)
    scores = (q.to(acc) * k.to(acc)).sum(-1) * scale
    return scores.masked_fill(evidence[:, None, :], float("-inf"))


def self_key_gradients(dout, q, k, v, out, lse, evidence, scale):
    """(dq, dk, dv) [B,H,N,D] in float32 (float64 for float64 inputs): the self term's share.

    P_ii = exp(s_ii - lse_i) with the full row's lse, dS_ii = P_ii (dO_i.v_i - dO_i.O_i).
    """
    acc = accumulation_dtype(q)
    p_self = torch.exp(self_scores(q, k, evidence, scale) - lse.to(acc))  # [B,H,N], 0 off targets
    dout = dout.to(acc)
    delta = (dout * out.to(acc)).sum(-1)  # rowsum(dO * O), as in the flash backward
    ds_self = p_self * ((dout * v.to(acc)).sum(-1) - delta)
    return (scale * ds_self[..., None] * k.to(acc), scale * ds_self[..., None] * q.to(acc),
            p_self[..., None] * dout)
