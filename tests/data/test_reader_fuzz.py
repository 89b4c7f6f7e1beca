"""Fuzzing the contract reader and featurize against a plain-Python oracle of the contract.

Generated events mix valid rows with every kind of invalid one (null, negative and >= 2^63
ids, null and implausible ts, negative bytes, unknown events), in random integer widths and
timestamp units, split over several files and batches, with exact duplicates and users of a
single event. Whatever the mix: every valid row comes out once, every invalid one is
quarantined, the counts add up, and featurize makes exactly the (user, window) examples the
valid rows imply. Damaged files end in one ContractError naming the file.
"""
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.config import DataConfig
from umask.contract import NORMALIZED_EVENTS, ContractError, EventReader, open_dataset
from trainer.data.featurize import build_feature_spec, featurize_events, prepare_output
from umask.spec import WINDOW_ORIGIN

START, END = 946_684_800, 4_102_444_800  # the default plausible range
EVENTS = ("use", "install", "uninstall")

user_ids = st.one_of(st.integers(0, 50), st.integers(0, 2**63 - 1), st.integers(-5, -1), st.none())
timestamps = st.one_of(st.integers(1_790_000_000, 1_790_000_000 + 30 * 86400),  # plausible, Oct 2026
                       st.integers(START, END - 1), st.integers(-10**9, START - 1),
                       st.integers(END, 10**12), st.none())
rows = st.tuples(user_ids, timestamps,
                 st.one_of(st.integers(-2**63, 2**63 - 1), st.none()),  # app_id: any int64 or null
                 st.one_of(st.integers(0, 2**63 - 1), st.none()),  # loc_id
                 st.one_of(st.integers(0, 10**9), st.integers(-10, -1), st.none()),  # traffic_bytes
                 st.one_of(st.sampled_from(EVENTS), st.sampled_from(["click", ""]), st.none()))
layouts = st.fixed_dictionaries({
    "user_type": st.sampled_from(["int64", "int32", "uint64"]),
    "ts_type": st.sampled_from(["int64", "s", "ms", "us", "ns"]),
    "files": st.integers(1, 3),
    "batch_rows": st.integers(1, 7),
    "duplicates": st.integers(0, 3),
})


def valid(row) -> bool:
    """The contract's rule for an events row, in plain Python."""
    user, ts, _, _, traffic, event = row
    return (user is not None and 0 <= user < 2**63 and ts is not None and START <= ts < END
            and (traffic is None or traffic >= 0) and (event is None or event in EVENTS))


def representable(row, layout) -> tuple:
    """The row as the chosen column types can hold it: ids that do not fit int32/uint64 are
    replaced, as a writer of that type could not have produced them."""
    user = row[0]
    if user is not None and layout["user_type"] == "int32" and not -2**31 <= user < 2**31:
        user = user % 2**31
    if user is not None and layout["user_type"] == "uint64":
        user = user if user >= 0 else 2**63 + (-user)  # >= 2^63: invalid as the contract says
    return (user, *row[1:])


def write_events(folder: Path, table_rows: list[tuple], layout) -> None:
    folder.mkdir(parents=True)
    parts = np.array_split(np.arange(len(table_rows)), layout["files"])
    for i, part in enumerate(parts):
        chunk = [table_rows[j] for j in part]
        columns = list(zip(*chunk)) if chunk else [[]] * 6
        ts = pa.array(columns[1], pa.int64())
        if layout["ts_type"] != "int64":
            per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[layout["ts_type"]]
            # ns cannot hold the far implausible times: clip them to still-implausible ones
            scaled = [None if t is None else min(max(t, -9 * 10**9), 9 * 10**9) * per_second for t in columns[1]]
            ts = pa.array(scaled, pa.int64()).cast(pa.timestamp(layout["ts_type"], "UTC"))
        table = pa.table({
            "user_id": pa.array(columns[0], getattr(pa, layout["user_type"])()),
            "ts": ts,
            "app_id": pa.array(columns[2], pa.int64()),
            "loc_id": pa.array(columns[3], pa.int64()),
            "traffic_bytes": pa.array(columns[4], pa.int64()),
            "event": pa.array(columns[5], pa.string()).dictionary_encode(),
        })
        pq.write_table(table, folder / f"part-{i}.parquet")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(rows, max_size=40), layouts, st.randoms(use_true_random=False))
