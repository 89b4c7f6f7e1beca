"""The contract reader: dataset layouts, coercions, schema errors, strict and quarantine rows."""
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from umask.contract import (NORMALIZED_EVENTS, ContractDataset, ContractError, EventReader, open_dataset,
                            read_apps, read_events, read_locations, read_profiles)
from umask.errors import UserError

# 2016-04-21 00:00:00 UTC
APRIL_21 = 1461196800


def events(n=3, **columns):
    """A valid events table of n rows; keyword columns replace or add columns."""
    base = {"user_id": pa.array(range(10, 10 + n), pa.int64()),
            "ts": pa.array([APRIL_21 + i for i in range(n)], pa.int64()),
            "app_id": pa.array(range(100, 100 + n), pa.int64()),
            "loc_id": pa.array(range(200, 200 + n), pa.int64())}
    base.update(columns)
    return pa.table({k: v for k, v in base.items() if v is not None})


def write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_all(source, **kwargs) -> pa.Table:
    return pa.Table.from_batches(list(read_events(open_dataset(source), **kwargs)),
                                 schema=NORMALIZED_EVENTS)


# --- layouts ----------------------------------------------------------------------------

def test_dataset_folder_with_hive_partitions_skips_hidden_files_and_sorts(tmp_path):
    write(tmp_path / "events/dt=2026-11-02/part-0.parquet", events(1, user_id=pa.array([2])))
    write(tmp_path / "events/dt=2026-11-01/part-1.parquet", events(1, user_id=pa.array([1])))
    (tmp_path / "events/_SUCCESS").write_text("")
    (tmp_path / "events/dt=2026-11-01/.part-1.parquet.crc").write_text("crc")
    write(tmp_path / "apps.parquet", pa.table({"app_id": [1], "category_id": [0]}))
    ds = open_dataset(tmp_path)
    assert ds.event_files == [tmp_path / "events/dt=2026-11-01/part-1.parquet",
                              tmp_path / "events/dt=2026-11-02/part-0.parquet"]
    assert ds.apps == tmp_path / "apps.parquet"
    assert ds.locations is None and ds.profiles is None
    assert read_all(tmp_path).column("user_id").to_pylist() == [1, 2]


def test_events_parquet_file_in_folder(tmp_path):
    write(tmp_path / "events.parquet", events(2))
    write(tmp_path / "profiles.parquet", pa.table({"user_id": [1], "profile_vec": [[0.5]]}))
    ds = open_dataset(tmp_path)
    assert ds.event_files == [tmp_path / "events.parquet"]
    assert ds.profiles == tmp_path / "profiles.parquet"


def test_single_file_and_events_directory_take_side_tables_beside_them(tmp_path):
    write(tmp_path / "export/clicks.parquet", events(2))
    write(tmp_path / "export/locations.parquet", pa.table({"loc_id": [1], "lat": [1.0], "lon": [2.0]}))
    ds = open_dataset(tmp_path / "export/clicks.parquet")
    assert ds.event_files == [tmp_path / "export/clicks.parquet"]
    assert ds.locations == tmp_path / "export/locations.parquet"

    write(tmp_path / "ds/events/a.parquet", events(2))
    write(tmp_path / "ds/apps.parquet", pa.table({"app_id": [1], "category_id": [0]}))
    ds = open_dataset(tmp_path / "ds/events")
    assert ds.event_files == [tmp_path / "ds/events/a.parquet"]
    assert ds.apps == tmp_path / "ds/apps.parquet"


def test_missing_events_name_the_path(tmp_path):
    with pytest.raises(ContractError, match="nowhere: no such file"):
        open_dataset(tmp_path / "nowhere")
    write(tmp_path / "apps.parquet", pa.table({"app_id": [1], "category_id": [0]}))
    with pytest.raises(ContractError, match=f"{tmp_path}: no events/ directory or events.parquet"):
        open_dataset(tmp_path)
    (tmp_path / "events").mkdir()
    with pytest.raises(ContractError, match="events directory holds no files"):
        open_dataset(tmp_path)
    write(tmp_path / "events.parquet", events(1))
    with pytest.raises(ContractError, match="both events/ and events.parquet"):
        open_dataset(tmp_path)


def test_contract_error_is_a_user_error():
    assert issubclass(ContractError, UserError)


# --- coercions --------------------------------------------------------------------------

@pytest.mark.parametrize("id_type", [pa.int8(), pa.int16(), pa.int32(), pa.uint8(),
                                     pa.uint16(), pa.uint32(), pa.uint64()])
