"""The contract reader: opens a dataset in the data contract and yields it normalized.

The contract (docs/data-contract.md) admits many physical layouts: ids of any integer
width, timestamps in any unit or time zone, events as strings or dictionaries, a single
Parquet file or a hive-partitioned directory. This module checks a dataset against it and
turns every valid events row into NORMALIZED_EVENTS, streaming record batches (memory is
bounded by `batch_rows`, never by the dataset) with vectorized pyarrow compute.

Problems come in two kinds. Schema problems (a missing required column, a column whose type
cannot hold what the contract asks, a file that is not Parquet) stop the read with a
ContractError naming file and column. Row problems (null user_id or ts, a ts outside the
plausible range, negative user_id or traffic_bytes, an unsigned id >= 2^63, an unknown
event) either stop the read naming file,
column and row (policy "strict") or set the row aside in a quarantine Parquet file with its
reason (policy "quarantine"), while every valid row goes on.

Every table, events and side tables alike, may be one Parquet file or a directory of them
(Spark's `apps.parquet/` holding part files; hive partitions such as `dt=2026-11-01/`). A file
with zero rows is skipped whatever its columns (pandas writes an empty frame's columns with
the Arrow `null` type). INT96 timestamps (Spark, Hive, Impala) are read in microseconds, which
hold any date, not pyarrow's default nanoseconds, which overflow outside 1677-2262. A `ts`
outside the plausible range (data.plausible_start/end, [2000-01-01, 2100-01-01) by default;
fixed dates, so reruns agree) is an invalid row: epoch-0 placeholders, sentinel dates such as
9999-12-31, and integer timestamps in milliseconds or nanoseconds written where seconds are
meant all land there.

Choices the contract leaves open:
- In a table directory every file whose path has no part starting with `_` or `.` (Spark's
  `_SUCCESS`, `.crc` files) must be Parquet; a 0-byte file is an error, not an empty table,
  because it usually means an interrupted export. Hive partition values are not read as
  columns: every column the contract needs lives in the files.
- A non-empty file whose required column has the `null` type holds only invalid rows
  (null user_id or ts): they are quarantined like any other.
- Sub-second timestamps are floored to the second.
- locations: lat and lon may both be null (coordinates unknown, as in the Tsinghua import);
  such locations fall in the unknown region unless region_id is given. NaN is not accepted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from umask.errors import UserError

# the one layout every valid events row becomes; event codes, in NORMALIZED_EVENTS.event
EVENT_CODES = {"use": 0, "install": 1, "uninstall": 2}

NORMALIZED_EVENTS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),  # epoch seconds, UTC
        pa.field("app_id", pa.int64()),
        pa.field("loc_id", pa.int64()),
        pa.field("traffic_bytes", pa.int64()),  # null when the column is absent
        pa.field("event", pa.int8(), nullable=False),  # EVENT_CODES
    ]
)

SIDE_TABLES = ("apps.parquet", "locations.parquet", "profiles.parquet")
POLICIES = ("strict", "quarantine")
INT64_LIMIT = 2**63
INT32_LIMIT = 2**31

APPS = pa.schema([pa.field("app_id", pa.int64(), nullable=False),
                  pa.field("category_id", pa.int32(), nullable=False)])

# event names in code order, so the position found by index_in is the code
_EVENT_NAMES = pa.array(sorted(EVENT_CODES, key=EVENT_CODES.get), pa.string())
_EVENT_CODES = pa.array(sorted(EVENT_CODES.values()), pa.int8())
_SECONDS_PER_UNIT = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
# the contract columns as they were, for quarantine files (original values as text)
QUARANTINE = pa.schema([(name, pa.string()) for name in NORMALIZED_EVENTS.names]
                       + [("reason", pa.string()), ("file", pa.string()), ("row", pa.int64())])


class ContractError(UserError):
    """Input that breaks the data contract: names the file, column and, for rows, the row."""


@dataclass
class ContractDataset:
    """Where a dataset's tables are; the optional side tables (a file or a directory of part
    files) are None when absent."""
    root: Path
    event_files: list[Path]
    apps: Path | None = None
    locations: Path | None = None
    profiles: Path | None = None


DEFAULT_PLAUSIBLE = (946_684_800, 4_102_444_800)  # [2000-01-01, 2100-01-01) UTC, epoch seconds


def open_dataset(source: str | Path) -> ContractDataset:
    """Find the events files and side tables of a dataset folder, events directory or file.

    A dataset folder holds `events/` or `events.parquet` (a file, or a directory of part
    files as Spark writes it; directories are searched recursively), and the optional side
    tables, each a file or such a directory. An events directory or file given directly
    takes side tables from the folder beside it.
    """
    path = Path(source)
    if path.is_file():
        return _with_side_tables(path.parent, [path])
    if not path.is_dir():
        raise ContractError(f"{path}: no such file or directory; expected a dataset folder "
                            "holding events/ or events.parquet, or an events Parquet file")
    events_dir, events_file = path / "events", path / "events.parquet"
    if events_dir.exists() and events_file.exists():
        raise ContractError(f"{path}: holds both events/ and events.parquet; keep one")
    if events_dir.is_dir():
        return _with_side_tables(path, _walk_events(events_dir))
    if events_file.exists():
        return _with_side_tables(path, table_files(events_file))
    if any((path / name).exists() for name in SIDE_TABLES):
        raise ContractError(f"{path}: no events/ directory or events.parquet (events are required)")
    return _with_side_tables(path.parent, _walk_events(path))


def _walk_events(directory: Path) -> list[Path]:
    files = _data_files(directory)
    if not files:
        raise ContractError(f"{directory}: events directory holds no files")
    return files


def _data_files(directory: Path) -> list[Path]:
    """The files of a table directory, sorted, without Spark's `_SUCCESS`/`.crc` markers or
    anything else under a path part starting with `_` or `.`."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and not any(
        part.startswith(("_", ".")) for part in p.relative_to(directory).parts))