def test_every_valid_row_once_every_invalid_row_quarantined(tmp_path_factory, table_rows, layout, rng):
    base = tmp_path_factory.mktemp("fuzz")
    table_rows = [representable(r, layout) for r in table_rows]
    for _ in range(layout["duplicates"]):  # exact repeats, as at-least-once exports write them
        if table_rows:
            table_rows.append(rng.choice(table_rows))
    rng.shuffle(table_rows)
    if not table_rows:
        return
    write_events(base / "ds" / "events", table_rows, layout)

    reader = EventReader(open_dataset(base / "ds"), "quarantine", base / "q", batch_rows=layout["batch_rows"])
    out = pa.Table.from_batches(list(reader.batches()), schema=NORMALIZED_EVENTS)
    expected = [r for r in table_rows if valid(r)]
    assert reader.report.rows_read == len(table_rows)
    assert reader.report.rows_valid == out.num_rows == len(expected)
    assert reader.report.rows_quarantined == len(table_rows) - len(expected)
    got = Counter(zip(out.column("user_id").to_pylist(), out.column("ts").to_pylist(),
                      out.column("app_id").to_pylist(), out.column("loc_id").to_pylist(),
                      out.column("traffic_bytes").to_pylist()))
    assert got == Counter((u, t, a, lo, b) for u, t, a, lo, b, _ in expected)
    quarantined = sum(pq.read_metadata(p).num_rows for p in reader.report.quarantine_files)
    assert quarantined == reader.report.rows_quarantined

    # featurize: duplicates dropped once, one example per (user, window) of the valid rows
    cfg = DataConfig(slots=24, num_categories=2, num_regions=2, num_shards=2, featurize_workers=1)
    spec, maps = build_feature_spec(None, None, cfg)
    prepare_output(base / "features")
    if out.num_rows == 0:
        return
    manifest = featurize_events(out.to_batches(max_chunksize=5), spec, maps, cfg, base / "features")
    distinct = {(u, t, a, lo, b, {None: 0, "use": 0, "install": 1, "uninstall": 2}[e]) for u, t, a, lo, b, e in expected}
    assert manifest["events"]["read"] == len(expected)
    assert manifest["events"]["featurized"] == len(distinct)
    windows = {(u, (t - WINDOW_ORIGIN) // (24 * 3600)) for u, t, *_ in expected}
    assert sum(manifest["examples"].values()) == len(windows)
    assert sum(manifest["users"].values()) == len({u for u, *_ in expected})


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "e.parquet"
    n = 500
    pq.write_table(pa.table({"user_id": pa.array(np.arange(n) % 37, pa.int64()),
                             "ts": pa.array(1_790_000_000 + np.arange(n) * 60, pa.int64()),
                             "app_id": pa.array(np.arange(n), pa.int64()),
                             "loc_id": pa.array(np.arange(n) % 11, pa.int64())}), path, row_group_size=100)
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_files_end_in_one_error_naming_the_file(tmp_path_factory, good_file, data):
    """Truncated at any byte, or with bytes flipped anywhere: every valid row read, or one
    ContractError that names the file; never another exception, never a hang."""
    damage = data.draw(st.sampled_from(["truncate", "flip"]))
    content = bytearray(good_file)
    if damage == "truncate":
        content = content[:data.draw(st.integers(0, len(content) - 1))]
    else:
        for at in data.draw(st.lists(st.integers(0, len(content) - 1), min_size=1, max_size=8)):
            content[at] ^= 0xFF
    path = tmp_path_factory.mktemp("damaged") / "events.parquet"
    path.write_bytes(bytes(content))
    reader = EventReader(open_dataset(path), "quarantine", path.parent / "q")
    try:
        rows = sum(batch.num_rows for batch in reader.batches())
    except ContractError as err:
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
        return
    # damage the reader could not see (inside values) still leaves the row count whole
    assert rows + reader.report.rows_quarantined == 500
