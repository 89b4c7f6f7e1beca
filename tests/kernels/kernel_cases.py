"""Shared inputs for the kernel tests: evidence layouts with the edge cases named in issue 5."""
import torch

from umask.kernels import evidence_first_permutation, permute_tokens


def evidence_layouts(batch: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named [B,N] evidence masks; every one but 'scattered' is evidence-first."""
    gen = torch.Generator().manual_seed(seed)
    scattered = torch.rand(batch, n, generator=gen) < 0.3
    counts = torch.tensor([0, 1, n // 4, n])[torch.arange(batch) % 4]
    return {
        "scattered": scattered,
        "sorted_mixed_counts": torch.arange(n)[None, :] < counts[:, None],  # 0, 1, N/4, all evidence
        "no_evidence": torch.zeros(batch, n, dtype=torch.bool),
        "all_evidence": torch.ones(batch, n, dtype=torch.bool),
        "sorted_random": permute_tokens(scattered, evidence_first_permutation(scattered)),
    }


def random_qkv(batch, heads, n, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen).to(dtype).requires_grad_() for _ in range(3)]