def table_files(table: Path) -> list[Path]:
    """The Parquet files of one table: the file itself, or a directory's part files."""
    if table.is_dir():
        files = _data_files(table)
        if not files:
            raise ContractError(f"{table}: table directory holds no part files")
        return files
    return [table]


def _with_side_tables(folder: Path, event_files: list[Path]) -> ContractDataset:
    found = [folder / name if (folder / name).exists() else None for name in SIDE_TABLES]
    return ContractDataset(folder, event_files, *found)


def _open_parquet(path: Path) -> pq.ParquetFile:
    if path.stat().st_size == 0:
        raise ContractError(f"{path}: file is empty (0 bytes), not a Parquet file")
    try:
        # INT96 in microseconds: nanoseconds (the default) overflow outside 1677-2262.
        # No pre-buffering: it reads every requested row group ahead of the batches, so a
        # featurize task's memory grew with its share (240 against 133 MB over 7 row groups of
        # events), and reading local files it was not faster.
        return pq.ParquetFile(path, coerce_int96_timestamp_unit="us", pre_buffer=False)
    except (pa.ArrowException, OSError) as err:
        raise ContractError(f"{path}: not a readable Parquet file ({_one_line(err)})") from err


def _iter_batches(path: Path, parquet: pq.ParquetFile, columns: list[str], batch_rows: int,
                  row_groups: tuple[int, int] | None = None) -> Iterator[pa.RecordBatch]:
    groups = None if row_groups is None else list(range(*row_groups))
    try:
        yield from parquet.iter_batches(batch_size=batch_rows, columns=columns, row_groups=groups)
    except (pa.ArrowException, OSError) as err:
        raise ContractError(f"{path}: cannot read Parquet data ({_one_line(err)})") from err


def _one_line(err: Exception) -> str:
    """A library's message on one line: Arrow's span several ("...\nDeserializing page header failed.")."""
    return " ".join(str(err).split())


# --- column types ---------------------------------------------------------------------

