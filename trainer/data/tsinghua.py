"""`u-mask data import-tsinghua`: the public Tsinghua App Usage dataset into the data contract.

The dataset ships as text (https://fi.ee.tsinghua.edu.cn/appusage/):
- App_usage_trace.txt: `user_id time base_station_id app_id traffic_bytes`, one record a
  line, time as YYYYMMDDhhmmss in China local time (UTC+8, no daylight saving);
- App2Category.txt (optional): `app_id category_id`;
- base_poi.txt (optional): a base station id, then one count per POI category; a header
  line (first field not a number) is skipped, an empty cell counts 0.
Fields are split on any run of whitespace (base_poi.txt on tabs when it has them, so empty
cells keep their place). File names are matched case-insensitively.

Output, a contract dataset: events/part-0000.parquet, ... (user_id, ts as UTC
timestamp[s], app_id, loc_id = base station, traffic_bytes; every record is a `use`),
apps.parquet, locations.parquet. Choices:
- category_id is the rank of the dataset's category id among those App2Category.txt uses,
  so it lies in [0, C) whether the file counts from 0 or 1; an app listed twice keeps its
  first category (the others are counted in the summary).
- The dataset has no coordinates: locations.parquet holds lat and lon as nulls, which the
  contract reader takes as "coordinates unknown", and poi_counts as list<int32>. Without
  region_id featurize makes no regions (`regions: none` in `u-mask data summary`); the loc_id
  still feeds the location embeddings. With poi_regions=K (--poi-regions K) the import gives
  each base station a region_id instead: k-means (trainer.data.regions.kmeans) of the
  stations' POI profiles, log1p of the counts scaled to unit length, so stations of a similar
  mix of places (offices, shops, homes) share a region; stations without any POI count get a
  null region_id (featurize's unknown region). Then set data.num_regions=K.

The text is streamed with pyarrow.csv block by block and parsed with vectorized compute;
malformed lines are a UserError naming the file and line number. The output is written to a
temporary folder beside --out and renamed into place only when the import succeeded.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from umask.contract import open_dataset, read_apps, read_locations
from umask.errors import UserError

TRACE = "App_usage_trace.txt"
APP_CATEGORIES = "App2Category.txt"
BASE_POI = "base_poi.txt"
TRACE_FIELDS = ("user_id", "time", "base_station_id", "app_id", "traffic_bytes")
CHINA_UTC_OFFSET_HOURS = 8

EVENTS = pa.schema([("user_id", pa.int64()), ("ts", pa.timestamp("s", "UTC")),
                    ("app_id", pa.int64()), ("loc_id", pa.int64()), ("traffic_bytes", pa.int64())])
APPS = pa.schema([("app_id", pa.int64()), ("category_id", pa.int32())])
LOCATIONS = pa.schema([("loc_id", pa.int64()), ("lat", pa.float64()), ("lon", pa.float64()),
                       ("poi_counts", pa.list_(pa.int32()))])

# at most 18 digits, so every value fits int64
_ID = r"^[0-9]{1,18}$"
# a line never holds this control character, so pyarrow.csv sees one column: the whole line
_NO_DELIMITER = "\x1f"


@dataclass
class ImportSummary:
    events: int
    event_files: int
    apps: int | None  # None when App2Category.txt is absent
    categories: int | None
    duplicate_apps: int | None
    locations: int | None  # None when base_poi.txt is absent
    poi_categories: int | None
    poi_regions: int | None = None  # regions made from the POI profiles (--poi-regions)

    def lines(self) -> list[str]:
        out = [f"events: {self.events} rows in {self.event_files} files"]
        if self.apps is not None:
            out.append(f"apps: {self.apps} in {self.categories} categories (set "
                       f"data.num_categories={self.categories}); {self.duplicate_apps} "
                       "repeated app rows kept their first category")
        if self.locations is not None:
            out.append(f"locations: {self.locations} base stations with "
                       f"{self.poi_categories} POI counts each, no coordinates")
            if self.poi_regions:
                out.append(f"regions: {self.poi_regions} from the base stations' POI profiles (k-means); "
                           f"set data.num_regions={self.poi_regions}")
            else:
                out.append("regions: none (no coordinates), so the region channels will carry no "
                           "geography; --poi-regions K makes K regions of similar POI profiles")
        return out


def import_tsinghua(src: Path, out: Path, utc_offset_hours: int = CHINA_UTC_OFFSET_HOURS,
                    rows_per_file: int = 5_000_000,
                    on_progress: Callable[[int, int], None] | None = None,
                    poi_regions: int | None = None) -> ImportSummary:
    """Convert the text files in `src` into a contract dataset at `out`.

    on_progress(bytes of the trace read, its size in bytes) after each block of lines.
    poi_regions: give base stations a region_id of that many clusters of their POI profiles
    (module docstring); None: no region_id. A UserError if it is not positive."""
    src, out = Path(src), Path(out)
    if rows_per_file <= 0:
        raise UserError(f"--rows-per-file must be positive, not {rows_per_file}")
    if poi_regions is not None and poi_regions <= 0:
        raise UserError(f"--poi-regions must be positive, not {poi_regions}")
    if not src.is_dir():
        raise UserError(f"{src}: not a folder (expected the folder holding {TRACE})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; choose a new --out")
    trace = _find(src, TRACE)
    if trace is None:
        raise UserError(f"{src}: no {TRACE} (the app usage records) in this folder")
    staging = out.parent / f".{out.name}.importing"
    if staging.exists():
        raise UserError(f"{staging}: left by an earlier import that stopped; remove it first")
    staging.mkdir(parents=True)
    try:
        events, files = _write_events(trace, staging / "events", utc_offset_hours * 3600,
                                      rows_per_file, on_progress)
        apps = _write_apps(_find(src, APP_CATEGORIES), staging / "apps.parquet")
        locations = _write_locations(_find(src, BASE_POI), staging / "locations.parquet", poi_regions)
        # the output must pass the contract it is written for
        written = open_dataset(staging)
        read_apps(written)
        read_locations(written)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging)
        raise
    return ImportSummary(events, files, *apps, *locations)


def _find(folder: Path, name: str) -> Path | None:
    matches = sorted(p for p in folder.iterdir() if p.name.lower() == name.lower() and p.is_file())
    return matches[0] if matches else None


def _lines(path: Path, block_bytes: int = 1 << 22) -> Iterator[tuple[int, pa.Array]]:
    """(line number of the block's first line, the block's lines as strings), streamed.

    Empty lines are kept so that position in the stream is the line number.
    """
    if path.stat().st_size == 0:
        return  # pyarrow.csv refuses empty files; an empty file simply has no lines
    invalid: list[int | None] = []

    def note_invalid(row) -> str:
        invalid.append(row.number)
        return "error"

    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["line"], block_size=block_bytes),
            parse_options=pacsv.ParseOptions(delimiter=_NO_DELIMITER, quote_char=False,
                                              escape_char=False, ignore_empty_lines=False,
                                              invalid_row_handler=note_invalid),
            convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}))
        first = 1
        for batch in reader:
            yield first, batch.column(0)
            first += batch.num_rows
    except pa.ArrowInvalid as err:
        where = f", line {invalid[0]}" if invalid and invalid[0] is not None else ""
        raise UserError(f"{path}{where}: cannot read as text lines ({err})") from err


def _fields(path: Path, first: int, lines: pa.Array, expected: int | None,
            what: str, split_on: str | None = None) -> tuple[pa.Array, list[pa.Array]]:
    """Line numbers and per-field strings [rows] of the non-blank lines of a block.

    expected None: the block's first line sets the field count.
    """
    kept = pc.indices_nonzero(pc.not_equal(pc.utf8_trim_whitespace(lines), ""))
    numbers = pc.add(kept, first).cast(pa.int64())
    if split_on:
        # only the line break goes: a leading or trailing separator marks an empty cell
        trimmed = pc.utf8_rtrim(pc.take(lines, kept), characters="\r")
        tokens = pc.split_pattern(trimmed, split_on)
    else:
        trimmed = pc.utf8_trim_whitespace(pc.take(lines, kept))
        tokens = pc.utf8_split_whitespace(trimmed)
    counts = pc.list_value_length(tokens)
    if expected is None and len(counts):
        expected = counts[0].as_py()
    wrong = pc.not_equal(counts, expected)
    if pc.any(wrong).as_py():
        at = pc.index(wrong, True).as_py()
        raise UserError(f"{path}, line {numbers[at]}: expected {expected} fields ({what}), "
                        f"found {counts[at]}: {trimmed[at].as_py()!r}")
    return numbers, [pc.utf8_trim_whitespace(pc.list_element(tokens, i)) for i in range(expected or 0)]


def _require(path: Path, numbers: pa.Array, values: pa.Array, pattern: str, field: str,
             meaning: str) -> None:
    _reject(path, numbers, values, pc.invert(pc.match_substring_regex(values, pattern)),
            field, meaning)


def _reject(path: Path, numbers: pa.Array, values: pa.Array, bad: pa.Array, field: str,
            meaning: str) -> None:
    if pc.any(bad).as_py():
        at = pc.index(bad, True).as_py()
        raise UserError(f"{path}, line {numbers[at]}: {field} {values[at].as_py()!r} is not {meaning}")


def _write_events(trace: Path, folder: Path, utc_offset_seconds: int, rows_per_file: int,
                  on_progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    folder.mkdir()
    writer, in_file, files, total = None, 0, 0, 0
    size, read = trace.stat().st_size, 0
    try:
        for first, lines in _lines(trace):
            if on_progress is not None:  # the block's bytes: its lines and their line ends
                read += (pc.sum(pc.binary_length(lines)).as_py() or 0) + len(lines)
                on_progress(min(read, size), size)
            numbers, (user, time, station, app, traffic) = _fields(
                trace, first, lines, len(TRACE_FIELDS), " ".join(TRACE_FIELDS))
            for name, values in (("user_id", user), ("base_station_id", station),
                                 ("app_id", app), ("traffic_bytes", traffic)):
                _require(trace, numbers, values, _ID, name, "a non-negative integer")
            _require(trace, numbers, time, r"^[0-9]{14}$", "time", "YYYYMMDDhhmmss")
            local = pc.strptime(time, format="%Y%m%d%H%M%S", unit="s", error_is_null=True)
            # strptime rolls 20160431 over to May 1: a real date keeps its month and day
            month = pc.utf8_slice_codeunits(time, 4, 6).cast(pa.int64())
            day = pc.utf8_slice_codeunits(time, 6, 8).cast(pa.int64())
            invalid = pc.invert(pc.fill_null(pc.and_(pc.equal(pc.month(local), month),
                                                     pc.equal(pc.day(local), day)), False))
            _reject(trace, numbers, time, invalid, "time", "a valid date and time")
            # local wall-clock seconds -> UTC epoch seconds
            utc = pc.subtract(local.cast(pa.int64()), utc_offset_seconds)
            table = pa.Table.from_arrays(
                [user.cast(pa.int64()), utc.cast(pa.timestamp("s", "UTC")),
                 app.cast(pa.int64()), station.cast(pa.int64()), traffic.cast(pa.int64())],
                schema=EVENTS)
            while table.num_rows:
                if writer is None:
                    writer = pq.ParquetWriter(folder / f"part-{files:04d}.parquet", EVENTS)
                    files += 1
                take = min(table.num_rows, rows_per_file - in_file)
                writer.write_table(table.slice(0, take))
                table, in_file, total = table.slice(take), in_file + take, total + take
                if in_file == rows_per_file:
                    writer.close()
                    writer, in_file = None, 0
    finally:
        if writer is not None:
            writer.close()
    if total == 0:
        raise UserError(f"{trace}: holds no records")
    return total, files


def _write_apps(path: Path | None, out: Path) -> tuple[int | None, int | None, int | None]:
    if path is None:
        return None, None, None
    blocks = []
    for first, lines in _lines(path):
        numbers, (app, category) = _fields(path, first, lines, 2, "app_id category_id")
        _require(path, numbers, app, _ID, "app_id", "a non-negative integer")
        _require(path, numbers, category, r"^[0-9]{1,9}$", "category_id", "a non-negative integer")
        blocks.append(pa.table({"app_id": app.cast(pa.int64()), "category_id": category.cast(pa.int64()),
                                "line": numbers}))
    listed = pa.concat_tables(blocks) if blocks else pa.table(
        {"app_id": pa.array([], pa.int64()), "category_id": pa.array([], pa.int64()),
         "line": pa.array([], pa.int64())})
    # file order decides which category a repeated app keeps
    apps = (listed.group_by("app_id", use_threads=False)
            .aggregate([("category_id", "first")]).sort_by("app_id"))
    categories = pc.unique(listed.column("category_id")).sort()
    dense = pc.index_in(apps.column("category_id_first"), value_set=categories).cast(pa.int32())
    pq.write_table(pa.Table.from_arrays([apps.column("app_id"), dense], schema=APPS), out)
    return apps.num_rows, len(categories), listed.num_rows - apps.num_rows


def _write_locations(path: Path | None, out: Path,
                     poi_regions: int | None = None) -> tuple[int | None, int | None, int | None]:
    """locations.parquet from base_poi.txt; (stations, POI categories, regions made or None)."""
    if path is None:
        if poi_regions:
            raise UserError(f"--poi-regions needs {BASE_POI}, the POI counts per base station")
        return None, None, None
    split_on = "\t" if _has_tab(path) else None
    width = None
    blocks = []
    for first, lines in _lines(path):
        if first == 1 and len(lines):
            head = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(lines[:1]))[0]
            if len(head) and not head[0].as_py().isdigit():
                lines, first = lines[1:], 2  # header: BaseID and the category names
        numbers, fields = _fields(path, first, lines, width, "base station id, POI counts",
                                  split_on)
        if not fields:
            continue
        width = len(fields)
        station, counts = fields[0], fields[1:]
        _require(path, numbers, station, _ID, "base station id", "a non-negative integer")
        for i, column in enumerate(counts):
            column = pc.if_else(pc.equal(column, ""), "0", column)
            _require(path, numbers, column, r"^[0-9]{1,9}(\.0*)?$", f"POI count {i + 1}",
                     "a non-negative whole number")
            counts[i] = column.cast(pa.float64()).cast(pa.int32())
        blocks.append(_location_block(station, counts))
    table = pa.concat_tables(blocks) if blocks else LOCATIONS.empty_table()
    made = None
    if poi_regions:
        table, made = _with_poi_regions(table, poi_regions)
    pq.write_table(table, out)
    return table.num_rows, (width - 1 if width else 0), made


def _with_poi_regions(table: pa.Table, k: int) -> tuple[pa.Table, int]:
    """table with region_id int32: k-means of the stations' POI profiles (module docstring);
    null for a station without POI counts. Returns the table and the regions made."""
    from trainer.data.regions import kmeans

    counts = table.column("poi_counts")
    width = max((len(v) for v in counts.to_pylist() if v), default=0)
    profiles = np.zeros((table.num_rows, width))
    for row, values in enumerate(counts.to_pylist()):
        if values:
            profiles[row, :len(values)] = np.log1p(values)
    norms = np.linalg.norm(profiles, axis=1)
    has_pois = norms > 0
    if not has_pois.any():
        raise UserError(f"{BASE_POI}: no base station has a POI count, so --poi-regions has nothing to cluster")
    k = min(k, int(has_pois.sum()))
    regions = np.zeros(table.num_rows, np.int32)
    regions[has_pois], _ = kmeans(profiles[has_pois] / norms[has_pois, None], k)
    column = pa.array(regions, pa.int32(), mask=~has_pois)
    return table.append_column(pa.field("region_id", pa.int32()), column), k


def _location_block(station: pa.Array, counts: list[pa.Array]) -> pa.Table:
    """One block of locations from the station ids [rows] and K count columns [rows] each."""
    rows, k = len(station), len(counts)
    # column-major [K, rows] -> row-major [rows, K]
    row_major = (np.arange(k)[None, :] * rows + np.arange(rows)[:, None]).ravel()
    values = pc.take(pa.concat_arrays(counts), row_major) if k else pa.array([], pa.int32())
    poi = pa.FixedSizeListArray.from_arrays(values, k).cast(pa.list_(pa.int32()))
    unknown = pa.nulls(rows, pa.float64())
    return pa.Table.from_arrays([station.cast(pa.int64()), unknown, unknown, poi], schema=LOCATIONS)


def _has_tab(path: Path) -> bool:
    with path.open("rb") as text:
        return b"\t" in text.readline(1 << 16)
