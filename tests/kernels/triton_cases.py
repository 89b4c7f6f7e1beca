"""One check shared by the interpreter, GPU and fallback tests: an implementation module's
forward/backward (the (out, lse) contract of cpu.py) against the float64 oracle."""
import torch
from kernel_cases import evidence_layouts, random_qkv

from umask.kernels import mask_guided_attention_reference

# (forward, grads) absolute tolerances per dtype, against float64 on the same rounded inputs
TOLERANCES = {torch.float32: (1e-5, 2e-5), torch.float16: (2e-3, 6e-3), torch.bfloat16: (3e-2, 6e-2)}

# (mode, include_self) pairs: the four kernel specializations
MODE_VARIANTS = [("evidence_keys", True), ("evidence_keys", False), ("evidence_causal", True), ("bias", True)]


def check_against_reference(implementation, mode, include_self, layout, dtype, n, head_dim, tiles=None,
                            device="cpu", batch=4, heads=2):
    evidence = evidence_layouts(batch, n)[layout].to(device)
    q, k, v = [t.detach().to(device).requires_grad_() for t in random_qkv(batch, heads, n, head_dim, dtype)]
    key_bias = torch.tensor([[0.5, -0.25]] * heads, device=device, requires_grad=True) if mode == "bias" else None
    ref = mask_guided_attention_reference(q, k, v, evidence, mode, key_bias, include_self)
    inputs = [q, k, v] + ([key_bias] if key_bias is not None else [])
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    want = torch.autograd.grad(ref, inputs, grad_out)

    plain = [t.detach() for t in (q, k, v)]
    bias = key_bias.detach() if key_bias is not None else None
    extra = (tiles,) if tiles is not None else ()
    out, lse = implementation.forward(*plain, evidence, mode, bias, include_self, *extra)
    got = implementation.backward(grad_out.to(dtype), *plain, out, lse, evidence, mode, bias, include_self, *extra)

    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), ref.detach(), atol=fwd_tol, rtol=0)
    for name, g, w in zip(("dq", "dk", "dv", "dkey_bias"), got, want):
        assert not g.isnan().any(), name
        torch.testing.assert_close(g.double(), w.double(), atol=grad_tol * max(1.0, w.abs().max().item()), rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
