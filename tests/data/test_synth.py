"""The synthetic dataset: contract layout, determinism, valid ranges, realism and learnability."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from trainer.cli import main as cli_main
from trainer.data import synth
from umask.contract import open_dataset, read_apps, read_events, read_locations, read_profiles
from trainer.data.synth_city import LAT_RANGE, LON_RANGE
from trainer.data.synth_personas import CATEGORY_NAMES, NUM_PERSONAS
from trainer.data.synth_users import make_population
from trainer.data.synth_world import make_world
from umask.errors import UserError

USERS, DAYS, SEED, CHUNK = 200, 14, 7, 64
START = 1793577600  # 2026-11-02T00:00Z, a Monday
END = START + DAYS * 86400


def _synth(out: Path, **changes) -> synth.SynthSummary:
    args = dict(users=USERS, days=DAYS, seed=SEED, chunk_users=CHUNK)
    return synth.synthesize(out, **{**args, **changes})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    _synth(out)
    return out


@pytest.fixture(scope="module")
def events(dataset) -> dict[str, np.ndarray]:
    """The events as numpy columns; ts in epoch seconds, event as text ('' = null)."""
    table = pads.dataset(dataset / "events").to_table()
    return {
        "user": table["user_id"].to_numpy(),
        "ts": table["ts"].cast(pa.int64()).to_numpy() // 1000,
        "app": table["app_id"].fill_null(-1).to_numpy(),
        "loc": table["loc_id"].fill_null(-1).to_numpy(),
        "traffic": table["traffic_bytes"].fill_null(0).to_numpy(),
        "traffic_known": table["traffic_bytes"].is_valid().to_numpy(zero_copy_only=False),
        "event": np.asarray(table["event"].cast(pa.string()).fill_null("").to_pylist()),
    }


@pytest.fixture(scope="module")
def category_of(dataset) -> dict[int, int]:
    apps = pq.read_table(dataset / "apps.parquet")
    return dict(zip(apps["app_id"].to_pylist(), apps["category_id"].to_pylist()))


def test_writes_the_contract_layout(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == [
        "apps.parquet", "events", "locations.parquet", "profiles.parquet"]
    assert sorted(p.name for p in (dataset / "events").iterdir()) == [
        f"part-{i:05d}.parquet" for i in range(4)]  # ceil(200 / 64) chunks
    assert pq.read_schema(dataset / "events" / "part-00000.parquet").types == [
        pa.int64(), pa.timestamp("ms", tz="UTC"), pa.int64(), pa.int64(), pa.int64(),
        pa.dictionary(pa.int8(), pa.string())]
    apps = pq.read_table(dataset / "apps.parquet")
    assert apps.schema.names == ["app_id", "category_id", "name"] and apps.num_rows == 2000
    assert apps["category_id"].type == pa.int32()
    locations = pq.read_table(dataset / "locations.parquet")
    assert locations.schema.names == ["loc_id", "lat", "lon", "poi_counts"]
    assert locations.num_rows == 500 and locations["poi_counts"].type == pa.list_(pa.int32())
    profiles = pq.read_table(dataset / "profiles.parquet")
    assert profiles["profile_vec"].type == pa.list_(pa.float32(), 16)


def test_same_seed_gives_identical_files_whatever_the_workers(dataset, tmp_path):
    _synth(tmp_path / "again", workers=2)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*.parquet"))
    assert files == sorted(p.relative_to(tmp_path / "again")
                           for p in (tmp_path / "again").rglob("*.parquet"))
    for name in files:
        assert pq.read_table(dataset / name).equals(pq.read_table(tmp_path / "again" / name))
        assert (dataset / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_another_seed_gives_other_data(dataset, tmp_path):
    _synth(tmp_path / "other", seed=SEED + 1)
    first = pq.read_table(dataset / "events" / "part-00000.parquet")
    other = pq.read_table(tmp_path / "other" / "events" / "part-00000.parquet")
    assert not set(first["user_id"].to_pylist()) & set(other["user_id"].to_pylist())


def test_a_chunk_does_not_depend_on_the_others(dataset, tmp_path):
    # 70 users: chunk 0 is the same 64 users as in the 200-user run, chunk 1 is shorter
    _synth(tmp_path / "fewer", users=70)
    part = Path("events") / "part-00000.parquet"
    assert pq.read_table(tmp_path / "fewer" / part).equals(pq.read_table(dataset / part))
    rest = pq.read_table(tmp_path / "fewer" / "events" / "part-00001.parquet")["user_id"]
    assert 0 < len(rest.unique()) <= 6


def test_every_kind_of_record_occurs(events):
    kinds = set(events["event"].tolist())
    assert kinds == {"use", "install", "uninstall", ""}  # "" = null event, location only
    location_only = events["event"] == ""
    assert np.all(events["app"][location_only] == -1) and np.all(events["loc"][location_only] >= 0)
    assert np.all(events["app"][~location_only] >= 0)
    assert np.any((events["loc"] == -1) & (events["event"] == "use"))  # unknown cell
    rows = np.stack([events["user"], events["ts"], events["app"], events["loc"]], axis=1)
    assert len(np.unique(rows, axis=0)) < len(rows)  # some records exported twice


def test_values_are_in_range(dataset, events, category_of):
    assert events["ts"].min() >= START and events["ts"].max() < END
    assert events["user"].min() >= 0 and events["traffic"].min() >= 0
    # bytes are known for app use and installs, unknown for pings and uninstalls
    assert np.all(events["traffic_known"] == np.isin(events["event"], ["use", "install"]))
    assert set(events["app"][events["app"] >= 0].tolist()) <= set(category_of)
    assert set(category_of.values()) == set(range(len(CATEGORY_NAMES)))
    locations = pq.read_table(dataset / "locations.parquet")
    assert set(events["loc"][events["loc"] >= 0].tolist()) <= set(locations["loc_id"].to_pylist())
    lat, lon = locations["lat"].to_numpy(), locations["lon"].to_numpy()
    assert LAT_RANGE[0] <= lat.min() and lat.max() <= LAT_RANGE[1]
    assert LON_RANGE[0] <= lon.min() and lon.max() <= LON_RANGE[1]
    # ids are hashed into the whole int64 range, not small counters
    assert np.median(events["user"]) > 2**60 and np.median(list(category_of)) > 2**60


def test_users_span_the_sparsity_levels(dataset, events):
    users, counts = np.unique(events["user"], return_counts=True)
    weekly = counts / (DAYS / 7)
    assert weekly.max() >= 150  # dense: hundreds a week
    assert np.sum(counts <= 5) >= 10  # a handful of records in two weeks
    assert 20 <= np.sum((weekly >= 20) & (weekly < 150))
    first_seen = np.minimum.reduceat(events["ts"][np.argsort(events["user"], kind="stable")],
                                     np.concatenate([[0], np.cumsum(counts)[:-1]]))
    cold = (first_seen >= END - 2 * 86400) & (counts >= 10)  # active, but only in the last 2 days
    assert cold.sum() >= 5
    profiles = pq.read_table(dataset / "profiles.parquet")["user_id"].to_numpy()
    assert 0.8 * USERS <= len(profiles) < USERS and len(np.intersect1d(profiles, users)) > 0.8 * len(users)


def test_installed_apps_are_used_only_between_install_and_uninstall(events):
    def times(kind: str) -> dict[tuple[int, int], int]:
        rows = events["event"] == kind
        return dict(zip(zip(events["user"][rows].tolist(), events["app"][rows].tolist()),
                        events["ts"][rows].tolist()))

    installs, removals, used = times("install"), times("uninstall"), set()
    assert len(installs) >= 20 and len(removals) >= 3
    uses = events["event"] == "use"
    for key, ts in zip(zip(events["user"][uses].tolist(), events["app"][uses].tolist()),
                       events["ts"][uses].tolist()):
        assert installs.get(key, START) <= ts < removals.get(key, END)
        used.add(key)
    assert set(installs) <= used  # every installed app is then used


def _category_hours(events, category_of) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    uses = (events["event"] == "use") & (events["app"] >= 0)
    category = np.array([category_of[a] for a in events["app"][uses]])
    hour = (events["ts"][uses] - START) // 3600
    _, user = np.unique(events["user"][uses], return_inverse=True)
    return user, hour, category, events["traffic"][uses]


def test_daily_and_weekly_routines(events, category_of):
    user, hour, category, traffic = _category_hours(events, category_of)
    of_day, weekend = hour % 24, (hour // 24) % 7 >= 5
    night, evening = np.isin(of_day, [2, 3, 4]).sum(), np.isin(of_day, [19, 20, 21]).sum()
    # thresholds hold for any seed at this size; without routines every ratio would be near 1
    assert night * 3 < evening  # people sleep at night (night owls excepted)
    office = np.isin(category, [CATEGORY_NAMES.index("office"), CATEGORY_NAMES.index("email")])
    work_hours = (of_day >= 10) & (of_day < 16)
    assert office[work_hours & ~weekend].mean() > 1.3 * office[work_hours & weekend].mean()
    news = category == CATEGORY_NAMES.index("news")
    assert news[np.isin(of_day, [7, 8])].mean() > 2 * news[np.isin(of_day, [20, 21])].mean()
    video = CATEGORY_NAMES.index("video")
    messaging = CATEGORY_NAMES.index("messaging")
    assert np.median(traffic[category == video]) > 50 * np.median(traffic[category == messaging])


def test_own_history_predicts_the_next_week_better_than_popularity(events, category_of):
    user, hour, category, _ = _category_hours(events, category_of)
    n_users, categories = user.max() + 1, len(CATEGORY_NAMES)
    past = hour < 168
    # week 1: each user's category counts per hour of week, [U, 168, C]
    own = np.zeros((n_users, 168, categories))
    np.add.at(own, (user[past], hour[past], category[past]), 1)
    popular = np.bincount(category[past], minlength=categories)  # [C]
    popular_by_hour = own.sum(axis=0)  # [168, C]
    # week 2 targets: the top category of each (user, hour of week) with use records
    future = ~past
    slot = user[future] * 168 + hour[future] % 168
    counts = np.zeros((n_users * 168, categories))
    np.add.at(counts, (slot, category[future]), 1)
    target_slots = np.flatnonzero(counts.sum(axis=1))
    target = counts[target_slots].argmax(axis=1)
    u, how = np.divmod(target_slots, 168)
    # the user's own hour-of-week counts, backed off to their whole week, then to popularity
    own_score = own[u, how] + 0.1 * own[u].sum(axis=1) / 168 + 1e-3 * popular / popular.sum()
    own_acc = np.mean(own_score.argmax(axis=1) == target)
    popular_acc = np.mean(popular.argmax() == target)
    by_hour_acc = np.mean(popular_by_hour[how].argmax(axis=1) == target)
    assert len(target) > 1000
    assert own_acc > popular_acc + 0.1 and own_acc > by_hour_acc + 0.1, (own_acc, popular_acc, by_hour_acc)


def test_profiles_carry_the_persona():
    world = make_world(seed=3, num_apps=100, num_locations=50)
    users = make_population(world, np.random.default_rng(0), 0, 4000, 14 * 24)
    train, test = slice(0, 2000), slice(2000, 4000)
    centroids = np.stack([users.profile[train][users.persona[train] == p].mean(axis=0)
                          for p in range(NUM_PERSONAS)])  # [P, 16]
    distance = ((users.profile[test][:, None, :] - centroids[None]) ** 2).sum(axis=2)
    accuracy = np.mean(distance.argmin(axis=1) == users.persona[test])
    assert accuracy > 0.6  # the largest persona is 22 % of users


def test_passes_the_contract_reader_strictly(dataset, events):
    contract = open_dataset(dataset)
    rows = sum(batch.num_rows for batch in read_events(contract, policy="strict"))
    assert rows == len(events["user"])
    assert read_apps(contract, num_categories=len(CATEGORY_NAMES)).num_rows == 2000
    assert read_locations(contract).num_rows == 500
    assert read_profiles(contract)["profile_vec"].type == pa.list_(pa.float32(), 16)


def test_cli_prints_one_summary_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["data", "synth", "--out", str(out), "--users", "30", "--days", "7", "--seed", "1",
                     "--apps", "40", "--locations", "20", "--start", "2026-11-09"]) == 0
    line = capsys.readouterr().out.strip()
    events = pads.dataset(out / "events").to_table()
    assert line.startswith(f"synth: 30 users, {events.num_rows} events, 4 files in ")
    start = pc.min(events["ts"]).as_py().timestamp()
    assert start >= START + 7 * 86400
    assert pq.read_table(out / "apps.parquet").num_rows == 40
    # running again replaces the earlier synth output
    assert cli_main(["data", "synth", "--out", str(out), "--users", "30", "--days", "7", "--seed", "2"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--users", "0"], "--users must be at least 1"),
    (["--apps", "5"], "--apps must be at least 20"),
    (["--start", "Monday"], "--start 'Monday' is not a date"),
    (["--start", "2026-11-02T10:30"], "must be a whole hour"),
])
def test_bad_arguments_are_user_errors(tmp_path, capsys, argv, message):
    assert cli_main(["data", "synth", "--out", str(tmp_path), "--users", "5", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "export.parquet").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds files synth did not write \(events/export.parquet\)"):
        synth.synthesize(tmp_path, users=5, days=7)
    assert (tmp_path / "events" / "export.parquet").exists()


def test_a_window_may_start_at_any_hour(tmp_path):
    synth.synthesize(tmp_path, users=40, days=2, seed=1, apps=40, locations=20,
                     start="2026-11-04T05:00")
    ts = pads.dataset(tmp_path / "events").to_table()["ts"].cast(pa.int64()).to_numpy() // 1000
    first = START + 2 * 86400 + 5 * 3600
    assert first <= ts.min() and ts.max() < first + 2 * 86400
