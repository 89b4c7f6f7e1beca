"""How often the id hashing puts two raw ids on one table row, on synthetic Zipf-popular ids.

Raw ids are hashed to rows by the feature spec's rule (umask.spec.table_rows: splitmix64 mod
the row count), so two ids can share a row and its vector. For each vocabulary size V (distinct
raw ids, random int64 like the contract's sparse ids) and each table size R, it reports:
  colliding_ids      the share of the V ids whose row holds another id too
  colliding_lookups  the share of L lookups, ids drawn by Zipf popularity (exponent s), that
                     land on a shared row
  expected           1 - (1 - 1/R)^(V - 1), the share for uniform hashing (the birthday bound)
Popularity is independent of the hash, so colliding_lookups ~ colliding_ids; the Zipf draw
checks that hot ids are not hashed worse than cold ones. One JSON line per (V, R), then a
summary line.

    .venv/bin/python -m bench.id_collision_bench [--vocab 1e4 1e5 1e6 1e7] [--rows 4096 1e5 1e6 1e7 1e8]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from umask.spec import table_rows


def collision_shares(ids: np.ndarray, lookups: np.ndarray, num_rows: int) -> tuple[float, float]:
    """(share of distinct ids [V] on a shared row, share of lookups [L] (indices into ids) on one)."""
    rows = table_rows(ids, num_rows)
    _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    shared = counts[inverse] > 1  # [V]: this id's row holds another id too
    return float(shared.mean()), float(shared[lookups].mean())


def zipf_lookups(vocab: int, count: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """[count] indices in [0, vocab), index k drawn with probability proportional to 1/(k+1)^exponent."""
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent)
    return np.searchsorted(cdf, rng.random(count) * cdf[-1]).clip(max=vocab - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--rows", type=float, nargs="+", default=[4096, 1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--lookups", type=float, default=1e6)
    parser.add_argument("--exponent", type=float, default=1.1, help="Zipf exponent of id popularity")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    results = []
    for vocab in map(int, args.vocab):
        ids = rng.integers(0, 2**63 - 1, size=vocab, dtype=np.int64)  # distinct with near certainty
        lookups = zipf_lookups(vocab, int(args.lookups), args.exponent, rng)
        for num_rows in map(int, args.rows):
            ids_share, lookup_share = collision_shares(ids, lookups, num_rows)
            result = {"vocab": vocab, "rows": num_rows, "colliding_ids": round(ids_share, 5),
                      "colliding_lookups": round(lookup_share, 5),
                      "expected": round(-np.expm1((vocab - 1) * np.log1p(-1.0 / num_rows)), 5)}
            results.append(result)
            print(json.dumps({"bench": "id_collision", **result}), flush=True)
    print(json.dumps({"bench": "id_collision", "summary": True, "configs": len(results),
                      "lookups": int(args.lookups), "exponent": args.exponent,
                      "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
