"""`u-mask data synth --generator metro`: contract-valid, deterministic, the stated distributions."""
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from trainer.cli import main as cli_main
from trainer.data.synth_metro import (COLD_START_SHARE, NUM_CATEGORIES, NUM_REGIONS, TRAFFIC_MEDIAN_BYTES,
                                      _TRAFFIC_FACTOR, synthesize_metro)
from umask.contract import open_dataset, read_apps, read_events, read_locations

USERS, DAYS = 1000, 28
START = 1793577600  # 2026-11-02T00:00Z


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("metro")
    synthesize_metro(out, USERS, DAYS, seed=3)
    return out


@pytest.fixture(scope="module")
def events(dataset) -> dict[str, np.ndarray]:
    table = pads.dataset(dataset / "events").to_table()
    apps = pq.read_table(dataset / "apps.parquet")
    category = dict(zip(apps["app_id"].to_pylist(), apps["category_id"].to_pylist()))
    app = table["app_id"].to_numpy()
    return {"user": table["user_id"].to_numpy(), "ts": table["ts"].to_numpy(), "app": app,
            "category": np.array([category[a] for a in app]), "traffic": table["traffic_bytes"].to_numpy(),
            "loc": table["loc_id"].to_pandas().to_numpy()}


def test_passes_the_contract_reader_strictly_with_18_categories_and_12_regions(dataset, events):
    contract = open_dataset(dataset)
    assert sum(batch.num_rows for batch in read_events(contract, policy="strict")) == len(events["user"])
    assert read_apps(contract, num_categories=NUM_CATEGORIES).num_rows == 2000
    locations = read_locations(contract)
    assert sorted(set(locations["region_id"].to_pylist())) == list(range(NUM_REGIONS))
    assert set(np.unique(events["category"])) == set(range(NUM_CATEGORIES))
    assert 0.02 < np.isnan(events["loc"]).mean() < 0.06  # records without a known cell


def test_same_seed_same_content_other_seed_other_content(tmp_path):
    for name, seed in (("first", 3), ("again", 3), ("other", 4)):
        synthesize_metro(tmp_path / name, 50, 7, seed=seed)
    for name in ("apps.parquet", "locations.parquet", "events/part-00000.parquet"):
        assert pq.read_table(tmp_path / "again" / name).equals(pq.read_table(tmp_path / "first" / name)), name
    assert not pq.read_table(tmp_path / "other" / "events").equals(pq.read_table(tmp_path / "first" / "events"))


def test_traffic_is_log_normal_around_8_kb_per_event(events):
    base = events["traffic"] / _TRAFFIC_FACTOR[events["category"]]
    assert 0.85 * TRAFFIC_MEDIAN_BYTES < np.median(base) < 1.15 * TRAFFIC_MEDIAN_BYTES
    assert 0.8 < np.log(base[base > 0]).std() < 1.2  # TRAFFIC_SIGMA = 1.0


def test_active_hours_from_60_down_to_3_percent_and_10_percent_cold_start_users(events):
    users, first = np.unique(events["user"], return_index=True)
    hour = (events["ts"] - START) // 3600
    active = np.array([len(np.unique(hour[events["user"] == u])) for u in users])
    first_day = np.array([hour[events["user"] == u].min() // 24 for u in users])
    cold = first_day >= DAYS - 5
    share = active[~cold] / (24 * DAYS - 24 * first_day[~cold])
    assert share.max() < 0.65 and np.quantile(share, 0.9) > 0.3
    assert np.quantile(share, 0.1) < 0.06
    assert 0.6 * COLD_START_SHARE < cold.mean() < 1.5 * COLD_START_SHARE


def test_cli_generator_switch(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["data", "synth", "--generator", "metro", "--out", str(out), "--users", "20",
                     "--days", "7", "--apps", "40", "--locations", "20"]) == 0
    assert capsys.readouterr().out.startswith("synth: 20 users, ")
    assert pq.read_table(out / "apps.parquet").num_rows == 40
    assert cli_main(["data", "synth", "--generator", "metro", "--out", str(out), "--users", "20",
                     "--workers", "2"]) == 2
    assert "--workers applies to --generator personas only" in capsys.readouterr().err
    assert cli_main(["data", "synth", "--generator", "metro", "--out", str(out), "--users", "20",
                     "--locations", "5"]) == 2
    assert "--locations must be at least 12" in capsys.readouterr().err
