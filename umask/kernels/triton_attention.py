"""Triton kernels of mask-guided attention for CUDA (written for H100/H200, also sm_80).

FlashAttention-2 style: the forward keeps an online softmax in the exp2 domain with fp32
accumulators and stores the natural-log LSE per query (+inf for a row with no allowed key,
so the backward's P = exp(S - LSE) is 0 there). The backward is a delta = rowsum(dO*O)
pre-pass (one torch line), a dK/dV kernel (one program per key tile) and a dQ kernel (one
program per query tile); nothing N x N is materialised and no atomics are used, so the
gradients are deterministic.

Work follows the allowed keys, not N^2, in evidence-first token order (sorting.py): there
the evidence keys of sample b are the prefix [0, kv_hi[b]), so a query tile that sees only
evidence stops its key loop at kv_hi[b] and visits ceil(kv_hi / BLOCK_N) tiles; a key tile
with no evidence key starts its query loop at the sample's first target (evidence_causal)
or does not loop at all (evidence_keys). A per-sample bound replaces an element mask and a
tile list. Any other order stays correct (the element mask still applies; the bounds just
cover more tiles). A uniform `if` that skipped empty tiles inside the loop cost enough
registers at D=128 to spill, so skipping is by loop bounds only. A target's own key
(evidence_keys with include_self) is one more online-softmax step after the forward loop,
not a diagonal tile; its gradient is added elementwise by self_key.py, so the backward
kernels are compiled for MODE_EVIDENCE_KEYS only.

Modes are compile-time constants (MODE_*). Tile shapes come from `triton.autotune` over the
shipped configurations on a GPU, and are passed explicitly under the interpreter
(TRITON_INTERPRET=1, where autotuning cannot time anything). The interpreter multiplies
bf16 as raw integers (triton#11584), so UPCAST casts tiles to fp32 there.
"""
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from umask.kernels.self_key import add_self_key_gradients

# kernel modes (compile-time); evidence_keys splits on include_self
MODE_EVIDENCE_KEYS = tl.constexpr(0)  # evidence keys only
MODE_EVIDENCE_KEYS_SELF = tl.constexpr(1)  # evidence keys plus the query's own key
MODE_EVIDENCE_CAUSAL = tl.constexpr(2)
MODE_BIAS = tl.constexpr(3)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# What the op sends here on a GPU (each AOT-checked); with tiles passed explicitly, as the
# interpreter tests do, any power-of-two D >= 16 and fp32 run too.
SHIPPED_HEAD_DIMS = (64, 128)
SHIPPED_DTYPES = (torch.float16, torch.bfloat16)


def kernel_mode(mode: str, include_self: bool) -> int:
    if mode == "evidence_keys":
        return (MODE_EVIDENCE_KEYS_SELF if include_self else MODE_EVIDENCE_KEYS).value
    return {"evidence_causal": MODE_EVIDENCE_CAUSAL, "bias": MODE_BIAS}[mode].value


class TileConfig(NamedTuple):
    """One launch configuration: query rows and key columns per tile, warps, pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# The configurations that ship, per GPU generation (compute capability major 9 = Hopper,
# 8 = Ampere/Ada) and head dim. The slow AOT test compiles every one for its architecture
# and checks that none spills registers; the larger tiles that were tried did spill
# (docs/kernels.md lists them), hence 8 warps, 64-row forward tiles at D=128 and narrow
# backward tiles.
SHIPPED_CONFIGS = {
    9: {"forward": {64: [TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 2)],
                    128: [TileConfig(64, 64, 8, 2), TileConfig(64, 64, 8, 3)]},
        "dkdv": {64: [TileConfig(64, 128, 8, 2)], 128: [TileConfig(64, 32, 8, 2)]},
        "dq": {64: [TileConfig(128, 64, 8, 2)], 128: [TileConfig(32, 64, 8, 2)]}},
    8: {"forward": {64: [TileConfig(128, 64, 8, 3)], 128: [TileConfig(64, 64, 8, 2)]},
        "dkdv": {64: [TileConfig(64, 32, 8, 2)], 128: [TileConfig(64, 32, 8, 2)]},
        "dq": {64: [TileConfig(128, 64, 8, 2)], 128: [TileConfig(32, 64, 8, 2)]}},
}

@triton.jit
def _key_extent(KV_HI, b, N, ev_q, row_ok, MODE: tl.constexpr):
    """One past the last key any query of this tile may see: the loop's upper bound."""
    kv_hi = tl.load(KV_HI + b)
    if MODE == MODE_BIAS:
        hi = kv_hi * 0 + N
    elif MODE == MODE_EVIDENCE_CAUSAL:
        has_target = tl.max(((ev_q == 0) & row_ok).to(tl.int32), 0) > 0
        hi = tl.where(has_target, N, kv_hi)
    else:
        hi = kv_hi
    return hi


