"""The markdown tables of docs/evaluation.md and README from `u-mask eval` reports (report.json).

    .venv/bin/python -m bench.quality_tables data/quality-metro/report-test/report.json ...

Per report: every method on every task (bucket `all`), bold for the best value of a column, and
after each other method's value U-MASK's verdict against it from the paired 95 % interval over
users (report.json `intervals`): ▲ U-MASK ahead (the interval excludes 0 on its side), ▼ behind,
= within noise. Then U-MASK minus the learned baseline (`mae`) and minus the uniform-trained
model, with the intervals, for all users and the sparsest bucket. Volume MAE: lower is better.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = (("category_acc1", "cat Acc@1"), ("category_mrr", "cat MRR"), ("region_acc1", "region Acc@1"),
           ("volume_mae", "volume MAE"), ("app_recall10", "app R@10"))
LOWER_IS_BETTER = {"volume_mae"}
MODEL = "umask"
VERSUS = ("mae", "umask_uniform_mask")


def verdict(interval: dict, metric: str) -> str:
    """▲ / ▼ / = for U-MASK against a method, from U-MASK minus it (low, high)."""
    sign = -1 if metric in LOWER_IS_BETTER else 1
    low, high = sorted((sign * interval["low"], sign * interval["high"]))
    return "▲" if low > 0 else "▼" if high < 0 else "="


def methods_table(report: dict) -> list[str]:
    lines = ["| task | method | " + " | ".join(name for _, name in METRICS) + " |",
             "|---|---|" + "---:|" * len(METRICS)]
    for task, methods in report["tasks"].items():
        best = {m: (min if m in LOWER_IS_BETTER else max)(v["all"][m] for v in methods.values()) for m, _ in METRICS}
        for method, buckets in methods.items():
            cells = []
            for metric, _ in METRICS:
                value = buckets["all"][metric]
                cell = f"**{value:.3f}**" if value == best[metric] else f"{value:.3f}"
                if method != MODEL:
                    cell += " " + verdict(report["intervals"][task]["all"][metric][method], metric)
                cells.append(cell)
            lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    return lines


def intervals_table(report: dict) -> list[str]:
    lines = ["| task | bucket (scored slots) | vs | " + " | ".join(name for _, name in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for task, buckets in report["intervals"].items():
        sparsest = next(b for b in buckets if b != "all")
        for bucket in ("all", sparsest):
            slots = report["tasks"][task][MODEL][bucket]["slots"]
            for method in VERSUS:
                if method not in buckets[bucket]["category_mrr"]:
                    continue
                cells = []
                for metric, _ in METRICS:
                    i = buckets[bucket][metric][method]
                    word = {"▲": " ahead", "▼": " behind", "=": ""}[verdict(i, metric)]
                    cells.append(f"{i['difference']:+.3f} [{i['low']:+.3f}, {i['high']:+.3f}]{word}")
                lines.append(f"| {task} | {bucket} ({slots}) | {method} | " + " | ".join(cells) + " |")
    return lines


def render(path: Path) -> str:
    report = json.loads(path.read_text())
    head = (f"**split `{report['settings']['split']}`** ({report['examples']} user-weeks of {report['users']} "
            f"users, step {report['step']}, {report['settings']['samples']} seed(s)), bucket `all`:")
    tail = ("U-MASK minus the learned baseline and minus the uniform-trained model, paired 95 % interval "
            "over users, for all scored slots and the sparsest bucket; *ahead*/*behind* where the "
            "interval excludes 0 (volume MAE: lower is better, so a negative difference is ahead):")
    return "\n".join([head, "", *methods_table(report), "", tail, "", *intervals_table(report)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files of `u-mask eval`")
    for path in parser.parse_args().reports:
        print(render(path))


if __name__ == "__main__":
    main()
