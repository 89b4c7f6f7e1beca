"""How selective the adaptive mask is on a featurized split: a measurement, not a timing.

For each task the script draws a target window per example, then two adaptive evidence sets
of that same window with different seeds, and reports the share of the first set that the
second also takes. A uniform draw of the same budget K from N candidates shares K/N in
expectation (printed as `chance`): an adaptive mask whose share is close to K/N picks nearly
the same evidence as a uniform one, whatever its parts compute. docs/evaluation.md ("Adaptive
masks: the ablation") quotes its output:

    python bench/mask_selectivity.py data/quality-metro/features [--temperature 0.1]

Mask settings are the defaults of umask.config.MaskConfig unless overridden here.
"""
import argparse
import json
from pathlib import Path

import torch

from trainer.data.loader import discover, read_row_group, read_spec
from umask.config import TASKS, MaskConfig
from umask.masking import mask_for_window, sample_mask


def selectivity(features: Path, split: str, cfg: MaskConfig, examples: int, draws: int) -> dict:
    """Per task: median candidates N and budget K, the adaptive self-overlap E|A1 & A2| / K
    and chance E[K/N], over all examples and over the sparsest quarter (fewest candidates)."""
    spec = read_spec(features)
    files = discover(features, (split,))
    if not files:
        raise SystemExit(f"{features}: no {split} examples")
    rows = read_row_group(files[0], 0, spec.slots, spec.layout.num_channels)
    dense = torch.tensor(rows.dense[:examples], dtype=torch.float32)
    observed = torch.tensor(rows.observed[:examples], dtype=torch.bool)
    time_of_week = torch.tensor(rows.time_of_week[:examples], dtype=torch.long)
    out = {}
    for name in TASKS:
        task = torch.full((dense.shape[0],), TASKS.index(name))
        shared, chance, candidates, budget = [], [], [], []
        for seed in range(draws):
            first = sample_mask(dense, observed, time_of_week, spec, cfg, torch.Generator().manual_seed(seed), task)
            second = mask_for_window(dense, observed, time_of_week, task, first.cut, first.target, spec, cfg,
                                     torch.Generator().manual_seed(draws + seed))
            n, k = first.candidates.sum(1).float(), first.budget.float()
            kept = k > 0
            shared.append((first.evidence & second.evidence).sum(1).float()[kept] / k[kept])
            chance.append(k[kept] / n[kept])
            candidates.append(n[kept])
            budget.append(k[kept])
        shared, chance = torch.cat(shared), torch.cat(chance)
        candidates, budget = torch.cat(candidates), torch.cat(budget)
        cutoff = torch.quantile(candidates, 0.25)
        sparse = candidates <= cutoff
        out[name] = {"candidates_median": candidates.median().item(), "budget_median": budget.median().item(),
                     "self_overlap": round(shared.mean().item(), 3), "chance": round(chance.mean().item(), 3),
                     "sparsest_quarter_max_candidates": cutoff.item(),
                     "sparsest_self_overlap": round(shared[sparse].mean().item(), 3),
                     "sparsest_chance": round(chance[sparse].mean().item(), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", type=Path, help="a featurize output folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--examples", type=int, default=256, help="from the split's first row group")
    parser.add_argument("--draws", type=int, default=20, help="window draws (seeds) per task")
    parser.add_argument("--temperature", type=float, default=MaskConfig().temperature)
    args = parser.parse_args()
    cfg = MaskConfig(temperature=args.temperature)
    print(json.dumps({"features": str(args.features), "temperature": args.temperature,
                      "tasks": selectivity(args.features, args.split, cfg, args.examples, args.draws)}))


if __name__ == "__main__":
    main()
