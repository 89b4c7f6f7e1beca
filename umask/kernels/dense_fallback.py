"""Dense masked attention in plain torch: the CUDA path for inputs with no shipped kernel.

The Triton kernels ship for fp16/bf16 and D in {64, 128} (triton_attention.SHIPPED_*); a
model with another head dim, or in fp32 or fp64, still runs on a GPU through this path,
which materialises the [B,H,N,N] scores in fp32 (fp64 for fp64 inputs) and so costs
O(N^2) memory. Same (out, lse) contract as cpu.py.
"""
import math

import torch

from umask.kernels.reference import allowed_keys, key_bias_per_key
from umask.kernels.self_key import accumulation_dtype


def _probabilities(q, k, evidence, mode, key_bias, include_self):
    """(P [B,H,N,N] fp32 (fp64 for fp64 inputs) with empty rows 0, lse [B,H,N], +inf on empty rows)."""
    acc = accumulation_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale  # [B,H,N,N]
    if mode == "bias":
        scores = scores + key_bias_per_key(evidence, key_bias.to(acc))[:, :, None, :]
    scores = scores.masked_fill(~allowed_keys(evidence, mode, include_self)[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # empty row: exp(s - inf) = 0
    return torch.exp(scores - lse[..., None]), lse


def forward(q, k, v, evidence, mode, key_bias, include_self):
    p, lse = _probabilities(q, k, evidence, mode, key_bias, include_self)
    return (p @ v.to(p.dtype)).to(q.dtype), lse


def backward(dout, q, k, v, out, lse, evidence, mode, key_bias, include_self):
    scale = 1.0 / math.sqrt(q.shape[-1])
    p, _ = _probabilities(q, k, evidence, mode, key_bias, include_self)
    acc = p.dtype
    dout = dout.to(acc)
    dv = p.transpose(-1, -2) @ dout
    delta = (dout * out.to(acc)).sum(-1, keepdim=True)  # [B,H,N,1]
    ds = p * (dout @ v.to(acc).transpose(-1, -2) - delta)  # [B,H,N,N]
    dq, dk = scale * ds @ k.to(acc), scale * ds.transpose(-1, -2) @ q.to(acc)
    dkey_bias = None
    if mode == "bias":
        ds_per_key = ds.sum(2)  # [B,H,N]
        ev = evidence[:, None, :].to(acc)
        dkey_bias = torch.stack([(ds_per_key * ev).sum((0, 2)), (ds_per_key * (1 - ev)).sum((0, 2))], -1)
        dkey_bias = dkey_bias.to(key_bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dkey_bias