def _is_integer(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_key(t: pa.DataType) -> bool:
    """An events key column: integers, or `null` (every row then invalid, and quarantined)."""
    return pa.types.is_integer(t) or pa.types.is_null(t)


def _is_optional_integer(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_null(t)


def _is_event_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or pa.types.is_null(t))


def _is_time(t: pa.DataType) -> bool:
    return pa.types.is_timestamp(t) or pa.types.is_integer(t) or pa.types.is_null(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)


def _is_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)
            or pa.types.is_fixed_size_list(t))


def _is_int_list(t: pa.DataType) -> bool:
    return _is_list(t) and pa.types.is_integer(t.value_type)


def _is_float_list(t: pa.DataType) -> bool:
    return _is_list(t) and (pa.types.is_floating(t.value_type)
                            or pa.types.is_integer(t.value_type))


def _check_column(path: Path, schema: pa.Schema, name: str, accepts: Callable[[pa.DataType], bool],
                  expected: str, required: bool = True) -> bool:
    """True when the column is present with an acceptable type; False when absent and optional."""
    if name not in schema.names:
        if required:
            raise ContractError(f"{path}: missing required column {name!r} ({expected})")
        return False
    if schema.names.count(name) > 1:
        raise ContractError(f"{path}: column {name!r} appears more than once")
    found = schema.field(name).type
    if not accepts(found):
        hint = ""
        if pa.types.is_floating(found) and "integer" in expected:
            hint = " (pandas writes integer columns with missing values as float: use its Int64 dtype)"
        raise ContractError(f"{path}: column {name!r} has type {found}; expected {expected}{hint}")
    return True


# --- events -----------------------------------------------------------------------------

# (column, accepts, expected, required)
_EVENT_COLUMNS = [
    ("user_id", _is_key, "an integer type", True),
    ("ts", _is_time, "a timestamp or integer epoch seconds", True),
    ("app_id", _is_optional_integer, "an integer type", True),
    ("loc_id", _is_optional_integer, "an integer type", False),
    ("traffic_bytes", _is_optional_integer, "an integer type", False),
    ("event", _is_event_text, "string or dictionary<string>", False),
]


@dataclass
class ReadReport:
    """What a read of the events saw: counts over all files and where invalid rows went.

    by_reason counts each invalid row once, under its first failing check (column order).
    """
    files: int = 0
    empty_files_skipped: int = 0
    rows_read: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    quarantine_files: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["quarantine_files"] = [str(p) for p in self.quarantine_files]
        return out


@dataclass
class _RowCheck:
    column: str
    reason: str
    failed: pa.BooleanArray  # [rows], no nulls


