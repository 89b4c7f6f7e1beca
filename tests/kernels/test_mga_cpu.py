"""The float64 oracle, the token-order helpers and the CPU path of mask_guided_attention."""
import math

import pytest
import torch
from kernel_cases import evidence_layouts, random_qkv
from triton_cases import MODE_VARIANTS, check_against_reference

from umask.kernels import (MODES, evidence_first_permutation, mask_guided_attention,
                           mask_guided_attention_reference, permute_tokens, unpermute_tokens)
from umask.kernels import cpu, dense_fallback
from umask.kernels.reference import allowed_keys


def test_allowed_keys_by_hand():
    evidence = torch.tensor([[True, False, True]])
    assert allowed_keys(evidence, "evidence_keys", include_self=True)[0].tolist() == [
        [True, False, True], [True, True, True], [True, False, True]]
    assert allowed_keys(evidence, "evidence_keys", include_self=False)[0].tolist() == [
        [True, False, True]] * 3
    assert allowed_keys(evidence, "evidence_causal")[0].tolist() == [
        [True, False, True], [True, True, True], [True, False, True]]


def test_reference_by_hand_with_bias_and_empty_rows():
    # D=1, q=1, k=[0, ln 2 * sqrt(1)], v=[10, 20]: weights exp(0):exp(ln2)=1:2 without bias
    q = torch.ones(1, 1, 2, 1)
    k = torch.tensor([0.0, math.log(2.0)]).view(1, 1, 2, 1)
    v = torch.tensor([10.0, 20.0]).view(1, 1, 2, 1)
    evidence = torch.tensor([[True, False]])
    out = mask_guided_attention_reference(q, k, v, evidence, "bias", key_bias=torch.tensor([[math.log(2.0), 0.0]]))
    assert torch.allclose(out.flatten(), torch.tensor([15.0, 15.0], dtype=torch.float64))  # 2:2 after bias
    out = mask_guided_attention_reference(q, k, v, evidence, "evidence_keys", include_self=True)
    assert torch.allclose(out.flatten(), torch.tensor([10.0, 10 / 3 + 40 / 3], dtype=torch.float64))
    nothing = torch.tensor([[False, False]])
    out = mask_guided_attention_reference(q, k, v, nothing, "evidence_keys", include_self=False)
    assert out.abs().max() == 0


@pytest.mark.parametrize("mode", MODES)
def test_reference_gradcheck(mode):
    q, k, v = random_qkv(2, 2, 5, 3, torch.float64)
    evidence = torch.tensor([[True, False, False, True, False], [False] * 5])
    key_bias = torch.randn(2, 2, dtype=torch.float64, requires_grad=True) if mode == "bias" else None
    include_self = mode != "evidence_keys"  # the second sample is then a fully masked one
    torch.autograd.gradcheck(lambda *a: mask_guided_attention_reference(*a[:3], evidence, mode, a[3] if a[3:] else None,
                                                                        include_self),
                             (q, k, v) + ((key_bias,) if key_bias is not None else ()))


def test_permutation_puts_evidence_first_stably_and_round_trips():
    evidence = torch.tensor([[False, True, False, True], [True, False, False, False]])
    perm = evidence_first_permutation(evidence)
    assert perm.tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]
    x = torch.arange(2 * 4 * 3).view(2, 4, 3)
    assert torch.equal(unpermute_tokens(permute_tokens(x, perm), perm), x)
    assert permute_tokens(evidence, perm).tolist() == [[True, True, False, False], [True, False, False, False]]


@pytest.fixture(params=["compacted", "masked"])
def cpu_strategy(request, monkeypatch):
    """Both CPU strategies at test sizes: compaction from 0 tokens on, or only where it needs
    no gather (evidence_keys in evidence-first order)."""
    monkeypatch.setattr(cpu, "COMPACTION_MIN_TOKENS", 0 if request.param == "compacted" else 10**9)
    return request.param


def _compare(mode, layout_name, include_self, dtype, atol):
    evidence = evidence_layouts(4, 37)[layout_name]
    q, k, v = random_qkv(4, 2, 37, 8, dtype)
    # A local generator: drawn from the global one, the inputs depended on which tests ran first.
    gen = torch.Generator().manual_seed(7)
    key_bias = torch.randn(2, 2, generator=gen, requires_grad=True) if mode == "bias" else None
    out = mask_guided_attention(q, k, v, evidence, mode, key_bias, include_self)
    ref = mask_guided_attention_reference(q, k, v, evidence, mode, key_bias, include_self)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    inputs = [q, k, v] + ([key_bias] if key_bias is not None else [])
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    want = torch.autograd.grad(ref, inputs, grad_out)
    # key_bias's gradient sums B*N*N = 5476 terms per entry; their float32 rounding adds up
    # to about 1e-5 however close each term is, so it gets a looser absolute tolerance.
    tolerances = [atol * 4] * 3 + [atol * 50]
    for g, w, tolerance in zip(got, want, tolerances):
        assert g.dtype == w.dtype and not g.isnan().any()
        torch.testing.assert_close(g.double(), w.double(), atol=tolerance, rtol=0)


