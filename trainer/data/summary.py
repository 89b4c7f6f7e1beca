"""`u-mask data summary`: what the featurized data holds, read back from its Parquet files.

Users, examples and events per split (from the manifest), the share of observed slots per
example as quantiles and sparsity buckets (the axis the evaluation reports along), the most
used app categories and how location records spread over regions. One pass over the files,
a row group at a time. `u-mask data summary` prints it for people and writes it as
`<features>/summary.json`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from trainer.data.loader import load_manifest, read_spec
from umask.spec import SPLITS, bucket_labels, sparsity_bucket

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
TOP_CATEGORIES = 10


def summarize(features: str | Path) -> dict:
    """The summary of a featurize output folder as a JSON-ready dict."""
    features = Path(features)
    manifest, spec = load_manifest(features), read_spec(features)
    T, C, K = spec.slots, spec.num_categories, spec.num_regions
    category, region = spec.layout.category, spec.layout.region
    observed_counts = {s: np.zeros(T + 1, np.int64) for s in SPLITS}  # examples by #observed slots
    usage = np.zeros(C + 1)
    in_region = np.zeros(K + 1)
    for path in sorted(features.glob("split=*/shard=*/*.parquet")):
        split = path.parent.parent.name.removeprefix("split=")
        for batch in pq.ParquetFile(path).iter_batches(columns=["observed", "dense"]):
            n = batch.num_rows
            observed = batch.column("observed").flatten().to_numpy(zero_copy_only=False).reshape(n, T)
            observed_counts[split] += np.bincount(observed.sum(axis=1), minlength=T + 1)
            dense = batch.column("dense").flatten().to_numpy().reshape(n * T, -1)  # [n*T, F]
            usage += np.expm1(dense[:, category].astype(np.float64)).sum(axis=0)
            in_region += dense[:, region].sum(axis=0, dtype=np.float64)

    every_split = sum(observed_counts.values())
    names = [str(c) for c in range(C)] + ["unknown"]
    order = np.argsort(-usage, kind="stable")[:TOP_CATEGORIES]
    located = in_region.sum()
    return {
        "features": str(features),
        "slots": T, "slot_seconds": spec.slot_seconds, "spec_digest": spec.digest,
        "users": manifest["users"], "examples": manifest["examples"], "events": manifest["events"],
        "quarantined_rows": (manifest.get("quarantine") or {}).get("rows_quarantined", 0),
        "observed_slot_share": _share_summary(every_split, T, spec.sparsity_edges),
        "observed_slot_share_by_split": {s: _share_summary(observed_counts[s], T, spec.sparsity_edges)
                                         for s in SPLITS if observed_counts[s].any()},
        "category_value": spec.category_value,
        "top_categories": [{"category": names[i], "usage": int(round(usage[i])),
                            "share": float(usage[i] / max(usage.sum(), 1e-12))}
                           for i in order if usage[i] > 0],
        "regions": {"source": spec.region_source, "located_slots": int(round(located)),
                    "regions_used": int(np.count_nonzero(in_region[:K] > 0)),
                    "unknown_share": float(in_region[K] / located) if located else 0.0,
                    "share": [float(v / located) if located else 0.0 for v in in_region[:K]]},
    }


def _share_summary(counts: np.ndarray, T: int, edges: tuple[float, ...]) -> dict:
    """Quantiles and sparsity buckets (the spec's edges, as eval reports them) of the
    observed-slot share, from counts[k] = examples with k observed slots."""
    total = int(counts.sum())
    if total == 0:
        return {"examples": 0}
    shares = np.arange(T + 1) / T
    cumulative = np.cumsum(counts) / total
    quantiles = {f"p{round(q * 100)}": float(shares[np.searchsorted(cumulative, q)]) for q in QUANTILES}
    bucket = sparsity_bucket(shares, edges)
    labels = bucket_labels(edges)
    return {"examples": total, "mean": float((counts * shares).sum() / total), "quantiles": quantiles,
            "buckets": {label: int(counts[bucket == i].sum()) for i, label in enumerate(labels)}}


def format_summary(summary: dict) -> str:
    """The summary as a few readable lines."""
    share = summary["observed_slot_share"]
    lines = [f"features: {summary['features']} ({summary['slots']} slots of {summary['slot_seconds']} s)"]
    lines.append("users (examples) per split: " + ", ".join(
        f"{s} {summary['users'][s]} ({summary['examples'][s]})" for s in SPLITS))
    events = summary["events"]
    lines.append(f"events: {events['featurized']} featurized, {events['duplicates_dropped']} duplicates "
                 f"dropped, {summary['quarantined_rows']} rows quarantined")
    if share.get("examples"):
        quantiles = " ".join(f"{k}={v:.1%}" for k, v in share["quantiles"].items())
        buckets = " ".join(f"{k}: {v}" for k, v in share["buckets"].items())
        lines.append(f"observed slots per example: mean {share['mean']:.1%}, {quantiles}")
        lines.append(f"sparsity buckets (examples): {buckets}")
    top = ", ".join(f"{c['category']} {c['share']:.1%}" for c in summary["top_categories"])
    lines.append(f"top categories by {summary['category_value']}: {top}")
    regions = summary["regions"]
    if regions["source"] == "none":
        lines.append("regions: none, because locations.parquet gives neither region_id nor coordinates: "
                     "the region channels carry no geography (listed places count as unknown, "
                     f"{regions['unknown_share']:.1%} of {regions['located_slots']} located slots; others "
                     "are hashed), while loc_id embeddings still tell places apart")
    else:
        lines.append(f"regions ({regions['source']}): {regions['regions_used']} used over "
                     f"{regions['located_slots']} located slots, unknown {regions['unknown_share']:.1%}")
    return "\n".join(lines)
