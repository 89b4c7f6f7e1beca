"""Writes the tiny samples of every input format that docs/data-contract.md shows, and prints
their tables as the document shows them. tests/data/test_contract_samples.py reads the same
files (the contract reader and the Tsinghua import must accept them) and checks that the
document shows exactly what the files hold.

    .venv/bin/python docs/samples/write_samples.py     # rewrites docs/samples/contract/*.parquet
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
CONTRACT = HERE / "contract"


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def tables() -> dict[str, pa.Table]:
    """The contract sample: two users over three days, every optional column and null case."""
    events = pa.table({
        "user_id": pa.array([1001, 1001, 1001, 1001, 1002, 1002], pa.int64()),
        "ts": pa.array([_utc("2026-11-02T08:05:00"), _utc("2026-11-02T08:40:12"), _utc("2026-11-02T12:10:00"),
                        _utc("2026-11-03T19:00:00"), _utc("2026-11-02T21:15:30"), _utc("2026-11-04T07:00:00")],
                       pa.timestamp("ms", "UTC")),  # Parquet stores seconds as ms
        "app_id": pa.array([11, 12, None, 13, 11, 14], pa.int64()),
        "loc_id": pa.array([501, 501, 502, None, 503, 501], pa.int64()),
        "traffic_bytes": pa.array([20480, 1024, None, 512, 409600, 0], pa.int64()),
        "event": pa.array(["use", "use", None, "install", "use", "uninstall"], pa.string()),
    })
    apps = pa.table({
        "app_id": pa.array([11, 12, 13, 14], pa.int64()),
        "category_id": pa.array([0, 3, 3, 7], pa.int32()),
        "name": pa.array(["maps", "chat", "mail", "puzzle"], pa.string()),
    })
    locations = pa.table({
        "loc_id": pa.array([501, 502, 503], pa.int64()),
        "lat": pa.array([39.9917, 39.9087, None], pa.float64()),
        "lon": pa.array([116.3106, 116.3975, None], pa.float64()),
        "poi_counts": pa.array([[3, 0, 1], [0, 2, 5], None], pa.list_(pa.int32())),
    })
    profiles = pa.table({
        "user_id": pa.array([1001, 1002], pa.int64()),
        "profile_vec": pa.FixedSizeListArray.from_arrays(
            pa.array([0.25, -0.5, 0.0, 1.0, 0.75, 0.125, -1.0, 0.5], pa.float32()), 4),
    })
    return {"events.parquet": events, "apps.parquet": apps, "locations.parquet": locations,
            "profiles.parquet": profiles}


def markdown(table: pa.Table) -> str:
    """A table as the document shows it: a header of `name: type`, then one row per row."""
    head = "| " + " | ".join(f"{f.name}: {_type(f.type)}" for f in table.schema) + " |"
    rule = "|" + "---|" * table.num_columns
    rows = ["| " + " | ".join(_cell(v) for v in row.values()) + " |" for row in table.to_pylist()]
    return "\n".join([head, rule, *rows])


def _type(t: pa.DataType) -> str:
    """The type without the list's child name, which Parquet renames (item -> element)."""
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_type(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t):
        return f"list<{_type(t.value_type)}>"
    return str(t)


def _cell(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def main() -> None:
    CONTRACT.mkdir(parents=True, exist_ok=True)
    for name, table in tables().items():
        pq.write_table(table, CONTRACT / name)
        print(f"{name}\n\n{markdown(table)}\n")


if __name__ == "__main__":
    main()