@triton.jit
def _scores(q, k, ev_q, ev_k, col_ok, key_bias_ev, key_bias_gen, qk_scale,
            MODE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BM,BN] scores in the log2 domain, -inf where the key is not allowed."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    key_is_ev = ev_k != 0  # padding keys load as 0
    if MODE == MODE_BIAS:
        s += tl.where(key_is_ev, key_bias_ev, key_bias_gen)[None, :] * LOG2E
        allowed = col_ok[None, :]
    elif MODE == MODE_EVIDENCE_CAUSAL:
        allowed = (key_is_ev[None, :] | (ev_q == 0)[:, None]) & col_ok[None, :]
    else:
        allowed = key_is_ev[None, :]
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _self_scores(q, k_self, ev_q, row_ok, qk_scale):
    """[BM] each target query's log2-domain score against its own key; -inf elsewhere."""
    s_self = tl.sum(q.to(tl.float32) * k_self.to(tl.float32), 1) * qk_scale
    return tl.where((ev_q == 0) & row_ok, s_self, float("-inf"))


@triton.jit
def _forward_kernel(Q, K, V, EV, KV_HI, KEY_BIAS, OUT, LSE, VISITED, N, H, scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
                    UPCAST: tl.constexpr, COUNT_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qk_scale = scale * LOG2E
    # move the pointers to this (b, h) once, so per-element offsets stay 32-bit (64-bit
    # offset tiles cost enough registers to spill)
    head = bh.to(tl.int64) * N * HEAD_DIM
    Q += head
    K += head
    V += head
    OUT += head
    EV += b.to(tl.int64) * N
    LSE += bh.to(tl.int64) * N
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    rows = offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # [BM,D]
    q = tl.load(Q + rows, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    ev_q = tl.load(EV + offs_m, mask=row_ok, other=1)  # padding rows act as evidence
    key_bias_ev = 0.0
    key_bias_gen = 0.0
    if MODE == MODE_BIAS:
        key_bias_ev = tl.load(KEY_BIAS + h * 2).to(tl.float32)
        key_bias_gen = tl.load(KEY_BIAS + h * 2 + 1).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if MODE == MODE_EVIDENCE_KEYS_SELF:
        # before the loop, so q need not stay in registers for an elementwise product after it
        s_self = _self_scores(q, tl.load(K + rows, mask=row_ok[:, None], other=0.0), ev_q, row_ok, qk_scale)
    hi = _key_extent(KV_HI, b, N, ev_q, row_ok, MODE)
    visited = hi * 0
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        ev_k = tl.load(EV + offs_n, mask=col_ok, other=0)
        cols = offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # [BN,D]
        k = tl.load(K + cols, mask=col_ok[:, None], other=0.0)
        v = tl.load(V + cols, mask=col_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _scores(q, k, ev_q, ev_k, col_ok, key_bias_ev, key_bias_gen, qk_scale, MODE, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows still empty stay at 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        visited += 1

    if MODE == MODE_EVIDENCE_KEYS_SELF:
        # a target's own key: one more online-softmax step with a single key per row
        v_self = tl.load(V + rows, mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, s_self)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p_self = tl.exp2(s_self - m_safe)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + p_self
        acc = acc * alpha[:, None] + p_self[:, None] * v_self.to(tl.float32)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(OUT + rows, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + offs_m, lse, mask=row_ok)
    if COUNT_TILES:
        tl.store(VISITED + bh * tl.num_programs(0) + start_m, visited)


@triton.jit
def _dkdv_kernel(Q, K, V, EV, FIRST_TARGET, KEY_BIAS, DO, LSE, DELTA, DK, DV, DKEY_BIAS, VISITED, N, H, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
                 UPCAST: tl.constexpr, COUNT_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qk_scale = scale * LOG2E
    head = bh.to(tl.int64) * N * HEAD_DIM
    Q += head
    K += head
    V += head
    DO += head
    DK += head
    DV += head
    EV += b.to(tl.int64) * N
    LSE += bh.to(tl.int64) * N
    DELTA += bh.to(tl.int64) * N
    DKEY_BIAS += bh.to(tl.int64) * N
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < N
    cols = offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # [BN,D]
    k = tl.load(K + cols, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + cols, mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    ev_k = tl.load(EV + offs_n, mask=col_ok, other=0)
    key_is_ev = ev_k != 0
    any_ev = tl.max(ev_k.to(tl.int32), 0) > 0
    key_bias_ev = 0.0
    key_bias_gen = 0.0
    if MODE == MODE_BIAS:
        key_bias_ev = tl.load(KEY_BIAS + h * 2).to(tl.float32)
        key_bias_gen = tl.load(KEY_BIAS + h * 2 + 1).to(tl.float32)

    # The queries that can see this key tile: all of them when it holds evidence (or in
    # bias mode); otherwise, in evidence_causal, the targets, which in evidence-first
    # order start at the sample's first target; in evidence_keys none (a target's own key
    # is self_key.py's job).
    first_target = tl.load(FIRST_TARGET + b)
    if MODE == MODE_BIAS:
        lo = first_target * 0
    elif MODE == MODE_EVIDENCE_CAUSAL:
        lo = tl.where(any_ev, 0, (first_target // BLOCK_M) * BLOCK_M)
    else:
        lo = tl.where(any_ev, 0, N)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    visited = lo * 0
    for start_m in range(lo, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        rows = offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # [BM,D]
        q = tl.load(Q + rows, mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + rows, mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        ev_q = tl.load(EV + offs_m, mask=row_ok, other=1)
        lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * LOG2E  # padding rows get P = 0
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BN,BM]
        if MODE == MODE_BIAS:
            # padding keys need no mask here: their rows of dK/dV are never stored
            s_t += tl.where(key_is_ev, key_bias_ev, key_bias_gen)[:, None] * LOG2E
            p_t = tl.exp2(s_t - lse2[None, :])
        elif MODE == MODE_EVIDENCE_CAUSAL:
            allowed = key_is_ev[:, None] | (ev_q == 0)[None, :]
            p_t = tl.where(allowed, tl.exp2(s_t - lse2[None, :]), 0.0)
        else:
            p_t = tl.where(key_is_ev[:, None], tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BN,BM]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        if MODE == MODE_BIAS:
            dbias += tl.sum(ds_t, 1)
        visited += 1

    tl.store(DK + cols, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + cols, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
    if MODE == MODE_BIAS:
        tl.store(DKEY_BIAS + offs_n, dbias, mask=col_ok)
    if COUNT_TILES:
        tl.store(VISITED + bh * tl.num_programs(0) + start_n, visited)


@triton.jit
def _dq_kernel(Q, K, V, EV, KV_HI, KEY_BIAS, DO, LSE, DELTA, DQ, VISITED, N, H, scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
               UPCAST: tl.constexpr, COUNT_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qk_scale = scale * LOG2E
    head = bh.to(tl.int64) * N * HEAD_DIM
    Q += head
    K += head
    V += head
    DO += head
    DQ += head
    EV += b.to(tl.int64) * N
    LSE += bh.to(tl.int64) * N
    DELTA += bh.to(tl.int64) * N
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    rows = offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # [BM,D]
    q = tl.load(Q + rows, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + rows, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    ev_q = tl.load(EV + offs_m, mask=row_ok, other=1)
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    key_bias_ev = 0.0
    key_bias_gen = 0.0
    if MODE == MODE_BIAS:
        key_bias_ev = tl.load(KEY_BIAS + h * 2).to(tl.float32)
        key_bias_gen = tl.load(KEY_BIAS + h * 2 + 1).to(tl.float32)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = _key_extent(KV_HI, b, N, ev_q, row_ok, MODE)
    visited = hi * 0
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        ev_k = tl.load(EV + offs_n, mask=col_ok, other=0)
        cols = offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # [BN,D]
        k = tl.load(K + cols, mask=col_ok[:, None], other=0.0)
        v = tl.load(V + cols, mask=col_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _scores(q, k, ev_q, ev_k, col_ok, key_bias_ev, key_bias_gen, qk_scale, MODE, DOT_PRECISION)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BM,BN]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        visited += 1
    dq = dq * scale
    tl.store(DQ + rows, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    if COUNT_TILES:
        tl.store(VISITED + bh * tl.num_programs(0) + start_m, visited)


def _shipped_generation() -> int:
    major = torch.cuda.get_device_capability()[0]
    return 9 if major >= 9 else 8


def _autotuned(kernel, name: str):
    """`kernel` autotuned over the shipped configs of the running GPU and the call's head dim."""
    every = {c for generation in SHIPPED_CONFIGS.values() for c in generation[name].values() for c in c}
    configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                             num_stages=c.num_stages) for c in sorted(every)]

    def shipped_only(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        shipped = set(SHIPPED_CONFIGS[_shipped_generation()][name][head_dim])
        return [c for c in configs
                if TileConfig(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in shipped]

    return triton.autotune(configs, key=["N", "HEAD_DIM", "MODE"],
                           prune_configs_by={"early_config_prune": shipped_only})(kernel)


_forward_tuned = _autotuned(_forward_kernel, "forward")
_dkdv_tuned = _autotuned(_dkdv_kernel, "dkdv")
_dq_tuned = _autotuned(_dq_kernel, "dq")


class Tiles(NamedTuple):
    """Explicit tile sizes for the three kernels (the interpreter and tests); None = autotune."""
    forward: TileConfig
    dkdv: TileConfig
    dq: TileConfig


def _launch(kernel, tuned, tile: TileConfig | None, grid_block: str, n: int, bh: int, args, constants):
    """Grid (tiles along N, B*H); the tile along N is BLOCK_M or BLOCK_N (grid_block)."""
    if tile is None:
        tuned[lambda meta: (triton.cdiv(n, meta[grid_block]), bh)](*args, **constants)
        return
    block = tile.block_m if grid_block == "BLOCK_M" else tile.block_n
    kernel[(triton.cdiv(n, block), bh)](*args, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                        num_warps=tile.num_warps, num_stages=tile.num_stages, **constants)


def _common_constants(q, mode, include_self, count_tiles):
    return dict(HEAD_DIM=q.shape[-1], MODE=kernel_mode(mode, include_self),
                UPCAST=INTERPRETING and q.dtype == torch.bfloat16, COUNT_TILES=count_tiles,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _evidence_extent(evidence):
    """kv_hi [B]: one past the last evidence token; first_target [B]: first target (N if none)."""
    n = evidence.shape[1]
    positions = torch.arange(n, device=evidence.device, dtype=torch.int32)
    kv_hi = torch.where(evidence, positions + 1, 0).amax(1).to(torch.int32)
    first_target = torch.where(evidence, n, positions).amin(1).to(torch.int32)
    return kv_hi.contiguous(), first_target.contiguous()


def _bias_arg(key_bias, q):
    return key_bias.float().contiguous() if key_bias is not None else q.new_zeros(1, dtype=torch.float32)


def forward(q, k, v, evidence, mode, key_bias, include_self, tiles: Tiles | None = None,
            visited: torch.Tensor | None = None):
    """(out [B,H,N,D], lse [B,H,N] float32). visited [B*H, ceil(N/BM)] int32, if given,
    receives the number of key tiles each program computed (tests check tile skipping)."""
    b, h, n, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    kv_hi, _ = _evidence_extent(evidence)
    ev = evidence.to(torch.int8)
    constants = _common_constants(q, mode, include_self, visited is not None)
    args = (q, k, v, ev, kv_hi, _bias_arg(key_bias, q), out, lse, visited if visited is not None else lse,
            n, h, 1.0 / math.sqrt(d))
    _launch(_forward_kernel, _forward_tuned, tiles.forward if tiles else None, "BLOCK_M", n, b * h, args, constants)
    return out, lse


def backward(dout, q, k, v, out, lse, evidence, mode, key_bias, include_self, tiles: Tiles | None = None,
             visited: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(dq, dk, dv, dkey_bias or None). visited = (dkdv counts, dq counts) like `forward`'s."""
    b, h, n, d = q.shape
    delta = (dout.float() * out.float()).sum(-1)  # [B,H,N] rowsum(dO * O)
    kv_hi, first_target = _evidence_extent(evidence)
    ev = evidence.to(torch.int8)
    bias = _bias_arg(key_bias, q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias_per_key = torch.zeros(b, h, n, device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(d)
    count_dkdv, count_dq = visited if visited is not None else (lse, lse)
    # the self key's gradient is added below, so the kernels see plain evidence_keys
    constants = _common_constants(q, mode, False, visited is not None)
    _launch(_dkdv_kernel, _dkdv_tuned, tiles.dkdv if tiles else None, "BLOCK_N", n, b * h,
            (q, k, v, ev, first_target, bias, dout, lse, delta, dk, dv, dbias_per_key, count_dkdv, n, h, scale),
            constants)
    _launch(_dq_kernel, _dq_tuned, tiles.dq if tiles else None, "BLOCK_M", n, b * h,
            (q, k, v, ev, kv_hi, bias, dout, lse, delta, dq, count_dq, n, h, scale), constants)
    if mode == "evidence_keys" and include_self:
        add_self_key_gradients(dq, dk, dv, dout, q, k, v, out, lse, evidence, scale)
    if key_bias is None:
        return dq, dk, dv, None
    ev_f = evidence[:, None, :].float()
    dkey_bias = torch.stack([(dbias_per_key * ev_f).sum((0, 2)), (dbias_per_key * (1 - ev_f)).sum((0, 2))], -1)
    return dq, dk, dv, dkey_bias.to(key_bias.dtype)