def test_any_integer_width_for_ids(tmp_path, id_type):
    ids = pa.array([0, 7, 120], id_type)
    write(tmp_path / "e.parquet", events(3, user_id=ids, app_id=ids, loc_id=ids))
    table = read_all(tmp_path / "e.parquet")
    assert table.schema == NORMALIZED_EVENTS
    for column in ("user_id", "app_id", "loc_id"):
        assert table.column(column).to_pylist() == [0, 7, 120]


@pytest.mark.parametrize("unit,ticks_per_second", [("s", 1), ("ms", 10**3), ("us", 10**6),
                                                   ("ns", 10**9)])
def test_each_timestamp_unit_floors_to_epoch_seconds(tmp_path, unit, ticks_per_second):
    # APRIL_21 + 0.9 s, 1970-01-01 00:00:00, and 0.5 s before the epoch (floors to -1)
    ticks = [APRIL_21 * ticks_per_second + 9 * ticks_per_second // 10, 0, -ticks_per_second // 2]
    if unit == "s":
        ticks = [APRIL_21, 0, -1]
    write(tmp_path / "e.parquet", events(3, ts=pa.array(ticks, pa.timestamp(unit))))
    # a plausible range wide enough for the epoch (the default would quarantine 1970)
    got = read_all(tmp_path / "e.parquet", plausible=(-2**40, 2**40)).column("ts").to_pylist()
    assert got == [APRIL_21, 0, -1]


def test_tz_aware_non_utc_naive_and_int_epoch_seconds_agree(tmp_path):
    beijing = timezone(timedelta(hours=8))
    aware = pa.array([datetime(2016, 4, 21, 8, 0, 0, tzinfo=beijing)], pa.timestamp("us", "Asia/Shanghai"))
    naive = pa.array([datetime(2016, 4, 21, 0, 0, 0)], pa.timestamp("ms"))
    write(tmp_path / "aware/events.parquet", events(1, ts=aware))
    write(tmp_path / "naive/events.parquet", events(1, ts=naive))
    write(tmp_path / "epoch/events.parquet", events(1, ts=pa.array([APRIL_21], pa.int64())))
    for name in ("aware", "naive", "epoch"):
        assert read_all(tmp_path / name).column("ts").to_pylist() == [APRIL_21], name


@pytest.mark.parametrize("encode", [False, True])
def test_event_strings_or_dictionary_map_to_codes_and_null_means_use(tmp_path, encode):
    names = pa.array(["install", None, "uninstall", "use"])
    write(tmp_path / "e.parquet", events(4, event=names.dictionary_encode() if encode else names))
    assert read_all(tmp_path / "e.parquet").column("event").to_pylist() == [1, 0, 2, 0]


def test_absent_optional_columns_and_extra_columns(tmp_path):
    table = events(2, app_id=pa.nulls(2), extra=pa.array(["x", "y"]),
                   tags=pa.array([[1], [2, 3]]))
    write(tmp_path / "e.parquet", table)
    out = read_all(tmp_path / "e.parquet")
    assert out.to_pydict() == {"user_id": [10, 11], "ts": [APRIL_21, APRIL_21 + 1],
                               "app_id": [None, None], "loc_id": [200, 201],
                               "traffic_bytes": [None, None], "event": [0, 0]}


def test_zero_row_file_is_skipped_but_counted(tmp_path):
    write(tmp_path / "events/a.parquet", events(0))
    write(tmp_path / "events/b.parquet", events(2))
    reader = EventReader(open_dataset(tmp_path))
    assert sum(b.num_rows for b in reader.batches()) == 2
    assert (reader.report.files, reader.report.empty_files_skipped, reader.report.rows_read,
            reader.report.rows_valid) == (1, 1, 2, 2)


# --- schema problems: always errors, naming file and column ------------------------------

@pytest.mark.parametrize("table,column,message", [
    (events(2, user_id=None), "user_id", "missing required column 'user_id'"),
    (events(2, ts=None), "ts", "missing required column 'ts'"),
    (events(2, user_id=pa.array(["a", "b"])), "user_id", "column 'user_id' has type string"),
    (events(2, ts=pa.array([1.0, 2.0])), "ts", "column 'ts' has type double"),
    (events(2, traffic_bytes=pa.array([1.0, None])), "traffic_bytes", "Int64 dtype"),
    (events(2, event=pa.array([1, 2])), "event", "column 'event' has type int64"),
])
@pytest.mark.parametrize("policy", ["strict", "quarantine"])
def test_schema_problems_are_errors_under_every_policy(tmp_path, table, column, message, policy):
    path = write(tmp_path / "events" / "bad.parquet", table)
    with pytest.raises(ContractError, match=message) as caught:
        read_all(tmp_path, policy=policy, quarantine_dir=tmp_path / "q")
    assert str(caught.value).startswith(f"{path}: ")


def test_file_that_is_not_parquet_and_zero_byte_file(tmp_path):
    write(tmp_path / "events/a.parquet", events(1))
    (tmp_path / "events/b.csv").write_text("user_id,ts\n1,2\n")
    with pytest.raises(ContractError, match=r"events/b.csv: not a readable Parquet file"):
        read_all(tmp_path)
    (tmp_path / "events/b.csv").unlink()
    (tmp_path / "events/c.parquet").write_bytes(b"")
    with pytest.raises(ContractError, match=r"events/c.parquet: file is empty \(0 bytes\)"):
        read_all(tmp_path)


# --- row problems -----------------------------------------------------------------------

BAD_ROWS = [  # one invalid value at row 3 of 5; the reason and the value shown
    ("user_id", pa.array([1, 2, 3, None, 5]), "null user_id", ""),
    ("user_id", pa.array([1, 2, 3, -4, 5]), "negative user_id", " (value -4)"),
    ("user_id", pa.array([1, 2, 3, 2**63, 5], pa.uint64()), "user_id >= 2^63",
     f" (value {2**63})"),
    ("ts", pa.array([APRIL_21 + i if i != 3 else None for i in range(5)], pa.timestamp("s", "UTC")),
     "null ts", ""),
    ("ts", pa.array([APRIL_21, APRIL_21, APRIL_21, 0, APRIL_21], pa.int64()),
     "ts outside the plausible range [2000-01-01, 2100-01-01) (data.plausible_start/end; integer ts "
     "must be epoch seconds)", " (value 0)"),
    ("traffic_bytes", pa.array([1, 2, 3, -1, 5]), "negative traffic_bytes", " (value -1)"),
    ("event", pa.array(["use", "use", None, "click", "install"]), "unknown event",
     " (value 'click')"),
]


@pytest.mark.parametrize("column,values,reason,shown", BAD_ROWS)
def test_strict_names_file_column_row_and_reason(tmp_path, column, values, reason, shown):
    write(tmp_path / "events/a.parquet", events(4))
    path = write(tmp_path / "events/b.parquet", events(5, **{column: values}))
    # batches of 2 rows: row 3 sits in the second batch, so the row index must be per file
    with pytest.raises(ContractError) as caught:
        read_all(tmp_path, batch_rows=2)
    assert str(caught.value) == f"{path}: row 3, column {column!r}: {reason}{shown}"


def test_quarantine_keeps_every_valid_row_and_writes_every_invalid_one(tmp_path):
    a = write(tmp_path / "events/dt=1/a.parquet", events(
        5, user_id=pa.array([1, None, 3, -4, 5], pa.int32()),
        traffic_bytes=pa.array([10, 20, -30, 40, None]),
        event=pa.array(["use", "use", "use", "bogus", "bogus"]).dictionary_encode()))
    write(tmp_path / "events/dt=1/b.parquet", events(0))
    c = write(tmp_path / "events/dt=2/c.parquet", events(
        3, user_id=pa.array([7, 8, 2**63 + 1], pa.uint64()),
        ts=pa.array([APRIL_21 * 1000, None, APRIL_21 * 1000], pa.timestamp("ms"))))
    reader = EventReader(open_dataset(tmp_path), "quarantine", tmp_path / "q", batch_rows=2)
    valid = pa.Table.from_batches(list(reader.batches()), schema=NORMALIZED_EVENTS)
    # a: row 0 valid; 1 null user_id; 2 negative bytes; 3 negative user_id (also bogus
    # event: the first check wins); 4 unknown event. c: row 0 valid; 1 null ts; 2 too big.
    assert valid.column("user_id").to_pylist() == [1, 7]
    assert valid.column("traffic_bytes").to_pylist() == [10, None]
    assert valid.column("ts").to_pylist() == [APRIL_21, APRIL_21]
    report = reader.report
    assert (report.files, report.empty_files_skipped, report.rows_read, report.rows_valid,
            report.rows_quarantined) == (2, 1, 8, 2, 6)
    assert report.by_reason == {"null user_id": 1, "negative traffic_bytes": 1,
                                "negative user_id": 1, "unknown event": 1, "null ts": 1,
                                "user_id >= 2^63": 1}
    assert report.quarantine_files == [tmp_path / "q/events__dt=1__a.parquet",
                                       tmp_path / "q/events__dt=2__c.parquet"]
    quarantined = pa.concat_tables(pq.read_table(p) for p in report.quarantine_files)
    assert quarantined.select(["file", "row", "reason", "user_id", "event"]).to_pylist() == [
        {"file": str(a), "row": 1, "reason": "null user_id", "user_id": None, "event": "use"},
        {"file": str(a), "row": 2, "reason": "negative traffic_bytes", "user_id": "3", "event": "use"},
        {"file": str(a), "row": 3, "reason": "negative user_id", "user_id": "-4", "event": "bogus"},
        {"file": str(a), "row": 4, "reason": "unknown event", "user_id": "5", "event": "bogus"},
        {"file": str(c), "row": 1, "reason": "null ts", "user_id": "8", "event": None},
        {"file": str(c), "row": 2, "reason": "user_id >= 2^63", "user_id": str(2**63 + 1),
         "event": None},
    ]


def test_quarantine_files_are_replaced_on_a_rerun(tmp_path):
    write(tmp_path / "events/a.parquet", events(2, user_id=pa.array([None, 1])))
    read_all(tmp_path, policy="quarantine", quarantine_dir=tmp_path / "q")
    assert pq.read_table(tmp_path / "q/events__a.parquet").num_rows == 1
    write(tmp_path / "events/a.parquet", events(2))
    reader = EventReader(open_dataset(tmp_path), "quarantine", tmp_path / "q")
    assert sum(b.num_rows for b in reader.batches()) == 2
    assert not (tmp_path / "q/events__a.parquet").exists()
    assert reader.report.quarantine_files == []


def test_quarantine_needs_a_directory(tmp_path):
    with pytest.raises(ValueError, match="quarantine_dir"):
        EventReader(ContractDataset(tmp_path, []), "quarantine")


# --- side tables ------------------------------------------------------------------------

def dataset_with(tmp_path, name, table):
    write(tmp_path / "events.parquet", events(1))
    write(tmp_path / name, table)
    return open_dataset(tmp_path)


def test_missing_side_tables_are_none(tmp_path):
    write(tmp_path / "events.parquet", events(1))
    ds = open_dataset(tmp_path)
    assert read_apps(ds) is None and read_locations(ds) is None and read_profiles(ds) is None


def test_apps_are_coerced(tmp_path):
    ds = dataset_with(tmp_path, "apps.parquet", pa.table({
        "app_id": pa.array([5, 3], pa.uint32()), "category_id": pa.array([0, 19], pa.int64()),
        "name": ["a", "b"]}))
    apps = read_apps(ds, num_categories=20)
    assert apps.schema.names == ["app_id", "category_id"]
    assert apps.schema.field("category_id").type == pa.int32()
    assert apps.to_pydict() == {"app_id": [5, 3], "category_id": [0, 19]}


@pytest.mark.parametrize("app_id,category_id,num_categories,message", [
    ([1, 2, 3, 2], [0, 0, 0, 0], None, "row 3, column 'app_id': duplicate app_id 2 .also at row 1."),
    ([1, 2, 3], [0, -1, 0], None, "row 1, column 'category_id': negative category_id"),
    ([1, 2, 3], [0, 20, 0], 20, "row 1, column 'category_id': category_id >= 20"),
    ([1, None, 3], [0, 1, 0], None, "row 1, column 'app_id': null app_id"),
])
def test_bad_apps(tmp_path, app_id, category_id, num_categories, message):
    ds = dataset_with(tmp_path, "apps.parquet", pa.table({"app_id": pa.array(app_id, pa.int64()),
                                                         "category_id": category_id}))
    with pytest.raises(ContractError, match=f"apps.parquet: {message}"):
        read_apps(ds, num_categories)


def test_locations_with_optional_columns_and_unknown_coordinates(tmp_path):
    ds = dataset_with(tmp_path, "locations.parquet", pa.table({
        "loc_id": pa.array([1, 2], pa.int32()), "lat": pa.array([39.9, None]),
        "lon": pa.array([116.4, None]), "region_id": pa.array([3, 0], pa.int64()),
        "poi_counts": pa.array([[1, 0, 2], [0, 0, 0]], pa.list_(pa.int64()))}))
    table = read_locations(ds)
    assert table.schema == pa.schema([("loc_id", pa.int64()), ("lat", pa.float64()),
                                      ("lon", pa.float64()), ("region_id", pa.int32()),
                                      ("poi_counts", pa.list_(pa.int32()))])
    assert table.to_pydict() == {"loc_id": [1, 2], "lat": [39.9, None], "lon": [116.4, None],
                                 "region_id": [3, 0], "poi_counts": [[1, 0, 2], [0, 0, 0]]}


@pytest.mark.parametrize("columns,message", [
    ({"lat": [1.0, 91.0], "lon": [0.0, 0.0]}, "row 1, column 'lat': lat outside .-90, 90. or NaN"),
    ({"lat": [1.0, 2.0], "lon": [0.0, float("nan")]}, "row 1, column 'lon': lon outside"),
    ({"lat": [1.0, None], "lon": [0.0, 3.0]}, "row 1, column 'lat': lat and lon must be both"),
    ({"lat": [1.0, 2.0], "lon": [0.0, 0.0], "poi_counts": [[1, 2], [1]]},
     "row 1, column 'poi_counts': poi_counts length differs from the first list's 2"),
    ({"lat": [1.0, 2.0], "lon": [0.0, 0.0], "poi_counts": [[1, 2], [1, -2]]},
     "row 1, column 'poi_counts': null or negative count"),
    ({"lat": [1.0, 2.0], "lon": [0.0, 0.0], "region_id": [0, -1]},
     "row 1, column 'region_id': region_id outside"),
    ({"lat": ["a", "b"], "lon": [0.0, 0.0]}, "column 'lat' has type string"),
])
def test_bad_locations(tmp_path, columns, message):
    ds = dataset_with(tmp_path, "locations.parquet", pa.table({"loc_id": [1, 2], **columns}))
    with pytest.raises(ContractError, match=f"locations.parquet: {message}"):
        read_locations(ds)


def test_duplicate_location(tmp_path):
    ds = dataset_with(tmp_path, "locations.parquet",
                      pa.table({"loc_id": [4, 4], "lat": [0.0, 0.0], "lon": [0.0, 0.0]}))
    with pytest.raises(ContractError, match="row 1, column 'loc_id': duplicate loc_id 4"):
        read_locations(ds)


def test_profiles_become_fixed_size_float32(tmp_path):
    ds = dataset_with(tmp_path, "profiles.parquet", pa.table({
        "user_id": pa.array([1, 2], pa.uint16()),
        "profile_vec": pa.array([[0.5, 1.0], [2.0, -1.5]], pa.list_(pa.float64()))}))
    profiles = read_profiles(ds)
    assert profiles.schema.field("profile_vec").type == pa.list_(pa.float32(), 2)
    assert profiles.to_pydict() == {"user_id": [1, 2], "profile_vec": [[0.5, 1.0], [2.0, -1.5]]}


@pytest.mark.parametrize("vectors,message", [
    ([[0.5, 1.0], [2.0]], "row 1, column 'profile_vec': profile_vec length differs"),
    ([[0.5, 1.0], [2.0, float("nan")]], "row 1, column 'profile_vec': null or non-finite"),
    ([[0.5, 1.0], None], "row 1, column 'profile_vec': null profile_vec"),
])
def test_bad_profiles(tmp_path, vectors, message):
    ds = dataset_with(tmp_path, "profiles.parquet", pa.table({"user_id": [1, 2],
                                                             "profile_vec": vectors}))
    with pytest.raises(ContractError, match=f"profiles.parquet: {message}"):
        read_profiles(ds)


def test_fixed_size_and_large_lists_are_accepted(tmp_path):
    ds = dataset_with(tmp_path, "locations.parquet", pa.table({
        "loc_id": [1], "lat": [0.0], "lon": [0.0],
        "poi_counts": pa.array([[4, 5]], pa.list_(pa.uint8(), 2))}))
    assert read_locations(ds).column("poi_counts").to_pylist() == [[4, 5]]
    write(tmp_path / "profiles.parquet", pa.table({
        "user_id": [3], "profile_vec": pa.array([[1.0, 2.0, 3.0]], pa.large_list(pa.float16()))}))
    assert read_profiles(open_dataset(tmp_path)).to_pydict() == {"user_id": [3],
                                                                 "profile_vec": [[1.0, 2.0, 3.0]]}
