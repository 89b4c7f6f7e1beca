"""The samples of docs/data-contract.md: the reader and the import accept them, and the page
shows exactly what the files hold."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq

from trainer.config import load_config
from trainer.data.featurize import featurize
from trainer.data.tsinghua import import_tsinghua
from umask.contract import EventReader, open_dataset, read_apps, read_locations, read_profiles

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "data-contract.md"
SAMPLES = REPO / "docs" / "samples"


def _writer():
    spec = importlib.util.spec_from_file_location("write_samples", SAMPLES / "write_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_shows_what_the_sample_files_hold():
    writer, text = _writer(), DOC.read_text()
    for name, table in writer.tables().items():
        on_disk = pq.read_table(SAMPLES / "contract" / name)
        assert on_disk.equals(table), f"{name}: run docs/samples/write_samples.py"
        assert writer.markdown(on_disk) in text, f"{name}: the page shows another table"
    for name in ("App_usage_trace.txt", "App2Category.txt"):
        assert (SAMPLES / "tsinghua" / name).read_text().rstrip() in text, name
    poi = (SAMPLES / "tsinghua" / "base_poi.txt").read_text().rstrip().replace("\t", "<TAB>")
    assert poi in text
    for relative in [f"samples/contract/{n}" for n in writer.tables()] + [
            "samples/tsinghua/App_usage_trace.txt", "samples/tsinghua/base_poi.txt"]:
        assert f"]({relative})" in text and (DOC.parent / relative).is_file()


def test_the_contract_sample_is_read_strictly_and_featurized(tmp_path):
    dataset = open_dataset(SAMPLES / "contract")
    reader = EventReader(dataset, "strict")
    rows = sum(batch.num_rows for batch in reader.batches())
    assert rows == 6 and reader.report.as_dict()["rows_quarantined"] == 0
    assert read_apps(dataset, 8).num_rows == 4
    assert read_locations(dataset).num_rows == 3
    assert read_profiles(dataset).num_rows == 2
    cfg = load_config([str(REPO / "configs" / "tiny.yaml")], [
        f"data.source={SAMPLES / 'contract'}", f"data.features={tmp_path / 'features'}",
        "data.num_categories=8", "data.num_regions=2", "data.invalid_rows=strict", "data.num_shards=1",
        "data.featurize_workers=1"])
    manifest = featurize(cfg)
    assert sum(manifest["users"].values()) == 2 and manifest["events"]["featurized"] == 6


def test_the_tsinghua_sample_imports_into_the_contract(tmp_path):
    summary = import_tsinghua(SAMPLES / "tsinghua", tmp_path / "raw")
    assert (summary.events, summary.apps, summary.categories, summary.locations, summary.poi_categories) == (
        5, 3, 2, 2, 3)
    events = pq.read_table(tmp_path / "raw" / "events").sort_by("ts").to_pylist()
    # 2016-04-21 08:15:32 in China is 00:15:32 UTC
    assert events[0]["ts"].strftime("%Y-%m-%d %H:%M:%S") == "2016-04-21 00:15:32"
    apps = {r["app_id"]: r["category_id"] for r in pq.read_table(tmp_path / "raw" / "apps.parquet").to_pylist()}
    assert apps == {24: 1, 107: 0, 362: 0}  # categories 5 and 12, numbered from 0
    locations = pq.read_table(tmp_path / "raw" / "locations.parquet").to_pylist()
    assert [(r["loc_id"], r["lat"], r["poi_counts"]) for r in locations] == [
        (7801, None, [3, 0, 1]), (9044, None, [0, 12, 4])]


def test_without_coordinates_there_are_no_regions_unless_the_poi_counts_make_them(tmp_path, capsys):
    """The Tsinghua data has no coordinates: the summary says `regions: none` and what that
    means; --poi-regions K gives the base stations K regions of similar POI profiles."""
    from trainer.cli import main

    def featurize_and_summarize(raw: Path, regions: int) -> str:
        args = ["--config", str(REPO / "configs" / "tiny.yaml"), f"data.source={raw}",
                f"data.features={raw.parent / (raw.name + '-features')}", "data.num_categories=2",
                f"data.num_regions={regions}", "data.num_shards=1", "data.featurize_workers=1"]
        assert main(["data", "featurize", *args]) == 0
        capsys.readouterr()
        assert main(["data", "summary", *args]) == 0
        return capsys.readouterr().out

    assert main(["data", "import-tsinghua", "--src", str(SAMPLES / "tsinghua"), "--out", str(tmp_path / "plain")]) == 0
    assert "--poi-regions K makes K regions" in capsys.readouterr().out
    summary = featurize_and_summarize(tmp_path / "plain", 4)
    assert "regions: none, because locations.parquet gives neither region_id nor coordinates" in summary
    assert "regions (kmeans)" not in summary

    assert main(["data", "import-tsinghua", "--src", str(SAMPLES / "tsinghua"), "--out", str(tmp_path / "poi"),
                 "--poi-regions", "2"]) == 0
    assert "regions: 2 from the base stations' POI profiles (k-means); set data.num_regions=2" in (
        capsys.readouterr().out)
    regions = pq.read_table(tmp_path / "poi" / "locations.parquet").column("region_id").to_pylist()
    assert sorted(regions) == [0, 1]  # two stations of different POI mixes: two regions
    summary = featurize_and_summarize(tmp_path / "poi", 2)
    assert "regions (region_id): 2 used" in summary