class EventReader:
    """Streams a dataset's events as NORMALIZED_EVENTS batches; `.report` counts what it saw.

    policy "strict" stops at the first invalid row; "quarantine" writes invalid rows to
    `quarantine_dir/<file path under root, '/' as '__'>` (one Parquet file per source file
    that has invalid rows, replaced on each read) and goes on.
    """

    def __init__(self, ds: ContractDataset, policy: str = "strict",
                 quarantine_dir: Path | None = None, batch_rows: int = 1 << 20,
                 plausible: tuple[int, int] = DEFAULT_PLAUSIBLE):
        """plausible: [start, end) epoch seconds of a valid ts (data.plausible_start/end)."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        if policy == "quarantine" and quarantine_dir is None:
            raise ValueError("policy 'quarantine' needs a quarantine_dir")
        self.ds = ds
        self.policy = policy
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir is not None else None
        self.batch_rows = batch_rows
        self.plausible = plausible
        self.report = ReadReport()

    def batches(self) -> Iterator[pa.RecordBatch]:
        for path in self.ds.event_files:
            yield from self.file_batches(path)

    def file_batches(self, path: Path, row_groups: tuple[int, int] | None = None) -> Iterator[pa.RecordBatch]:
        """One events file's batches; row_groups [first, end) reads only those row groups (a
        featurize task's share of a large file), with rows still numbered from the file's start
        in errors and quarantine files. A share that starts past row group 0 does not count
        the file again in the report, and quarantines to its own file (`<name>.rg<first>-<end>.parquet`)."""
        parquet = _open_parquet(path)
        first_group = 0 if row_groups is None else row_groups[0]
        if parquet.metadata.num_rows == 0:  # valid whatever its columns' types
            self.report.empty_files_skipped += first_group == 0
            return
        schema = parquet.schema_arrow
        present = [name for name, accepts, expected, required in _EVENT_COLUMNS
                   if _check_column(path, schema, name, accepts, expected, required)]
        self.report.files += first_group == 0
        quarantine = self._quarantine_path(path, row_groups)
        if quarantine is not None:
            quarantine.unlink(missing_ok=True)
        writer = None
        first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(first_group))
        try:
            for batch in _iter_batches(path, parquet, present, self.batch_rows, row_groups):
                normalized, checks = _normalize(batch, self.plausible)
                invalid = _any_failed(checks, batch.num_rows)
                n_invalid = pc.sum(invalid).as_py() or 0
                self.report.rows_read += batch.num_rows
                if n_invalid:
                    if self.policy == "strict":
                        raise _first_invalid_row(path, batch, checks, invalid, first_row)
                    if writer is None:
                        writer = pq.ParquetWriter(quarantine, QUARANTINE)
                        self.report.quarantine_files.append(quarantine)
                    writer.write_table(self._quarantined(path, batch, checks, invalid, first_row))
                    normalized = normalized.filter(pc.invert(invalid))
                first_row += batch.num_rows
                self.report.rows_valid += normalized.num_rows
                if normalized.num_rows:
                    yield normalized
        finally:
            if writer is not None:
                writer.close()

    def _quarantine_path(self, path: Path, row_groups: tuple[int, int] | None = None) -> Path | None:
        if self.policy != "quarantine":
            return None
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        try:
            relative = path.resolve().relative_to(self.ds.root.resolve())
        except ValueError:
            relative = Path(path.name)
        name = Path("__".join(relative.parts))
        if row_groups is not None:  # part.parquet -> part.rg00002-00004.parquet
            name = name.with_name(f"{name.stem}.rg{row_groups[0]:05d}-{row_groups[1]:05d}{name.suffix}")
        return self.quarantine_dir / name

    def _quarantined(self, path: Path, batch: pa.RecordBatch, checks: list[_RowCheck],
                     invalid: pa.BooleanArray, first_row: int) -> pa.Table:
        rows = batch.filter(invalid)
        reasons = pc.case_when(pc.make_struct(*[pc.filter(c.failed, invalid) for c in checks]),
                               *[pa.scalar(c.reason) for c in checks])
        for counted in pc.value_counts(reasons).to_pylist():
            reason = counted["values"]
            self.report.by_reason[reason] = self.report.by_reason.get(reason, 0) + counted["counts"]
        self.report.rows_quarantined += rows.num_rows
        columns = [_as_text(rows.column(name)) if name in rows.schema.names
                   else pa.nulls(rows.num_rows, pa.string()) for name in NORMALIZED_EVENTS.names]
        row_index = pc.add(pc.indices_nonzero(invalid), first_row).cast(pa.int64())
        columns += [reasons, pa.repeat(pa.scalar(str(path)), rows.num_rows), row_index]
        return pa.Table.from_arrays(columns, schema=QUARANTINE)


def read_events(ds: ContractDataset, policy: str = "strict", quarantine_dir: Path | None = None,
                batch_rows: int = 1 << 20,
                plausible: tuple[int, int] = DEFAULT_PLAUSIBLE) -> Iterator[pa.RecordBatch]:
    """The valid events as NORMALIZED_EVENTS batches (use EventReader to see the report)."""
    return EventReader(ds, policy, quarantine_dir, batch_rows, plausible).batches()


def _normalize(batch: pa.RecordBatch, plausible: tuple[int, int]) -> tuple[pa.RecordBatch, list[_RowCheck]]:
    """The batch in NORMALIZED_EVENTS (invalid rows still in it) and the row checks;
    plausible: [start, end) epoch seconds of a valid ts."""
    rows = batch.num_rows
    checks: list[_RowCheck] = []

    user_id = batch.column("user_id")
    checks.append(_RowCheck("user_id", "null user_id", pc.is_null(user_id)))
    user_id = _to_int64(user_id, "user_id", checks)
    checks.append(_RowCheck("user_id", "negative user_id", _true_where(pc.less(user_id, 0))))

    ts = batch.column("ts")
    checks.append(_RowCheck("ts", "null ts", pc.is_null(ts)))
    ts = _epoch_seconds(ts) if pa.types.is_timestamp(ts.type) else _to_int64(ts, "ts", checks)
    start, end = plausible
    checks.append(_RowCheck("ts", f"ts outside the plausible range [{_date(start)}, {_date(end)}) "
                                  "(data.plausible_start/end; integer ts must be epoch seconds)",
                            _true_where(pc.or_(pc.less(ts, start), pc.greater_equal(ts, end)))))

    app_id = _to_int64(batch.column("app_id"), "app_id", checks)
    loc_id = (_to_int64(batch.column("loc_id"), "loc_id", checks) if "loc_id" in batch.schema.names
              else pa.nulls(rows, pa.int64()))  # app-only telemetry

    if "traffic_bytes" in batch.schema.names:
        traffic = _to_int64(batch.column("traffic_bytes"), "traffic_bytes", checks)
        checks.append(_RowCheck("traffic_bytes", "negative traffic_bytes",
                                _true_where(pc.less(traffic, 0))))
    else:
        traffic = pa.nulls(rows, pa.int64())

    if "event" in batch.schema.names:
        names = _as_text(batch.column("event"))
        position = pc.index_in(names, value_set=_EVENT_NAMES)
        checks.append(_RowCheck("event", "unknown event",
                                pc.and_(pc.is_valid(names), pc.is_null(position))))
        event = pc.fill_null(pc.take(_EVENT_CODES, position), 0)
    else:
        event = pa.array(np.zeros(rows, np.int8))

    columns = [pc.fill_null(user_id, 0), pc.fill_null(ts, 0), app_id, loc_id, traffic, event]
    return pa.RecordBatch.from_arrays(columns, schema=NORMALIZED_EVENTS), checks


def _to_int64(values: pa.Array, column: str, checks: list[_RowCheck]) -> pa.Array:
    """Any integer (or null) column as int64; uint64 values >= 2^63 become null and a check."""
    if values.type == pa.uint64():
        too_big = _true_where(pc.greater_equal(values, pa.scalar(INT64_LIMIT, pa.uint64())))
        checks.append(_RowCheck(column, f"{column} >= 2^63", too_big))
        values = pc.if_else(too_big, pa.scalar(None, pa.uint64()), values)
    return values.cast(pa.int64())


def _epoch_seconds(ts: pa.Array) -> pa.Array:
    """Timestamps of any unit and zone as int64 epoch seconds, floored.

    Arrow stores tz-aware timestamps as UTC instants, so the zone only labels them; naive
    ones are taken as UTC, as the contract says.
    """
    ticks = ts.cast(pa.int64())
    per_second = _SECONDS_PER_UNIT[ts.type.unit]
    if per_second == 1:
        return ticks
    # integer divide truncates toward zero; step back one second for negative remainders
    seconds = pc.divide(ticks, per_second)
    behind = pc.less(pc.subtract(ticks, pc.multiply(seconds, per_second)), 0)
    return pc.if_else(behind, pc.subtract(seconds, 1), seconds)


def _date(epoch_seconds: int) -> str:
    """The UTC date of epoch seconds, or the number itself outside Python's years 1-9999."""
    try:
        return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%d")
    except (OverflowError, ValueError, OSError):
        return f"{epoch_seconds} s"