@pytest.mark.parametrize("layout_name", ["scattered", "sorted_mixed_counts", "no_evidence", "all_evidence"])
@pytest.mark.parametrize("mode,include_self", [("evidence_keys", True), ("evidence_keys", False),
                                               ("evidence_causal", True), ("bias", True)])
def test_cpu_path_matches_reference_float32(mode, include_self, layout_name, cpu_strategy):
    _compare(mode, layout_name, include_self, torch.float32, atol=2e-6)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_path_bfloat16(mode, cpu_strategy):
    _compare(mode, "scattered", True, torch.bfloat16, atol=3e-2)


def test_fully_masked_sample_outputs_zero_with_zero_gradient(cpu_strategy):
    q, k, v = random_qkv(2, 1, 6, 4)
    evidence = torch.tensor([[True, False, True, False, False, False], [False] * 6])
    out = mask_guided_attention(q, k, v, evidence, "evidence_keys", include_self=False)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0
    out.sum().backward()
    assert q.grad[1].abs().max() == 0 and k.grad[1].abs().max() == 0


@pytest.mark.parametrize("mode", MODES)
def test_cpu_path_gradcheck_float64(mode, cpu_strategy):
    q, k, v = random_qkv(2, 2, 7, 4, torch.float64)
    evidence = evidence_layouts(2, 7)["scattered"]
    key_bias = torch.randn(2, 2, dtype=torch.float64, requires_grad=True) if mode == "bias" else None
    inputs = (q, k, v) + ((key_bias,) if key_bias is not None else ())
    torch.autograd.gradcheck(lambda *a: mask_guided_attention(*a[:3], evidence, mode, a[3] if a[3:] else None), inputs)


def test_non_contiguous_inputs():
    q, k, v = [t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in random_qkv(2, 3, 9, 4)]
    evidence = evidence_layouts(2, 9)["scattered"]
    assert not q.is_contiguous()
    torch.testing.assert_close(mask_guided_attention(q, k, v, evidence, "evidence_causal").double(),
                               mask_guided_attention_reference(q, k, v, evidence, "evidence_causal"), atol=2e-6, rtol=0)


@pytest.mark.parametrize("mode,layout_name", [("bias", "scattered"), ("evidence_keys", "sorted_random")])
def test_torch_compile_keeps_one_graph(mode, layout_name):
    q, k, v = random_qkv(4, 2, 12, 8)
    evidence = evidence_layouts(4, 12)[layout_name]
    key_bias = torch.zeros(2, 2, requires_grad=True) if mode == "bias" else None
    compiled = torch.compile(lambda q, k, v, b: mask_guided_attention(q, k, v, evidence, mode, b) * 2,
                             backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, key_bias)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad(out, [q, k, v], grad_out, retain_graph=True)
    ref = 2 * mask_guided_attention_reference(q, k, v, evidence, mode, key_bias)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    for g, w in zip(got, torch.autograd.grad(ref, [q, k, v], grad_out.double())):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=0)
    if key_bias is not None:
        out.sum().backward()
        assert key_bias.grad is not None


@pytest.mark.parametrize("bad,message", [
    (dict(mode="causal"), "mode must be one of"),
    (dict(evidence=torch.ones(2, 5)), "evidence must be a bool tensor"),
    (dict(mode="bias"), "needs key_bias"),
    (dict(key_bias=torch.zeros(2, 2)), "only used by mode 'bias'"),
])
def test_bad_arguments_are_named(bad, message):
    q, k, v = random_qkv(2, 2, 5, 4)
    args = dict(evidence=torch.ones(2, 5, dtype=torch.bool), mode="evidence_keys", key_bias=None)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        mask_guided_attention(q, k, v, **args)


@pytest.mark.parametrize("mode,include_self", MODE_VARIANTS)
def test_dense_fallback_for_unshipped_head_dims(mode, include_self):
    check_against_reference(dense_fallback, mode, include_self, "sorted_mixed_counts", torch.float32, n=21, head_dim=8)


def test_strategy_follows_sequence_length_layout_and_mode():
    layouts = {n: evidence_layouts(4, n) for n in (168, 672)}
    assert cpu.COMPACTION_MIN_TOKENS > 168
    # scattered evidence: masked for a week of hourly slots, compacted from 256 tokens on
    assert cpu._masked_instead("evidence_keys", 168) and not cpu._masked_instead("evidence_keys", 672)
    assert cpu._prefix("evidence_keys", layouts[168]["scattered"], torch.float32) is None
    # evidence-first (the DiT's order): evidence_keys slices its keys, at any length
    for name in ("sorted_random", "sorted_mixed_counts", "no_evidence", "all_evidence"):
        assert cpu.evidence_first(layouts[168][name]), name
        assert cpu._prefix("evidence_keys", layouts[168][name], torch.float32) is not None, name
    assert not cpu.evidence_first(layouts[168]["scattered"])
    # evidence_causal gathers its target queries whatever the order
    assert cpu._prefix("evidence_causal", layouts[168]["sorted_random"], torch.float32) is None
    assert cpu._masked_instead("evidence_causal", 168)
    assert not cpu._masked_instead("bias", 168)  # the bias channel needs no mask


