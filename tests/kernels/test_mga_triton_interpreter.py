"""The Triton kernels under TRITON_INTERPRET=1 on tiny shapes: forward, every gradient, tiles.

N=37 is not a multiple of any tile; the evidence-first layout puts samples with 0, 1, N/4
and N evidence tokens in one batch, so one run covers the issue's edge cases (with
include_self=False the first sample is fully masked). Query and key tiles differ in size so
that a swapped BLOCK_M/BLOCK_N shows up.
"""
import os

import pytest
import torch
from triton_cases import MODE_VARIANTS, check_against_reference

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests; on a GPU machine the `gpu` tests cover the kernels")

from umask.kernels import triton_attention  # noqa: E402  (after TRITON_INTERPRET is settled)
from umask.kernels.triton_attention import TileConfig, Tiles  # noqa: E402

TILES = Tiles(forward=TileConfig(32, 16), dkdv=TileConfig(16, 32), dq=TileConfig(32, 16))


@pytest.mark.parametrize("layout", ["sorted_mixed_counts", "scattered"])
@pytest.mark.parametrize("mode,include_self", MODE_VARIANTS)
def test_float32(mode, include_self, layout):
    check_against_reference(triton_attention, mode, include_self, layout, torch.float32, n=37, head_dim=16,
                            tiles=TILES, heads=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,include_self", MODE_VARIANTS)
def test_half_precision(mode, include_self, dtype):
    check_against_reference(triton_attention, mode, include_self, "sorted_mixed_counts", dtype, n=37, head_dim=16,
                            tiles=TILES, heads=1)


def _visited(mode, include_self, evidence, n, tiles):
    b = evidence.shape[0]
    q = torch.randn(b, 1, n, 16)
    counts_fwd = torch.full((b, -(-n // tiles.forward.block_m)), -1, dtype=torch.int32)
    out, lse = triton_attention.forward(q, q, q, evidence, mode, None, include_self, tiles, visited=counts_fwd)
    counts_dkdv = torch.full((b, -(-n // tiles.dkdv.block_n)), -1, dtype=torch.int32)
    counts_dq = torch.full((b, -(-n // tiles.dq.block_m)), -1, dtype=torch.int32)
    triton_attention.backward(q, q, q, q, out, lse, evidence, mode, None, include_self, tiles,
                              visited=(counts_dkdv, counts_dq))
    return counts_fwd.tolist(), counts_dkdv.tolist(), counts_dq.tolist()


def test_tiles_visited_follow_the_evidence_count():
    # N=64, tiles of 16: samples with 0, 1, 16 and 40 leading evidence tokens
    tiles = Tiles(TileConfig(16, 16), TileConfig(16, 16), TileConfig(16, 16))
    evidence = torch.arange(64)[None, :] < torch.tensor([0, 1, 16, 40])[:, None]
    fwd, dkdv, dq = _visited("evidence_keys", True, evidence, 64, tiles)
    assert fwd == dq == [[0] * 4, [1] * 4, [1] * 4, [3] * 4]  # ceil(count / 16) key tiles per query tile
    assert dkdv == [[0] * 4, [4, 0, 0, 0], [4, 0, 0, 0], [4, 4, 4, 0]]  # only key tiles with evidence loop
    fwd, dkdv, dq = _visited("evidence_causal", True, evidence, 64, tiles)
    # query tiles that hold a target see all 4 key tiles; all-evidence query tiles only the evidence tiles
    assert fwd == dq == [[4] * 4, [4] * 4, [1, 4, 4, 4], [3, 3, 4, 4]]
    # evidence key tiles reach every query tile; target-only key tiles start at the first target
    assert dkdv == [[4] * 4, [4, 4, 4, 4], [4, 3, 3, 3], [4, 4, 4, 2]]
