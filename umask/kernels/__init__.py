"""Fused mask-guided attention for the DiT: one op, a float64 oracle, token-order helpers.

    from umask.kernels import mask_guided_attention, evidence_first_permutation
"""
from umask.kernels.op import mask_guided_attention
from umask.kernels.reference import MODES, mask_guided_attention_reference
from umask.kernels.sorting import evidence_first_permutation, permute_tokens, unpermute_tokens

__all__ = ["MODES", "evidence_first_permutation", "mask_guided_attention", "mask_guided_attention_reference",
           "permute_tokens", "unpermute_tokens"]
