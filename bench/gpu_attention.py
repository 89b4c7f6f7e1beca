"""Mask-guided attention on a CUDA GPU: the Triton kernels against SDPA, Flex and the roofline.

For the day a GPU is lent (not part of `python -m bench`, which runs on CPU). bf16,
evidence-first tokens, mode evidence_keys with include_self, side by side in one run for
each (D, N, rho) at B=32, H=8:
- ours:       umask.kernels.mask_guided_attention (Triton, autotuned on first call);
- sdpa_mask:  SDPA with the [B,1,N,N] boolean mask (no flash backend with a mask);
- flex:       torch.compile(flex_attention) with a BlockMask of the same mask;
- sdpa_dense: unmasked SDPA (flash backend), the dense reference.
Prints one JSON line per shape: median ms (triton.testing.do_bench), effective TFLOP/s
(allowed pairs only) and its fraction of the card's peak, achieved bandwidth of the
compulsory bytes and its fraction of peak, and speedups; then a summary line. Check the
card first (`nvidia-smi`): H100 SXM5 and PCIe differ in peak (see PEAKS).

    python bench/gpu_attention.py [--head-dims 64 128] [--sizes 512 1024 2048 4096]
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

# dense bf16 tensor-core FLOP/s and HBM bytes/s by device-name fragment
PEAKS = {"H100 PCIe": (756e12, 2.0e12), "H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12),
         "A100": (312e12, 2.0e12)}
RATIOS = (0.1, 0.25, 0.5, 1.0)


def forward_flops(batch, heads, n, n_keys, head_dim):
    """4*D FLOPs per allowed (query, key) pair: Q K^T and P V."""
    return 4 * batch * heads * n * n_keys * head_dim


def compulsory_bytes(batch, heads, n, n_keys, head_dim, backward=False, element=2):
    """Bytes that must cross HBM once: Q, O (and dO, dQ) for N rows, K, V (and dK, dV) for
    the allowed keys, the fp32 LSE (and delta), the evidence mask."""
    if backward:
        return element * batch * heads * head_dim * (4 * n + 4 * n_keys) + 8 * batch * heads * n
    return element * batch * heads * head_dim * (2 * n + 2 * n_keys) + 4 * batch * heads * n + batch * n


def card_peaks():
    name = torch.cuda.get_device_name()
    for fragment, peaks in PEAKS.items():
        if fragment in name:
            return name, peaks
    return name, (None, None)


def measure(batch, heads, n, head_dim, rho, flex_compiled, do_bench):
    from torch.nn.attention.flex_attention import create_block_mask

    from umask.kernels import mask_guided_attention
    from umask.kernels.reference import allowed_keys
    count = max(1, round(rho * n))
    evidence = (torch.arange(n, device="cuda") < count).expand(batch, n).contiguous()
    q, k, v = [torch.randn(batch, heads, n, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3)]
    grad = torch.randn_like(q)
    mask = allowed_keys(evidence, "evidence_keys")[:, None]  # [B,1,N,N]
    block_mask = create_block_mask(lambda b, h, qi, ki: evidence[b, ki] | (qi == ki), batch, None, n, n)
    methods = {
        "ours": lambda: mask_guided_attention(q, k, v, evidence, "evidence_keys"),
        "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "flex": lambda: flex_compiled(q, k, v, block_mask=block_mask),
        "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    torch.testing.assert_close(methods["ours"]().float(), methods["sdpa_mask"]().float(), atol=2e-2, rtol=0)
    n_keys = count + (n - count) / n  # evidence keys, plus its own key for each target
    name, (peak_flops, peak_bytes) = card_peaks()
    record = {"bench": "gpu_attention", "device": name, "batch": batch, "heads": heads, "n": n,
              "head_dim": head_dim, "rho": rho}
    for pass_, flops_factor in (("forward", 1.0), ("forward_backward", 3.5)):
        times = {}
        for method, fn in methods.items():
            run = fn if pass_ == "forward" else (lambda fn=fn: fn().backward(grad))
            times[method] = do_bench(run)
        flops = forward_flops(batch, heads, n, n_keys, head_dim) * flops_factor
        moved = compulsory_bytes(batch, heads, n, n_keys, head_dim) + (
            compulsory_bytes(batch, heads, n, n_keys, head_dim, backward=True) if pass_ != "forward" else 0)
        tflops = flops / times["ours"] / 1e9
        record[pass_] = {
            "ms": {m: round(t, 4) for m, t in times.items()},
            "ours_effective_tflops": round(tflops, 1),
            "ours_fraction_of_peak_flops": round(tflops * 1e12 / peak_flops, 3) if peak_flops else None,
            "ours_fraction_of_peak_bandwidth": round(moved / (times["ours"] * 1e-3) / peak_bytes, 3)
            if peak_bytes else None,
            "speedup_vs": {m: round(t / times["ours"], 2) for m, t in times.items() if m != "ours"},
        }
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench
    flex_compiled = torch.compile(flex_attention)
    records = [measure(args.batch, args.heads, n, d, rho, flex_compiled, do_bench)
               for d in args.head_dims for n in args.sizes for rho in RATIOS]
    for record in records:
        print(json.dumps(record), flush=True)
    best = max(records, key=lambda r: r["forward"]["ours_effective_tflops"])
    print(json.dumps({"bench": "gpu_attention_summary", "device": best["device"],
                      "best_forward_tflops": best["forward"]["ours_effective_tflops"],
                      "at": {k: best[k] for k in ("n", "head_dim", "rho")},
                      "median_forward_speedup_vs_flex": sorted(
                          r["forward"]["speedup_vs"]["flex"] for r in records)[len(records) // 2]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
