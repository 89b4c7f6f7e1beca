"""On a CUDA GPU (`pytest -m gpu`): the compiled Triton kernels at the shipped head dims,
autotuned, against the float64 oracle, and the public op inside torch.compile."""
import pytest
import torch
from kernel_cases import evidence_layouts, random_qkv
from triton_cases import MODE_VARIANTS, check_against_reference

from umask.kernels import mask_guided_attention, mask_guided_attention_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["sorted_mixed_counts", "scattered"])
@pytest.mark.parametrize("mode,include_self", MODE_VARIANTS)
def test_compiled_kernels_match_reference(mode, include_self, layout, dtype, head_dim):
    from umask.kernels import triton_attention
    check_against_reference(triton_attention, mode, include_self, layout, dtype, n=300, head_dim=head_dim,
                            device="cuda")


def test_op_under_torch_compile_on_gpu():
    evidence = evidence_layouts(4, 256)["sorted_random"].cuda()
    q, k, v = [t.detach().cuda().requires_grad_() for t in random_qkv(4, 4, 256, 64, torch.bfloat16)]
    key_bias = torch.zeros(4, 2, device="cuda", requires_grad=True)
    compiled = torch.compile(lambda q, k, v, b: mask_guided_attention(q, k, v, evidence, "bias", b), fullgraph=True)
    out = compiled(q, k, v, key_bias)
    out.float().sum().backward()
    torch.testing.assert_close(out.double(), mask_guided_attention_reference(q, k, v, evidence, "bias", key_bias),
                               atol=3e-2, rtol=0)
    assert key_bias.grad is not None and q.grad is not None