def _as_text(values: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values.cast(pa.string())


def _true_where(mask: pa.Array) -> pa.BooleanArray:
    return pc.fill_null(mask, False)


def _any_failed(checks: list[_RowCheck], rows: int) -> pa.BooleanArray:
    invalid = pa.array(np.zeros(rows, bool))
    for check in checks:
        invalid = pc.or_(invalid, check.failed)
    return invalid


def _first_invalid_row(path: Path, batch: pa.RecordBatch, checks: list[_RowCheck],
                       invalid: pa.BooleanArray, first_row: int) -> ContractError:
    at = pc.index(invalid, True).as_py()
    check = next(c for c in checks if c.failed[at].as_py())
    value = batch.column(check.column)[at].as_py()
    shown = "" if value is None else f" (value {value!r})"
    return ContractError(f"{path}: row {first_row + at}, column {check.column!r}: "
                         f"{check.reason}{shown}")


# --- side tables ------------------------------------------------------------------------

def _side_batches(table: Path, columns_of: Callable[[Path, pa.Schema], list[str]],
                  batch_rows: int = 1 << 20) -> Iterator[tuple[Path, int, pa.RecordBatch]]:
    """(file, row of the batch's first row in that file, batch) over a side table's files.

    columns_of(file, schema) checks a file's columns and returns those to read; every
    non-empty file must give the same ones. Files with zero rows are skipped unchecked.
    """
    expected = None
    for path in table_files(table):
        parquet = _open_parquet(path)
        if parquet.metadata.num_rows == 0:
            continue
        columns = columns_of(path, parquet.schema_arrow)
        if expected is None:
            expected = (path, columns)
        elif columns != expected[1]:
            raise ContractError(f"{path}: has columns {columns}, but {expected[0]} has {expected[1]}; "
                                "the part files of one table must have the same columns")
        first_row = 0
        for batch in _iter_batches(path, parquet, columns, batch_rows):
            yield path, first_row, batch
            first_row += batch.num_rows


def read_apps(ds: ContractDataset, num_categories: int | None = None) -> pa.Table | None:
    """apps.parquet (a file or a directory of part files) as (app_id int64, category_id int32),
    or None when the dataset has none.

    app_id must be unique; category_id in [0, num_categories) (upper bound when given).
    """
    if ds.apps is None:
        return None

    def columns_of(path: Path, schema: pa.Schema) -> list[str]:
        _check_column(path, schema, "app_id", _is_integer, "an integer type")
        _check_column(path, schema, "category_id", _is_integer, "an integer type")
        return ["app_id", "category_id"]

    upper = INT32_LIMIT if num_categories is None else num_categories
    batches, places = [], []
    for path, first_row, batch in _side_batches(ds.apps, columns_of):
        app_id = _checked_id(path, batch.column("app_id"), "app_id", first_row)
        category = batch.column("category_id")
        _reject_rows(path, "category_id", first_row, pc.is_null(category), "null category_id")
        _reject_rows(path, "category_id", first_row, pc.less(category, 0), "negative category_id")
        _reject_rows(path, "category_id", first_row, pc.greater_equal(category, upper),
                     f"category_id >= {upper}" + (" (data.num_categories)" if num_categories else ""))
        batches.append(pa.record_batch([app_id, category.cast(pa.int32())], schema=APPS))
        places.append((path, first_row, batch.num_rows))
    table = pa.Table.from_batches(batches, schema=APPS)
    _reject_duplicates(places, "app_id", table.column("app_id"))
    return table


def read_locations(ds: ContractDataset) -> pa.Table | None:
    """locations.parquet (a file or a directory of part files) as loc_id int64, lat/lon
    float64 (+ region_id int32, poi_counts list<int32> when present), or None when the
    dataset has none. Holds the whole table: featurize on Ray reads it in shares instead
    (`location_share`, trainer/data/locations_join.py)."""
    if ds.locations is None:
        return None
    poi_length = None
    batches, places = [], []
    for path, first_row, batch in _side_batches(ds.locations, location_columns):
        checked, poi_length = checked_locations(path, first_row, batch, poi_length)
        batches.append(checked)
        places.append((path, first_row, batch.num_rows))
    table = pa.Table.from_batches(batches) if batches else _empty_locations()
    _reject_duplicates(places, "loc_id", table.column("loc_id"))
    return table


def location_share(path: Path, row_groups: tuple[int, int] | None = None,
                   batch_rows: int = 1 << 20) -> Iterator[tuple[list[str], int, pa.RecordBatch]]:
    """(columns read, row of the batch's first row in the file, batch checked as
    read_locations checks it) over one locations file, or its row groups [first, end).
    Unique loc_ids and one poi_counts length across shares are the caller's to check."""
    parquet = _open_parquet(path)
    if parquet.metadata.num_rows == 0:
        return
    columns = location_columns(path, parquet.schema_arrow)
    first_group = 0 if row_groups is None else row_groups[0]
    first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(first_group))
    poi_length = None
    for batch in _iter_batches(path, parquet, columns, batch_rows, row_groups):
        checked, poi_length = checked_locations(path, first_row, batch, poi_length)
        yield columns, first_row, checked
        first_row += batch.num_rows


