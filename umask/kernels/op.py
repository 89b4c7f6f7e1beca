"""The public mask-guided attention op, registered with torch.library.

`mask_guided_attention` checks its arguments, then calls the custom op
`umask::mask_guided_attention_fwd`, whose autograd formula is the custom op
`umask::mask_guided_attention_bwd`. Both pick their implementation by device: the Triton
kernels (triton_attention.py) for CUDA tensors with a shipped head dim (64, 128) and dtype
(fp16, bf16), dense masked attention (dense_fallback.py) for other CUDA inputs, the compacted flash path
(cpu.py) for CPU tensors. Being opaque custom ops with fake (meta) implementations, they keep
`torch.compile` of the model in one graph.
"""
from typing import Optional

import torch

from umask.kernels import cpu, dense_fallback
from umask.kernels.reference import MODES


def _implementation(q: torch.Tensor):
    if q.device.type == "cpu":
        return cpu
    if q.device.type == "cuda":
        try:
            from umask.kernels import triton_attention
        except ImportError as err:
            raise RuntimeError("mask_guided_attention on CUDA needs triton (the `kernels` extra)") from err
        if q.shape[-1] in triton_attention.SHIPPED_HEAD_DIMS and q.dtype in triton_attention.SHIPPED_DTYPES:
            return triton_attention
        return dense_fallback
    raise RuntimeError(f"mask_guided_attention runs on cpu or cuda tensors, got {q.device}")


@torch.library.custom_op("umask::mask_guided_attention_fwd", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, evidence: torch.Tensor, mode: str,
                key_bias: Optional[torch.Tensor], include_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _implementation(q).forward(q, k, v, evidence, mode, key_bias, include_self)


@_forward_op.register_fake
def _(q, k, v, evidence, mode, key_bias, include_self):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("umask::mask_guided_attention_bwd", mutates_args=())
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, evidence: torch.Tensor, mode: str, key_bias: Optional[torch.Tensor],
                 include_self: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dkey_bias = _implementation(q).backward(
        dout.contiguous(), q, k, v, out, lse, evidence, mode, key_bias, include_self)
    # a custom op cannot return None: an empty tensor stands for "no key_bias"
    return dq, dk, dv, dkey_bias if dkey_bias is not None else q.new_empty(0)


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, evidence, mode, key_bias, include_self):
    dkey_bias = torch.empty_like(key_bias) if key_bias is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dkey_bias


def _setup_context(ctx, inputs, output):
    q, k, v, evidence, mode, key_bias, include_self = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, evidence, key_bias)
    ctx.mode, ctx.include_self = mode, include_self
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, evidence, key_bias = ctx.saved_tensors
    dq, dk, dv, dkey_bias = _backward_op(dout, q, k, v, out, lse, evidence, ctx.mode, key_bias, ctx.include_self)
    return dq, dk, dv, None, None, dkey_bias if key_bias is not None else None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check(q, k, v, evidence, mode, key_bias):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B,H,N,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, n, _ = q.shape
    if evidence.dtype != torch.bool or tuple(evidence.shape) != (b, n):
        raise ValueError(f"evidence must be a bool tensor [B,N] = [{b},{n}], got {evidence.dtype} "
                         f"{tuple(evidence.shape)}")
    if len({q.device, k.device, v.device, evidence.device}) != 1:
        raise ValueError("q, k, v and evidence must be on one device")
    if mode == "bias":
        if key_bias is None or tuple(key_bias.shape) != (h, 2) or key_bias.device != q.device:
            raise ValueError(f"mode 'bias' needs key_bias [H,2] = [{h},2] on {q.device}, got "
                             f"{None if key_bias is None else tuple(key_bias.shape)}")
    elif key_bias is not None:
        raise ValueError(f"key_bias is only used by mode 'bias', not {mode!r}")


def mask_guided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, evidence: torch.Tensor, mode: str,
                          key_bias: Optional[torch.Tensor] = None, include_self: bool = True) -> torch.Tensor:
    """Softmax attention steered by the evidence mask; q, k, v [B,H,N,D] -> out [B,H,N,D].

    evidence [B,N] bool marks the evidence (observed, clean) tokens; the others are targets.
    Scores are q.k / sqrt(D). Modes:
      "evidence_keys":   every query attends to the evidence keys, plus its own key when
                         include_self (the default, which guarantees a non-empty row).
      "evidence_causal": evidence queries attend to evidence keys only (clean tokens never
                         read noisy ones); target queries attend to every key.
      "bias":            every query attends to every key, with key_bias[h, 0] added to
                         scores of evidence keys and key_bias[h, 1] to those of target keys;
                         key_bias [H,2] is a learned parameter and receives a gradient.
    include_self only matters for "evidence_keys" (in the other modes every query already
    sees its own key). A row with no allowed key outputs 0 (no NaN, zero gradient).

    Any token order is correct; evidence-first order (sorting.evidence_first_permutation)
    is fast, because then the allowed keys of a sample are a prefix and whole key tiles are
    skipped. Differentiable in q, k, v and key_bias; float32, float16, bfloat16 and
    float64. CPU tensors take the compacted-flash path; CUDA tensors the Triton kernels
    for fp16/bf16 with D in {64, 128}, else dense masked attention.
    """
    _check(q, k, v, evidence, mode, key_bias)
    out, _ = _forward_op(q.contiguous(), k.contiguous(), v.contiguous(), evidence.contiguous(), mode,
                         key_bias, include_self)
    return out