def test_evidence_prefix_counts_and_padding():
    evidence = torch.tensor([[True, True, False, False], [True, False, False, False]])
    keys = cpu.evidence_prefix(evidence, torch.float32)
    assert keys.count.tolist() == [2, 1] and (keys.fewest, keys.most) == (1, 2)
    assert keys.padding.flatten(1).tolist() == [[0.0, 0.0], [0.0, float("-inf")]]
    equal = cpu.evidence_prefix(torch.tensor([[True, False], [True, False]]), torch.float64)
    assert equal.padding is None and (equal.fewest, equal.most) == (1, 1)
    assert cpu.evidence_prefix(torch.tensor([[False, True]]), torch.float32) is None


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("counts", [[3, 9, 5, 9], [4, 4, 4, 4], [0, 2, 2, 7], [0, 0, 0, 0]])
def test_prefix_path_matches_reference_float64(counts, include_self):
    """The evidence-first path on every split of its rows: fewest > 0 with padding (rows
    below fewest get no self term), equal counts (no padding), empty samples, no evidence."""
    q, k, v = random_qkv(4, 2, 11, 4, torch.float64)
    evidence = torch.arange(11)[None, :] < torch.tensor(counts)[:, None]
    assert cpu.evidence_prefix(evidence, torch.float64) is not None
    out = mask_guided_attention(q, k, v, evidence, "evidence_keys", include_self=include_self)
    ref = mask_guided_attention_reference(q, k, v, evidence, "evidence_keys", include_self=include_self)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
    _, lse = cpu.forward(q.detach(), k.detach(), v.detach(), evidence, "evidence_keys", None, include_self)
    empty = (~allowed_keys(evidence, "evidence_keys", include_self).any(-1))[:, None].expand_as(lse)
    assert torch.isposinf(lse[empty]).all() and lse[~empty].isfinite().all()  # +inf exactly on empty rows


def test_prefix_layout_is_built_once_per_evidence_tensor_and_again_after_a_write(monkeypatch):
    real, built = cpu.evidence_prefix, []

    def counting(evidence, dtype):
        built.append(dtype)
        return real(evidence, dtype)

    monkeypatch.setattr(cpu, "evidence_prefix", counting)
    monkeypatch.setattr(cpu, "_last_prefix", (None, -1, None, None))
    q, k, v = random_qkv(2, 2, 9, 4, torch.float64)
    evidence = torch.arange(9)[None, :] < torch.tensor([[3], [6]])
    for _ in range(3):  # three blocks' forward and backward on one evidence tensor
        mask_guided_attention(q, k, v, evidence, "evidence_keys").sum().backward()
    assert len(built) == 1
    evidence[0, 3] = True  # in place: the version counter moves, the layout is rebuilt
    out = mask_guided_attention(q, k, v, evidence, "evidence_keys")
    torch.testing.assert_close(out, mask_guided_attention_reference(q, k, v, evidence, "evidence_keys"),
                               atol=1e-12, rtol=0)
    assert len(built) == 2
    fresh = evidence.clone()  # another tensor, same values: looked at afresh
    mask_guided_attention(q, k, v, fresh, "evidence_keys")
    mask_guided_attention(q.float(), k.float(), v.float(), fresh, "evidence_keys")  # another dtype's padding
    assert len(built) == 4
    with torch.inference_mode():
        mask_guided_attention(q, k, v, torch.arange(9)[None, :] < torch.tensor([[3], [6]]), "evidence_keys")
    assert len(built) == 5


def test_evidence_first_keys_are_views_not_gathers():
    evidence = evidence_layouts(4, 37)["sorted_mixed_counts"]
    keys = cpu.token_list(evidence)
    k = torch.randn(4, 2, 37, 8)
    assert keys.prefix and keys.length == 37  # one sample holds all evidence
    assert cpu._gather_tokens(k, keys).data_ptr() == k.data_ptr()
    scattered = cpu.token_list(evidence_layouts(4, 37)["scattered"])
    assert not scattered.prefix
    assert torch.equal(cpu._gather_tokens(k, scattered)[0, 0, :3], k[0, 0, scattered.gather[0, :3]])


def test_dense_fallback_gradcheck_float64():
    q, k, v = random_qkv(2, 2, 6, 4, torch.float64)
    evidence = evidence_layouts(2, 6)["scattered"]
    key_bias = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    out, lse = dense_fallback.forward(q.detach(), k.detach(), v.detach(), evidence, "bias", key_bias.detach(), True)
    grad_out = torch.randn_like(out)
    got = dense_fallback.backward(grad_out, q.detach(), k.detach(), v.detach(), out, lse, evidence, "bias",
                                  key_bias.detach(), True)
    ref = mask_guided_attention_reference(q, k, v, evidence, "bias", key_bias)
    want = torch.autograd.grad(ref, (q, k, v, key_bias), grad_out)
    assert out.dtype == torch.float64
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
