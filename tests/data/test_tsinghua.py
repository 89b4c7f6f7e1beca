"""The Tsinghua importer: text fixture in the public format -> a contract dataset."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.cli import main as cli_main
from umask.contract import NORMALIZED_EVENTS, open_dataset, read_apps, read_events, read_locations
from trainer.data.tsinghua import import_tsinghua
from umask.errors import UserError

# 2016-04-21 00:00:00 UTC = 08:00:00 in Beijing
APRIL_21 = 1461196800

TRACE = ("0 20160421080000 7194 361 4632\n"
         "0 20160421080130 7194 2 0\n"
         "\n"  # a blank line is skipped but still counted
         "5 20160421000000 12 361 100\r\n")
CATEGORIES = "361\t2\n2\t1\n9\t20\n361\t5\n"
POI = ("BaseID\tMedical care\tHotel\tBusiness affairs\n"
       "7194\t3\t\t1\n"
       "12\t0\t4\t0\n")


def fixture(folder: Path, trace=TRACE, categories=CATEGORIES, poi=POI,
            trace_name="App_usage_trace.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / trace_name).write_text(trace)
    if categories is not None:
        (folder / "App2Category.txt").write_text(categories)
    if poi is not None:
        (folder / "base_poi.txt").write_text(poi)
    return folder


def test_import_writes_a_contract_dataset(tmp_path):
    summary = import_tsinghua(fixture(tmp_path / "src"), tmp_path / "out")
    ds = open_dataset(tmp_path / "out")
    assert ds.event_files == [tmp_path / "out/events/part-0000.parquet"]
    events = pa.Table.from_batches(list(read_events(ds)), schema=NORMALIZED_EVENTS)
    assert events.to_pydict() == {
        "user_id": [0, 0, 5],
        # Beijing 08:00:00 and 08:01:30 on April 21, and midnight (16:00 UTC the day before)
        "ts": [APRIL_21, APRIL_21 + 90, APRIL_21 - 8 * 3600],
        "app_id": [361, 2, 361], "loc_id": [7194, 7194, 12],
        "traffic_bytes": [4632, 0, 100], "event": [0, 0, 0]}
    # categories used: 1, 2, 5, 20 -> ranks 0, 1, 2, 3; app 361 keeps its first (2 -> 1)
    assert read_apps(ds, num_categories=4).to_pydict() == {"app_id": [2, 9, 361],
                                                           "category_id": [0, 3, 1]}
    assert read_locations(ds).to_pydict() == {
        "loc_id": [7194, 12], "lat": [None, None], "lon": [None, None],
        "poi_counts": [[3, 0, 1], [0, 4, 0]]}
    assert summary.lines() == [
        "events: 3 rows in 1 files",
        "apps: 3 in 4 categories (set data.num_categories=4); 1 repeated app rows kept their first category",
        "locations: 2 base stations with 3 POI counts each, no coordinates",
        "regions: none (no coordinates), so the region channels will carry no geography; "
        "--poi-regions K makes K regions of similar POI profiles"]


def test_events_split_into_files_of_rows_per_file(tmp_path):
    trace = "".join(f"{u} 20160421080000 1 2 3\n" for u in range(5))
    import_tsinghua(fixture(tmp_path / "src", trace=trace), tmp_path / "out", rows_per_file=2)
    parts = sorted((tmp_path / "out/events").iterdir())
    assert [p.name for p in parts] == ["part-0000.parquet", "part-0001.parquet", "part-0002.parquet"]
    assert [pq.read_table(p).column("user_id").to_pylist() for p in parts] == [[0, 1], [2, 3], [4]]


def test_side_files_are_optional_and_names_match_any_case(tmp_path):
    src = fixture(tmp_path / "src", categories=None, poi=None, trace_name="App_Usage_Trace.txt")
    summary = import_tsinghua(src, tmp_path / "out", utc_offset_hours=0)
    ds = open_dataset(tmp_path / "out")
    assert ds.apps is None and ds.locations is None
    assert next(read_events(ds)).column("ts")[0].as_py() == APRIL_21 + 8 * 3600
    assert summary.lines() == ["events: 3 rows in 1 files"]


@pytest.mark.parametrize("trace,message", [
    ("0 20160421080000 7 1 2\n1 20160421080000 7 1\n",
     "App_usage_trace.txt, line 2: expected 5 fields (user_id time base_station_id app_id "
     "traffic_bytes), found 4: '1 20160421080000 7 1'"),
    ("0 20160421080000 7 1 2\n\n0 20160421080000 x 1 2\n",
     "App_usage_trace.txt, line 3: base_station_id 'x' is not a non-negative integer"),
    ("0 20160421080000 7 1 -2\n", "line 1: traffic_bytes '-2' is not a non-negative integer"),
    ("0 2016042108 7 1 2\n", "line 1: time '2016042108' is not YYYYMMDDhhmmss"),
    ("0 20160431080000 7 1 2\n", "line 1: time '20160431080000' is not a valid date and time"),
    ("0 20160230235959 7 1 2\n", "line 1: time '20160230235959' is not a valid date and time"),
    ("0 20161301000000 7 1 2\n", "line 1: time '20161301000000' is not a valid date and time"),
    ("0 20160421246000 7 1 2\n", "line 1: time '20160421246000' is not a valid date and time"),
    ("", "App_usage_trace.txt: holds no records"),
])
def test_malformed_trace_names_file_and_line_and_leaves_no_output(tmp_path, trace, message):
    with pytest.raises(UserError, match="^" + str(tmp_path / "src").replace("\\", "\\\\")) as caught:
        import_tsinghua(fixture(tmp_path / "src", trace=trace), tmp_path / "out")
    assert message in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("categories,poi,message", [
    ("1 2 3\n", POI, "App2Category.txt, line 1: expected 2 fields"),
    ("1\tx\n", POI, "App2Category.txt, line 1: category_id 'x' is not a non-negative integer"),
    (CATEGORIES, "BaseID\tA\tB\n1\t2\t3\n2\t3\n", "base_poi.txt, line 3: expected 3 fields"),
    (CATEGORIES, "BaseID\tA\n1\t2\n2\t-3\n", "base_poi.txt, line 3: POI count 1 '-3' is not"),
    (CATEGORIES, "BaseID\tA\n1\t2\n1\t3\n", "locations.parquet: row 1, column 'loc_id': duplicate"),
])
def test_malformed_side_files(tmp_path, categories, poi, message):
    with pytest.raises(UserError, match=message):
        import_tsinghua(fixture(tmp_path / "src", categories=categories, poi=poi), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_to_write_over_a_dataset_and_needs_the_trace(tmp_path):
    src = fixture(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not an empty folder"):
        import_tsinghua(src, tmp_path / "out")
    assert (tmp_path / "out/keep.txt").read_text() == "mine"
    (tmp_path / "src/App_usage_trace.txt").unlink()
    with pytest.raises(UserError, match="no App_usage_trace.txt"):
        import_tsinghua(src, tmp_path / "new")


def test_command_line(tmp_path, capsys):
    src = fixture(tmp_path / "src", categories=None)
    assert cli_main(["data", "import-tsinghua", "--src", str(src), "--out", str(tmp_path / "out"),
                     "--rows-per-file", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "events: 3 rows in 2 files",
        "locations: 2 base stations with 3 POI counts each, no coordinates",
        "regions: none (no coordinates), so the region channels will carry no geography; "
        "--poi-regions K makes K regions of similar POI profiles",
        f"wrote {tmp_path / 'out'}"]


def test_line_numbers_hold_across_streamed_blocks(tmp_path):
    # about 6 MB: the reader's 4 MiB blocks split it, and the bad line sits in the second
    good = "123456 20160421080000 7194 361 4632\n" * 170_000
    trace = good + "\n" + good + "1 20160421080000 7194 361\n"
    with pytest.raises(UserError, match=r"App_usage_trace.txt, line 340002: expected 5 fields"):
        import_tsinghua(fixture(tmp_path / "src", trace=trace), tmp_path / "out")
