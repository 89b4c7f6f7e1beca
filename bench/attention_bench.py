"""Mask-guided attention on CPU: our op against SDPA with a boolean mask and compiled Flex.

Issue 5's sweep, side by side in one run: B=8, H=4, D=64, float32, N in {168, 672, 2688},
evidence share rho in {0.1, 0.25, 0.5}, tokens in evidence-first order (as the DiT runs
them), mode evidence_keys with include_self. For every shape and in interleaved rounds
(median and IQR reported):
- ours:       umask.kernels.mask_guided_attention, forward and forward+backward;
- sdpa_mask:  F.scaled_dot_product_attention with the same [B,1,N,N] boolean mask;
- flex:       torch.compile(flex_attention) with a BlockMask of the same mask (forward
              only: FlexAttention has no CPU backward in torch 2.13);
- sdpa_dense: unmasked SDPA, the machine's dense ceiling in GFLOP/s.
Effective GFLOP/s count only allowed (query, key) pairs: forward 4*D per pair, forward +
backward 3.5x that (2 forward matmuls + 5 backward ones, with recompute); dense SDPA is
counted on all N^2 pairs. One JSON line per N (its rho values inside) and a summary line
checking the issue's target (>= 2x sdpa_mask forward+backward at rho=0.25, N >= 672).

    .venv/bin/python -m bench.attention_bench [--sizes 168 672 2688] [--rounds 7] [--no-flex] [--threads 1]
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from umask.kernels import mask_guided_attention
from umask.kernels.reference import allowed_keys

BATCH, HEADS, HEAD_DIM = 8, 4, 64
RATIOS = (0.1, 0.25, 0.5)


def sorted_evidence(n: int, rho: float, seed: int) -> torch.Tensor:
    """[B,N] evidence-first masks whose counts scatter +-20% around rho*N."""
    gen = torch.Generator().manual_seed(seed)
    counts = (rho * n * (0.8 + 0.4 * torch.rand(BATCH, generator=gen))).round().long().clamp(1, n)
    return torch.arange(n)[None, :] < counts[:, None]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def forward_backward(attend, q, k, v, grad):
    def run():
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(grad)
    return run


class Shape:
    """Inputs and the timed callables of one (N, rho)."""

    def __init__(self, n, rho, flex_compiled, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.n, self.rho = n, rho
        self.q, self.k, self.v = [torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen).requires_grad_()
                                  for _ in range(3)]
        self.grad = torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen)
        self.evidence = sorted_evidence(n, rho, seed)
        self.mask = allowed_keys(self.evidence, "evidence_keys")[:, None]  # [B,1,N,N]
        self.allowed_pairs = int(self.mask.sum()) * HEADS
        ours = lambda q, k, v: mask_guided_attention(q, k, v, self.evidence, "evidence_keys")  # noqa: E731
        sdpa_mask = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)  # noqa: E731
        self.forward = {"ours": self._no_grad(ours), "sdpa_mask": self._no_grad(sdpa_mask)}
        self.forward_backward = {"ours": forward_backward(ours, self.q, self.k, self.v, self.grad),
                                 "sdpa_mask": forward_backward(sdpa_mask, self.q, self.k, self.v, self.grad)}
        if flex_compiled is not None:
            evidence = self.evidence
            start = time.perf_counter()
            block_mask = create_block_mask(lambda b, h, qi, ki: evidence[b, ki] | (qi == ki), BATCH, None, n, n,
                                           device="cpu")
            self.block_mask_ms = (time.perf_counter() - start) * 1e3
            q, k, v = self.q.detach(), self.k.detach(), self.v.detach()
            self.forward["flex"] = lambda: flex_compiled(q, k, v, block_mask=block_mask)

    def _no_grad(self, attend):
        q, k, v = self.q.detach(), self.k.detach(), self.v.detach()

        def run():
            with torch.no_grad():
                attend(q, k, v)
        return run

    def check_same_output(self):
        with torch.no_grad():
            ours = mask_guided_attention(self.q, self.k, self.v, self.evidence, "evidence_keys")
            sdpa = F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=self.mask)
        torch.testing.assert_close(ours, sdpa, atol=1e-4, rtol=0)


def summarize(samples: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return {"median_ms": round(median, 3), "iqr_ms": round(q3 - q1, 3)}


def measure_size(n: int, rounds: int, flex_compiled) -> dict:
    shapes = [Shape(n, rho, flex_compiled) for rho in RATIOS]
    gen = torch.Generator().manual_seed(1)
    dense_q, dense_k, dense_v = [torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen).requires_grad_()
                                 for _ in range(3)]
    dense_grad = torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen)
    dense = {"forward": lambda: F.scaled_dot_product_attention(dense_q.detach(), dense_k.detach(), dense_v.detach()),
             "forward_backward": forward_backward(F.scaled_dot_product_attention, dense_q, dense_k, dense_v,
                                                  dense_grad)}
    jobs = {("dense", None, pass_, "sdpa_dense"): fn for pass_, fn in dense.items()}
    for i, shape in enumerate(shapes):
        shape.check_same_output()
        for pass_ in ("forward", "forward_backward"):
            for method, fn in getattr(shape, pass_).items():
                jobs[(i, shape.rho, pass_, method)] = fn
    for fn in jobs.values():  # warm-up, and Flex's compile per shape
        fn()
    samples = {key: [] for key in jobs}
    for _ in range(rounds):
        for key, fn in jobs.items():  # interleaved: every method once per round
            samples[key].append(timed(fn))

    dense_pairs = BATCH * HEADS * n * n
    fwd_flops = 4 * HEAD_DIM
    ceiling = {p: dense_pairs * fwd_flops * (1 if p == "forward" else 3.5)
               / statistics.median(samples[("dense", None, p, "sdpa_dense")]) / 1e6
               for p in ("forward", "forward_backward")}
    record = {"bench": "attention", "n": n, "batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM,
              "dtype": "float32", "threads": torch.get_num_threads(), "rounds": rounds,
              "dense_sdpa_gflops": {p: round(g, 1) for p, g in ceiling.items()}, "ratios": []}
    for i, shape in enumerate(shapes):
        entry = {"rho": shape.rho, "evidence_share": round(shape.evidence.float().mean().item(), 4)}
        for pass_ in ("forward", "forward_backward"):
            times = {method: summarize(samples[(i, shape.rho, pass_, method)]) for method in getattr(shape, pass_)}
            flops = shape.allowed_pairs * fwd_flops * (1 if pass_ == "forward" else 3.5)
            ours_ms = times["ours"]["median_ms"]
            entry[pass_] = {
                "ms": times,
                "ours_effective_gflops": round(flops / ours_ms / 1e6, 1),
                "ours_fraction_of_dense_ceiling": round(flops / ours_ms / 1e6 / ceiling[pass_], 3),
                "speedup_vs_sdpa_mask": round(times["sdpa_mask"]["median_ms"] / ours_ms, 2),
            }
            if "flex" in times:
                entry[pass_]["speedup_vs_flex"] = round(times["flex"]["median_ms"] / ours_ms, 2)
        if flex_compiled is not None:
            entry["flex_block_mask_build_ms"] = round(shape.block_mask_ms, 1)
        record["ratios"].append(entry)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[168, 672, 2688])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (its compile is slow)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; a training worker "
                                                    "with 1 CPU runs 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flex_compiled = None if args.no_flex else torch.compile(flex_attention)
    records = []
    for n in args.sizes:
        record = measure_size(n, args.rounds if n < 2000 else max(3, args.rounds // 2), flex_compiled)
        print(json.dumps(record), flush=True)
        records.append(record)
    target = {f"n={r['n']}": e["forward_backward"]["speedup_vs_sdpa_mask"]
              for r in records for e in r["ratios"] if e["rho"] == 0.25 and r["n"] >= 672}
    print(json.dumps({"bench": "attention_summary",
                      "target": ">= 2x sdpa_mask forward+backward at rho=0.25, N >= 672",
                      "speedup_fwd_bwd_vs_sdpa_mask_at_rho_0.25": target,
                      "target_met": bool(target) and min(target.values()) >= 2.0}), flush=True)


if __name__ == "__main__":
    main()