def location_columns(path: Path, schema: pa.Schema) -> list[str]:
    """The columns of a locations file to read, after checking their types."""
    _check_column(path, schema, "loc_id", _is_integer, "an integer type")
    _check_column(path, schema, "lat", _is_number, "float64 degrees")
    _check_column(path, schema, "lon", _is_number, "float64 degrees")
    has_region = _check_column(path, schema, "region_id", _is_integer, "an integer type", False)
    has_poi = _check_column(path, schema, "poi_counts", _is_int_list, "list<int32>", False)
    return ["loc_id", "lat", "lon"] + ["region_id"] * has_region + ["poi_counts"] * has_poi


def checked_locations(path: Path, first_row: int, batch: pa.RecordBatch,
                      poi_length: int | None) -> tuple[pa.RecordBatch, int | None]:
    """(the batch as loc_id int64, lat/lon float64, region_id int32?, poi_counts?, the
    poi_counts length seen so far); a ContractError naming file, row and column for a bad row."""
    out = {"loc_id": _checked_id(path, batch.column("loc_id"), "loc_id", first_row)}
    lat, lon = batch.column("lat").cast(pa.float64()), batch.column("lon").cast(pa.float64())
    _reject_rows(path, "lat", first_row, pc.xor(pc.is_null(lat), pc.is_null(lon)),
                 "lat and lon must be both set or both null")
    for name, values, bound in (("lat", lat, 90.0), ("lon", lon, 180.0)):
        _reject_rows(path, name, first_row, pc.invert(pc.less_equal(pc.abs(values), bound)),
                     f"{name} outside [-{bound:g}, {bound:g}] or NaN")
    out["lat"], out["lon"] = lat, lon
    if "region_id" in batch.schema.names:
        region = batch.column("region_id")
        _reject_rows(path, "region_id", first_row, pc.is_null(region), "null region_id")
        _reject_rows(path, "region_id", first_row,
                     pc.or_(pc.less(region, 0), pc.greater_equal(region, INT32_LIMIT)),
                     "region_id outside [0, 2^31)")
        out["region_id"] = region.cast(pa.int32())
    if "poi_counts" in batch.schema.names:
        out["poi_counts"], poi_length = _checked_poi_counts(path, batch.column("poi_counts"), first_row, poi_length)
    return pa.RecordBatch.from_pydict(out), poi_length


