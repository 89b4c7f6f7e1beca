"""What every featurize task shares: its input share (a Parquet file, or a run of its row
groups), the facts it reports of itself (peak RSS, node, pid, seconds), and reports written
atomically, so that a report on disk marks finished work (trainer/data/featurize_ray.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq


@dataclasses.dataclass(frozen=True)
class Unit:
    """An input share: row groups [first, end) of one Parquet file (None: the whole file)."""
    index: int
    path: str
    row_groups: tuple[int, int] | None
    rows: int

    def where(self) -> str:
        groups = "" if self.row_groups is None else f" row groups {self.row_groups[0]}-{self.row_groups[1] - 1}"
        return f"{self.path}{groups}"


def plan_units(files: list[Path], rows_per_task: int) -> list[Unit]:
    """The input shares of a table's files: each file whole, or cut between row groups into
    runs of at most rows_per_task rows (a row group larger than that is a share of its own).
    Reads footers only."""
    units = []
    for path in files:
        try:
            metadata = pq.read_metadata(path)
        except Exception:  # the reader names the problem, in the task that reads the file
            units.append(Unit(len(units), str(path), None, 0))
            continue
        groups = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        if sum(groups) <= rows_per_task:
            units.append(Unit(len(units), str(path), None, sum(groups)))
            continue
        first, rows = 0, 0
        for g, n in enumerate(groups):
            if rows and rows + n > rows_per_task:
                units.append(Unit(len(units), str(path), (first, g), rows))
                first, rows = g, 0
            rows += n
        units.append(Unit(len(units), str(path), (first, len(groups)), rows))
    return units


def task_start() -> float:
    """Resets this worker's peak RSS (Ray reuses workers across tasks), returns the start time."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return time.perf_counter()


def task_facts(started: float) -> dict:
    """What a task reports of itself: peak RSS in MB since task_start, node, pid, seconds."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "driver"
    return {"peak_rss_mb": round(peak_rss_bytes() / 2**20, 1), "node": node,
            "pid": os.getpid(), "seconds": round(time.perf_counter() - started, 3)}


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM (resettable), else getrusage's lifetime peak."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_json(path: Path, data: dict) -> None:
    """data as JSON at path, renamed into place when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """The report at path, or None when there is none (the task did not finish)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def atomic_path(path: Path) -> Path:
    """A temporary name beside path, to write to and os.replace onto it."""
    return path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
