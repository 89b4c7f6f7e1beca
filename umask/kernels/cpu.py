"""CPU path of mask-guided attention: PyTorch's fused CPU flash kernel on compacted tokens.

Measured on this kind of machine (docs/kernels.md): a boolean mask never makes CPU SDPA
skip work, so each mode is rewritten so the fused kernel only sees allowed pairs (below
COMPACTION_MIN_TOKENS tokens, where gathers cost more than they save, one masked kernel
call instead, unless evidence_keys's evidence is already evidence-first):

- evidence_keys: take the evidence keys (padded to the batch's largest count; a slice of K
  and V in evidence-first order, a gather otherwise) and attend to them; a target's own key
  is merged in afterwards as one extra softmax term using the kernel's log-sum-exp, so the
  self key costs O(N*D) instead of a dense mask. In evidence-first order (the DiT's) this
  is the `_prefix_*` path at every N: a key slice, and the self term on the rows that can
  be targets only; about ten torch ops around the kernel, since at N=168 each costs
  10-100 us against the kernel's 1-2 ms.
- evidence_causal: evidence queries attend to gathered evidence keys, target queries attend
  to every key, as two kernel calls on gathered queries (work N^2 (1 - rho + rho^2)).
- bias: the per-head key bias rides in one extra head-dim channel (q gets a 1, k gets
  bias / scale), so the dense kernel runs without any mask and the bias gradient falls out
  of dK.

Forward returns (out, lse) with lse the natural-log softmax normaliser per query and +inf
on rows with no allowed key; backward recomputes nothing but the kernel's own tiles.
"""
import math
import weakref
from typing import NamedTuple

import torch

from umask.kernels.reference import allowed_keys
from umask.kernels.self_key import accumulation_dtype, add_self_key_gradients, self_scores

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class TokenList(NamedTuple):
    """The positions of one kind of token per sample, padded to the batch's longest list."""
    gather: torch.Tensor  # [B,L] int64, padding points at a real token (any is fine)
    scatter: torch.Tensor  # [B,L] int64, padding points at the dump slot N
    valid: torch.Tensor  # [B,L] bool
    count: torch.Tensor  # [B] int64
    prefix: bool  # every sample's tokens are its first count[b] positions: gather[b, i] == i

    @property
    def length(self) -> int:
        return self.gather.shape[1]


def evidence_first(evidence: torch.Tensor) -> bool:
    """Whether every sample's evidence [B,N] is a prefix of its tokens (the DiT's order)."""
    positions = torch.arange(evidence.shape[1], device=evidence.device)
    return bool(torch.equal(evidence, positions[None, :] < evidence.sum(1)[:, None]))


def token_list(selected: torch.Tensor) -> TokenList:
    """Positions where selected [B,N] is True, in order, as a padded TokenList.

    In evidence-first order (the DiT's) the evidence tokens are a prefix; the list then says
    so, and gathers become slices (no argsort, no copy of K and V).
    """
    n = selected.shape[1]
    count = selected.sum(1)
    length = int(count.max()) if n else 0
    positions = torch.arange(n, device=selected.device)
    prefix = evidence_first(selected)
    if prefix:
        gather = positions[None, :length].expand(selected.shape[0], length)
    else:
        gather = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, :length]  # selected first
    valid = positions[None, :length] < count[:, None]
    return TokenList(gather, gather.masked_fill(~valid, n), valid, count, prefix)


def _gather_tokens(x: torch.Tensor, tokens: TokenList) -> torch.Tensor:
    """x [B,H,N,D] -> [B,H,L,D] at tokens.gather (a view of x for a prefix list)."""
    if tokens.prefix:
        return x[:, :, :tokens.length]
    b, h, _, d = x.shape
    return x.gather(2, tokens.gather[:, None, :, None].expand(b, h, tokens.length, d))