def read_profiles(ds: ContractDataset) -> pa.Table | None:
    """profiles.parquet (a file or a directory of part files) as (user_id int64, profile_vec
    fixed_size_list<float32>[D]), or None.

    Every vector must be present, finite and of the same length D.
    """
    if ds.profiles is None:
        return None

    def columns_of(path: Path, schema: pa.Schema) -> list[str]:
        _check_column(path, schema, "user_id", _is_integer, "an integer type")
        _check_column(path, schema, "profile_vec", _is_float_list, "fixed_size_list<float32>")
        return ["user_id", "profile_vec"]

    batches = []
    dim = None
    for path, first_row, batch in _side_batches(ds.profiles, columns_of, 1 << 16):
        user_id = _checked_id(path, batch.column("user_id"), "user_id", first_row)
        _reject_rows(path, "user_id", first_row, pc.less(user_id, 0), "negative user_id")
        vectors = batch.column("profile_vec")
        _reject_rows(path, "profile_vec", first_row, pc.is_null(vectors), "null profile_vec")
        lengths = pc.list_value_length(vectors)
        if dim is None and len(lengths):
            dim = lengths[0].as_py()
        _reject_rows(path, "profile_vec", first_row, pc.not_equal(lengths, dim),
                     f"profile_vec length differs from the first row's {dim}")
        values = pc.list_flatten(vectors).cast(pa.float64())
        bad = pc.invert(pc.fill_null(pc.is_finite(values), False))
        _reject_list_values(path, "profile_vec", first_row, vectors, bad, "null or non-finite value")
        vectors = pa.FixedSizeListArray.from_arrays(values.cast(pa.float32()), dim)
        batches.append(pa.record_batch([user_id, vectors], names=["user_id", "profile_vec"]))
    if not batches:
        return pa.table({"user_id": pa.array([], pa.int64()),
                         "profile_vec": pa.array([], pa.list_(pa.float32(), 1))})
    return pa.Table.from_batches(batches)


