"""Dense masked attention in plain torch: the CUDA path for inputs with no shipped kernel.

The Triton kernels ship for fp16/bf16 and D in {64, 128} (triton_attention.SHIPPED_*); a
model with another head dim or in fp32 still runs on a GPU through this path, which
materialises the [B,H,N,N] scores in fp32 and so costs O(N^2) memory. Same (out, lse)
contract as cpu.py.
"""
import math

import torch

from umask.kernels.reference import allowed_keys, key_bias_per_key


def _probabilities(q, k, evidence, mode, key_bias, include_self):
    """(P [B,H,N,N] fp32 with empty rows 0, lse [B,H,N] with +inf on empty rows)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B,H,N,N]
    if mode == "bias":
        scores = scores + key_bias_per_key(evidence, key_bias.float())[:, :, None, :]
    scores = scores.masked_fill(~allowed_keys(evidence, mode, include_self)[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # empty row: exp(s - inf) = 0
    return torch.exp(scores - lse[..., None]), lse


def forward(q, k, v, evidence, mode, key_bias, include_self):
    p, lse = _probabilities(q, k, evidence, mode, key_bias, include_self)
    return (p @ v.float()).to(q.dtype), lse


def backward(dout, q, k, v, out, lse, evidence, mode, key_bias, include_self):
    scale = 1.0 / math.sqrt(q.shape[-1])
    p, _ = _probabilities(q, k, evidence, mode, key_bias, include_self)
    dout = dout.float()
    dv = p.transpose(-1, -2) @ dout
    delta = (dout * out.float()).sum(-1, keepdim=True)  # [B,H,N,1]
    ds = p * (dout @ v.float().transpose(-1, -2) - delta)  # [B,H,N,N]
    dq, dk = scale * ds @ k.float(), scale * ds.transpose(-1, -2) @ q.float()
    dkey_bias = None
    if mode == "bias":
        ds_per_key = ds.sum(2)  # [B,H,N]
        ev = evidence[:, None, :].float()
        dkey_bias = torch.stack([(ds_per_key * ev).sum((0, 2)), (ds_per_key * (1 - ev)).sum((0, 2))], -1)
        dkey_bias = dkey_bias.to(key_bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dkey_bias