def _scatter_tokens(x: torch.Tensor, tokens: TokenList, n: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """x [B,H,L,...] -> [B,H,N+1,...] placed at tokens.scatter (padding lands in slot N)."""
    b, h = x.shape[:2]
    if into is None:
        into = x.new_zeros(b, h, n + 1, *x.shape[3:])
    index = tokens.scatter.view(b, 1, tokens.length, *([1] * (x.dim() - 3)))
    return into.scatter(2, index.expand_as(x), x)


def _key_padding(tokens: TokenList, dtype: torch.dtype) -> torch.Tensor:
    """[B,1,1,L] additive mask: 0 on real keys, -inf on padding."""
    pad = torch.zeros(tokens.valid.shape, dtype=dtype, device=tokens.valid.device)
    return pad.masked_fill(~tokens.valid, float("-inf"))[:, None, None, :]


class EvidencePrefix(NamedTuple):
    """Evidence-first evidence [B,N]: sample b's evidence is its first count[b] tokens."""
    count: torch.Tensor  # [B] int64
    fewest: int  # min count: query rows below it are evidence in every sample
    most: int  # max count: the key length the kernel sees
    padding: torch.Tensor | None  # [B,1,1,most] additive 0 / -inf; None when every count is equal


def evidence_prefix(evidence: torch.Tensor, dtype: torch.dtype) -> EvidencePrefix | None:
    """The prefix layout of evidence [B,N], or None when some sample's evidence is not a prefix.

    About six small torch ops: at N=168 each op issued per call costs 10-100 us (the time of
    thousands of pairs), so the check and the padding mask share one comparison.
    """
    n = evidence.shape[1]
    count = evidence.sum(1)
    within = torch.arange(n, device=evidence.device) < count[:, None]  # [B,N]
    if not torch.equal(within, evidence):
        return None
    fewest, most = (int(x) for x in torch.aminmax(count))
    padding = None
    if fewest != most:
        padding = torch.full((count.shape[0], 1, 1, most), float("-inf"), dtype=dtype, device=evidence.device)
        padding.masked_fill_(within[:, None, None, :most], 0.0)
    return EvidencePrefix(count, fewest, most, padding)


def _prefix_forward(q, k, v, keys: EvidencePrefix, evidence, include_self, scale):
    """evidence_keys in evidence-first order: one kernel call on the key prefix [0, most),
    then the self term merged into the target rows [fewest, N) only."""
    b, h, n, d = q.shape
    lse_dtype = accumulation_dtype(q)
    if keys.most == 0:
        out = torch.zeros_like(q)
        lse = q.new_full((b, h, n), float("-inf") if include_self else float("inf"), dtype=lse_dtype)
    else:
        out, lse = _flash_forward(q, k[:, :, :keys.most], v[:, :, :keys.most], 0.0, False, attn_mask=keys.padding,
                                  scale=scale)
        lse = lse.to(lse_dtype)
        if keys.fewest == 0:
            # a sample with no evidence key: the kernel says lse 0 and out 0; the row is
            # empty (+inf by the contract) unless the self term below fills it
            lse.masked_fill_((keys.count == 0)[:, None, None], float("-inf") if include_self else float("inf"))
    if include_self:
        rows = slice(keys.fewest, n)
        own = self_scores(q[:, :, rows], k[:, :, rows], evidence[:, rows], scale)
        lse_rows = lse[:, :, rows]
        # the self key's softmax weight w = e^own / (e^lse + e^own) = sigmoid(own - lse): 0 on
        # evidence rows (own = -inf), 1 on a target with no evidence key (lse = -inf)
        weight = torch.sigmoid(own - lse_rows).to(out.dtype)
        out[:, :, rows].lerp_(v[:, :, rows], weight[..., None])  # out (1 - w) + v w, one pass
        torch.logaddexp(lse_rows, own, out=lse_rows)  # finite: every target row has its own key
    return out, lse


def _prefix_backward(dout, q, k, v, out, lse, keys: EvidencePrefix, evidence, include_self, scale):
    n = q.shape[2]
    if keys.most == 0:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    else:
        # the kernel recomputes P = exp(S - lse) with the merged lse, so these are exactly
        # the evidence keys' share even with a self term merged in; keys past `most` get none
        dq, dk_keys, dv_keys = _flash_backward(dout, q, k[:, :, :keys.most], v[:, :, :keys.most], out, lse,
                                               0.0, False, attn_mask=keys.padding, scale=scale)
        dk = torch.nn.functional.pad(dk_keys, (0, 0, 0, n - keys.most))
        dv = torch.nn.functional.pad(dv_keys, (0, 0, 0, n - keys.most))
    if include_self:
        rows = slice(keys.fewest, n)
        add_self_key_gradients(dq[:, :, rows], dk[:, :, rows], dv[:, :, rows], dout[:, :, rows], q[:, :, rows],
                               k[:, :, rows], v[:, :, rows], out[:, :, rows], lse[:, :, rows], evidence[:, rows],
                               scale)
    return dq, dk, dv


# Below this many tokens, with evidence scattered (or in mode evidence_causal), the gathers,
# scatters and merges of the compacted paths cost more than the pairs they save, and one
# masked kernel call is faster (bench/attention_bench.py: at N=168 masked 2.2 ms against compacted 2.5 ms forward; at
# N=672 20 ms against 10 ms). In evidence-first order, evidence_keys's keys are slices,
# nothing is gathered, and compaction wins at every N (docs/kernels.md).
COMPACTION_MIN_TOKENS = 256


def _masked_instead(mode: str, n: int) -> bool:
    """Whether N tokens of scattered evidence (or evidence_causal in any order) run one masked call."""
    return mode != "bias" and n < COMPACTION_MIN_TOKENS


# The DiT calls the op once per block with one evidence tensor, and backward once per block
# with it again: the prefix layout (about six ops and two host syncs, a tenth of the op's time
# at N=168) is built once for that tensor. Keyed on the tensor object and its version counter,
# so a new tensor, or this one written in place, is looked at afresh; inference tensors keep
# no version counter and are never cached.
_last_prefix: tuple = (None, -1, None, None)  # (weakref to evidence, its _version, dtype, EvidencePrefix | None)


def _prefix(mode: str, evidence: torch.Tensor, dtype: torch.dtype) -> EvidencePrefix | None:
    """evidence_prefix for mode evidence_keys (the only mode with a prefix path), else None."""
    global _last_prefix
    if mode != "evidence_keys":
        return None
    if evidence.is_inference():
        return evidence_prefix(evidence, dtype)
    ref, version, cached_dtype, keys = _last_prefix
    if ref is not None and ref() is evidence and version == evidence._version and cached_dtype == dtype:
        return keys
    keys = evidence_prefix(evidence, dtype)
    _last_prefix = (weakref.ref(evidence), evidence._version, dtype, keys)
    return keys


def forward(q, k, v, evidence, mode, key_bias, include_self):
    """(out [B,H,N,D] in q's dtype, lse [B,H,N] float32 (float64 for float64 inputs))."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    keys = _prefix(mode, evidence, q.dtype)
    if keys is not None:
        return _prefix_forward(q, k, v, keys, evidence, include_self, scale)
    if _masked_instead(mode, evidence.shape[1]):
        return _masked_forward(q, k, v, evidence, mode, include_self, scale)
    if mode == "evidence_keys":
        return _evidence_keys_forward(q, k, v, evidence, include_self, scale)
    if mode == "evidence_causal":
        return _evidence_causal_forward(q, k, v, evidence, scale)
    return _bias_forward(q, k, v, evidence, key_bias, scale)


def backward(dout, q, k, v, out, lse, evidence, mode, key_bias, include_self):
    """(dq, dk, dv, dkey_bias or None) for the cotangent dout of `forward`'s out."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    keys = _prefix(mode, evidence, q.dtype)
    if keys is not None:
        return (*_prefix_backward(dout, q, k, v, out, lse, keys, evidence, include_self, scale), None)
    if _masked_instead(mode, evidence.shape[1]):
        return (*_masked_backward(dout, q, k, v, out, lse, evidence, mode, include_self, scale), None)
    if mode == "evidence_keys":
        return (*_evidence_keys_backward(dout, q, k, v, out, lse, evidence, include_self, scale), None)
    if mode == "evidence_causal":
        return (*_evidence_causal_backward(dout, q, k, v, out, lse, evidence, scale), None)
    return _bias_backward(dout, q, k, v, out, lse, evidence, key_bias, scale)


def _additive_mask(evidence, mode, include_self, dtype):
    """[B,1,N,N]: 0 where the key is allowed, -inf elsewhere."""
    allowed = allowed_keys(evidence, mode, include_self)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def _masked_forward(q, k, v, evidence, mode, include_self, scale):
    out, lse = _flash_forward(q, k, v, 0.0, False, attn_mask=_additive_mask(evidence, mode, include_self, q.dtype),
                              scale=scale)
    lse = lse.to(accumulation_dtype(q))
    if mode == "evidence_keys" and not include_self:
        # the kernel reports lse 0 on a row with no allowed key; the contract says +inf
        lse = lse.masked_fill(~evidence.any(1)[:, None, None], float("inf"))
    return out, lse


def _masked_backward(dout, q, k, v, out, lse, evidence, mode, include_self, scale):
    return _flash_backward(dout, q, k, v, out, lse, 0.0, False,
                           attn_mask=_additive_mask(evidence, mode, include_self, q.dtype), scale=scale)


def _evidence_keys_forward(q, k, v, evidence, include_self, scale):
    b, h, n, d = q.shape
    keys = token_list(evidence)
    lse_dtype = accumulation_dtype(q)
    if keys.length > 0:
        out, lse = _flash_forward(q, _gather_tokens(k, keys), _gather_tokens(v, keys), 0.0, False,
                                  attn_mask=_key_padding(keys, q.dtype), scale=scale)
        lse = lse.to(lse_dtype).masked_fill((keys.count == 0)[:, None, None], float("-inf"))
    else:
        out = torch.zeros_like(q)
        lse = q.new_full((b, h, n), float("-inf"), dtype=lse_dtype)
    if include_self:
        own_scores = self_scores(q, k, evidence, scale)
        total = torch.logaddexp(lse, own_scores)  # finite: every row has at least its own key
        out = out.mul_(torch.exp(lse - total)[..., None]).addcmul_(torch.exp(own_scores - total)[..., None], v)
        lse = total
    return out, lse.masked_fill(torch.isneginf(lse), float("inf"))


def _evidence_keys_backward(dout, q, k, v, out, lse, evidence, include_self, scale):
    keys = token_list(evidence)
    if keys.length > 0:
        # The kernel recomputes P = exp(S - lse) with the merged lse, so these are exactly the
        # evidence keys' share of the gradient even when a self term was merged in.
        dq, dk_keys, dv_keys = _flash_backward(
            dout, q, _gather_tokens(k, keys), _gather_tokens(v, keys), out, lse, 0.0, False,
            attn_mask=_key_padding(keys, q.dtype), scale=scale)
        # keys.gather is a prefix of a permutation, and its padding slots carry zero
        # gradient (masked keys), so a plain scatter puts every row in place (evidence-first
        # evidence never gets here: it takes _prefix_backward)
        index = keys.gather[:, None, :, None].expand_as(dk_keys)
        dk = torch.zeros_like(k).scatter_(2, index, dk_keys)
        dv = torch.zeros_like(v).scatter_(2, index, dv_keys)
    else:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if include_self:
        add_self_key_gradients(dq, dk, dv, dout, q, k, v, out, lse, evidence, scale)
    return dq, dk, dv


def _evidence_causal_forward(q, k, v, evidence, scale):
    b, h, n, d = q.shape
    lse_dtype = accumulation_dtype(q)
    evid, targ = token_list(evidence), token_list(~evidence)
    out = q.new_zeros(b, h, n + 1, d)
    lse = q.new_zeros(b, h, n + 1, dtype=lse_dtype)
    if evid.length > 0:
        out_e, lse_e = _flash_forward(_gather_tokens(q, evid), _gather_tokens(k, evid), _gather_tokens(v, evid),
                                      0.0, False, attn_mask=_key_padding(evid, q.dtype), scale=scale)
        out = _scatter_tokens(out_e, evid, n, into=out)
        lse = _scatter_tokens(lse_e.to(lse_dtype), evid, n, into=lse)
    if targ.length > 0:
        out_t, lse_t = _flash_forward(_gather_tokens(q, targ), k, v, 0.0, False, scale=scale)
        out = _scatter_tokens(out_t, targ, n, into=out)
        lse = _scatter_tokens(lse_t.to(lse_dtype), targ, n, into=lse)
    return out[:, :, :n].contiguous(), lse[:, :, :n].contiguous()


def _evidence_causal_backward(dout, q, k, v, out, lse, evidence, scale):
    n = q.shape[2]
    evid, targ = token_list(evidence), token_list(~evidence)
    dq = q.new_zeros(*q.shape[:2], n + 1, q.shape[3])
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for tokens, is_evidence in ((evid, True), (targ, False)):
        if tokens.length == 0:
            continue
        # padded query rows get dO = 0, which zeroes their share of dK and dV
        dout_rows = _gather_tokens(dout, tokens) * tokens.valid[:, None, :, None]
        lse_rows = lse.gather(2, tokens.gather[:, None, :].expand(*lse.shape[:2], tokens.length))
        keys, values = (_gather_tokens(k, tokens), _gather_tokens(v, tokens)) if is_evidence else (k, v)
        mask = _key_padding(tokens, q.dtype) if is_evidence else None
        dq_rows, dk_part, dv_part = _flash_backward(
            dout_rows, _gather_tokens(q, tokens), keys, values, _gather_tokens(out, tokens), lse_rows,
            0.0, False, attn_mask=mask, scale=scale)
        dq = _scatter_tokens(dq_rows, tokens, n, into=dq)
        if is_evidence:
            dk = dk + _scatter_tokens(dk_part, tokens, n)[:, :, :n]
            dv = dv + _scatter_tokens(dv_part, tokens, n)[:, :, :n]
        else:
            dk, dv = dk + dk_part, dv + dv_part
    return dq[:, :, :n].contiguous(), dk, dv


def _with_bias_channel(q, k, v, evidence, key_bias, scale):
    """q,k,v [B,H,N,D] -> [B,H,N,D+1]: scale*(q'.k') = scale*q.k + bias of k's kind."""
    bias = torch.where(evidence[:, None, :], key_bias[None, :, 0, None], key_bias[None, :, 1, None])  # [B,H,N]
    q_aug = torch.cat([q, q.new_ones(*q.shape[:3], 1)], dim=-1)
    k_aug = torch.cat([k, (bias / scale).to(k.dtype)[..., None]], dim=-1)
    v_aug = torch.cat([v, v.new_zeros(*v.shape[:3], 1)], dim=-1)
    return q_aug, k_aug, v_aug


def _bias_forward(q, k, v, evidence, key_bias, scale):
    q_aug, k_aug, v_aug = _with_bias_channel(q, k, v, evidence, key_bias, scale)
    out, lse = _flash_forward(q_aug, k_aug, v_aug, 0.0, False, scale=scale)
    return out[..., :-1].contiguous(), lse.to(accumulation_dtype(q))


def _bias_backward(dout, q, k, v, out, lse, evidence, key_bias, scale):
    q_aug, k_aug, v_aug = _with_bias_channel(q, k, v, evidence, key_bias, scale)
    pad = dout.new_zeros(*dout.shape[:3], 1)
    dq, dk, dv = _flash_backward(torch.cat([dout, pad], -1), q_aug, k_aug, v_aug, torch.cat([out, pad], -1),
                                 lse, 0.0, False, scale=scale)
    # d bias_j = sum_i dS_ij = dK'[j, D] / scale, then summed per head over keys of each kind
    dbias_per_key = dk[..., -1].to(key_bias.dtype) / scale  # [B,H,N]
    ev = evidence[:, None, :].to(key_bias.dtype)
    dkey_bias = torch.stack([(dbias_per_key * ev).sum((0, 2)), (dbias_per_key * (1 - ev)).sum((0, 2))], dim=-1)
    return dq[..., :-1].contiguous(), dk[..., :-1].contiguous(), dv[..., :-1].contiguous(), dkey_bias