def _checked_id(path: Path, values: pa.Array, column: str, first_row: int) -> pa.Array:
    """A non-null integer key column as int64."""
    _reject_rows(path, column, first_row, pc.is_null(values), f"null {column}")
    if values.type == pa.uint64():
        _reject_rows(path, column, first_row,
                     pc.greater_equal(values, pa.scalar(INT64_LIMIT, pa.uint64())), f"{column} >= 2^63")
    return values.cast(pa.int64())


def _checked_poi_counts(path: Path, lists: pa.Array, first_row: int,
                        length: int | None) -> tuple[pa.Array, int | None]:
    lists = lists.cast(pa.list_(lists.type.value_type))
    lengths = pc.list_value_length(lists)
    if length is None and lists.null_count < len(lists):
        length = pc.drop_null(lengths)[0].as_py()
    _reject_rows(path, "poi_counts", first_row, pc.not_equal(lengths, length),
                 f"poi_counts length differs from the first list's {length}")
    values = pc.list_flatten(lists)
    bad = pc.or_(pc.is_null(values), pc.fill_null(pc.less(values, 0), False))
    _reject_list_values(path, "poi_counts", first_row, lists, bad, "null or negative count")
    too_big = pc.greater_equal(values, INT32_LIMIT)
    _reject_list_values(path, "poi_counts", first_row, lists, too_big, "count >= 2^31")
    return lists.cast(pa.list_(pa.int32())), length


def _empty_locations() -> pa.Table:
    return pa.schema([("loc_id", pa.int64()), ("lat", pa.float64()), ("lon", pa.float64())]).empty_table()


def _reject_rows(path: Path, column: str, first_row: int, failed: pa.Array, reason: str) -> None:
    failed = _true_where(failed)
    if pc.any(failed).as_py():
        at = pc.index(failed, True).as_py()
        raise ContractError(f"{path}: row {first_row + at}, column {column!r}: {reason}")


def _reject_list_values(path: Path, column: str, first_row: int, lists: pa.Array,
                        bad_values: pa.Array, reason: str) -> None:
    bad_values = _true_where(bad_values)
    if pc.any(bad_values).as_py():
        at = pc.index(bad_values, True).as_py()
        row = pc.list_parent_indices(lists)[at].as_py()
        raise ContractError(f"{path}: row {first_row + row}, column {column!r}: {reason}")


def _reject_duplicates(places: list[tuple[Path, int, int]], column: str, ids: pa.ChunkedArray) -> None:
    """Refuses a repeated key, naming both places; places: (file, first row, rows) per batch,
    in the order of ids' rows."""
    keys = ids.to_numpy()
    order = np.argsort(keys, kind="stable")
    repeated = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if repeated.size:
        first, again = sorted(order[repeated[0]: repeated[0] + 2])
        starts = np.cumsum([0] + [rows for _, _, rows in places])

        def where(row: int) -> tuple[Path, int]:
            batch = int(np.searchsorted(starts, row, side="right")) - 1
            path, first_row, _ = places[batch]
            return path, first_row + row - int(starts[batch])

        (path, row), (first_path, first_row) = where(again), where(first)
        also = f"row {first_row}" if first_path == path else f"{first_path}, row {first_row}"
        raise ContractError(f"{path}: row {row}, column {column!r}: duplicate {column} "
                            f"{keys[again]} (also at {also})")
