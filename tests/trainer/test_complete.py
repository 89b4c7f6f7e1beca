"""`u-mask complete`: task windows by hand, and the command on real contract events of two users
with a checkpoint built in the trainer's format (tests/trainer/conftest.py built_checkpoint)."""
import copy
import dataclasses
import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from trainer.cli import main as cli_main
from trainer.inference.complete import complete_windows
from umask.completion import COMPLETED, task_cut
from umask.slots import latest_windows
from umask.spec import WEEK_SECONDS as WEEK
from trainer.data.schema import EXAMPLES
from trainer.inference.loading import load_inference_model
from umask.config import MaskConfig

MASK = MaskConfig()  # short: up to 6 target slots, long: up to 72, cold: 24 slots of history


def run_complete(*argv: str) -> int:
    return cli_main(["complete", *argv])


def window(observed_slots: list[int], slots: int = 168) -> torch.Tensor:
    observed = torch.zeros(1, slots, dtype=torch.bool)
    observed[0, observed_slots] = True
    return observed


@pytest.mark.parametrize("task, observed_slots, cut, expected", [
    ("short", [3, 30], None, (31, range(31, 37))),  # right after the last record
    ("short", [3, 167], None, (162, range(162, 168))),  # a full week: the last 6 slots
    ("long", [3, 30], None, (31, range(31, 103))),
    ("long", [150], None, (96, range(96, 168))),
    ("cold", [3, 30], None, (24, range(24, 168))),
    ("short", [3, 30], 10, (10, range(10, 16))),
    ("cold", [3], 50, (50, range(50, 168))),
])
def test_task_windows(task, observed_slots, cut, expected):
    start, target = task_cut(task, window(observed_slots), MASK, cut)
    assert start.tolist() == [expected[0]]
    assert torch.nonzero(target[0]).flatten().tolist() == list(expected[1])


@pytest.fixture(scope="module")
def two_users(tiny_dataset, tmp_path_factory):
    """The contract events of the two users with the most events, as one events.parquet with no
    side tables beside it (the checkpoint's feature spec places apps and locations)."""
    events = pq.read_table(tiny_dataset / "raw" / "events")
    counts = pc.value_counts(events.column("user_id")).to_pylist()
    users = [c["values"] for c in sorted(counts, key=lambda c: (-c["counts"], c["values"]))[:2]]
    folder = tmp_path_factory.mktemp("two-users")
    pq.write_table(events.filter(pc.is_in(events.column("user_id"), value_set=pa.array(users))),
                   folder / "events.parquet")
    return folder / "events.parquet", sorted(users)


@pytest.fixture(scope="module")
def inference(built_checkpoint):
    return load_inference_model(built_checkpoint[1])


def test_latest_window_per_user_and_evidence_kept_exactly(inference, two_users, tmp_path):
    events, users = two_users
    rows = latest_windows(events, inference.spec, inference.maps)
    assert rows.user_id.tolist() == users
    # each user's latest window is the week holding the user's last event
    table = pq.read_table(events)
    for user, start in zip(users, rows.window_start.tolist()):
        ts = table.filter(pc.equal(table["user_id"], user))["ts"].cast(pa.timestamp("s")).cast(pa.int64())
        assert start <= pc.max(ts).as_py() < start + WEEK
    result = complete_windows(inference, rows, "long", None, 2, seed=1)
    evidence, target = result["evidence"], result["target"]
    observed = torch.from_numpy(rows.observed)
    assert (evidence & ~observed).sum() == 0 and (evidence & target).sum() == 0
    assert (evidence.sum(1) > 0).all()
    slot = torch.arange(168)
    assert not (evidence & (slot >= result["cut"][:, None])).any()
    dense = torch.from_numpy(rows.dense)
    assert torch.equal(result["dense"][evidence], dense[evidence])
    again = complete_windows(inference, rows, "long", None, 2, seed=1)
    assert torch.equal(again["dense"], result["dense"])


def test_complete_command_prints_and_writes_the_completed_week(built_checkpoint, two_users, tmp_path, capsys):
    run, _, _ = built_checkpoint
    events, users = two_users
    out = tmp_path / "out"
    assert run_complete("--checkpoint", str(run), "--events", str(events), "--task", "short",
                        "--out", str(out), "--steps", "2") == 0
    printed = capsys.readouterr().out
    for user in users:
        # each user's header says what is completed (a forecast after the last record, or a
        # backtest of the window's last slots) and what the model saw
        assert re.search(rf"user {user}, week of \S+ \S+Z, task short: a (forecast|backtest) of slots "
                         r"\d+-\d+", printed)
    assert len(re.findall(r"  evidence: \d+ of the \d+ observed slots before slot \d+, sampled as in training",
                          printed)) == 2
    assert printed.count("predicted categories") == 2
    table = pq.read_table(out / "completed.parquet")
    assert table.schema == COMPLETED
    # the dense channels are named, from the checkpoint's feature spec
    names = json.loads(table.schema.metadata[b"umask.dense_channels"])
    assert names == json.loads(table.schema.field("dense").metadata[b"channels"])
    assert len(names) == 56 and names[:2] == ["category_0", "category_1"]
    assert names[-4:] == ["region_31", "region_unknown", "activity", "volume"]
    assert table.num_rows == 2 * 168
    per_user_targets = [int(pc.sum(pc.cast(table.filter(pc.equal(table["user_id"], u))["target"], "int64")).as_py())
                        for u in users]
    assert per_user_targets == [6, 6]
    dense = np.stack(table["dense"].to_numpy(zero_copy_only=False))
    assert dense.shape == (2 * 168, 56) and np.isfinite(dense).all()


def test_complete_command_errors_name_the_problem(built_checkpoint, two_users, tmp_path, capsys):
    run, _, _ = built_checkpoint
    events, _ = two_users
    assert run_complete("--checkpoint", str(run), "--events", str(tmp_path / "none.parquet"),
                        "--task", "cold", "--out", str(tmp_path)) == 2
    assert "no such file" in capsys.readouterr().err
    assert run_complete("--checkpoint", str(run), "--events", str(events), "--task", "cold",
                        "--out", str(tmp_path), "--cut", "400") == 2
    assert "cut 400: must be a slot in [1, 167]" in capsys.readouterr().err


def test_complete_featurizes_as_training_did_without_the_training_data(inference, two_users, tiny_dataset,
                                                                       tmp_path):
    """The checkpoint's feature spec alone decides the slots: with the training source gone and
    side tables beside the events that would give other categories and other k-means regions,
    each user's latest window is bit for bit the training features' example of that window."""
    events, users = two_users
    folder = tmp_path / "dataset"
    (folder / "events").mkdir(parents=True)
    shutil.copy(events, folder / "events" / "part-0.parquet")
    apps = pq.read_table(tiny_dataset / "raw" / "apps.parquet")
    pq.write_table(apps.set_column(apps.schema.get_field_index("category_id"), "category_id",
                                   pc.cast(pc.subtract(19, apps["category_id"]), pa.int32())),
                   folder / "apps.parquet")
    locations = pq.read_table(tiny_dataset / "raw" / "locations.parquet")
    pq.write_table(locations.set_column(locations.schema.get_field_index("lat"), "lat",
                                        pc.negate(locations["lat"])), folder / "locations.parquet")
    elsewhere = dataclasses.replace(inference, cfg=copy.deepcopy(inference.cfg))
    elsewhere.cfg.data.source = str(tmp_path / "not-here")

    rows = latest_windows(folder, elsewhere.spec, elsewhere.maps)
    trained = pa.concat_tables(pq.read_table(path, schema=EXAMPLES) for path in
                               (tiny_dataset / "features").glob("split=*/shard=*/*.parquet")).to_pylist()
    by_key = {(r["user_id"], r["window_start"]): r for r in trained}
    F = inference.layout.num_channels
    for b, user in enumerate(rows.user_id.tolist()):
        example = by_key[(user, int(rows.window_start[b]))]
        np.testing.assert_array_equal(rows.dense[b], np.array(example["dense"], np.float32).reshape(-1, F))
        assert rows.observed[b].tolist() == example["observed"]
        assert rows.time_of_week[b].tolist() == example["time_of_week"]


@pytest.mark.parametrize("factor", [10**3, 10**9])
def test_complete_on_ts_in_a_finer_unit_ends_in_one_clear_line(built_checkpoint, two_users, tmp_path,
                                                               capsys, factor):
    """Epoch milliseconds (or ns) where seconds are meant: refused naming the file, row and
    reason, not a `year 58804 is out of range` traceback."""
    run, _, _ = built_checkpoint
    events, _ = two_users
    table = pq.read_table(events)
    seconds = table["ts"].cast(pa.timestamp("s")).cast(pa.int64())
    wrong = tmp_path / "ms" / "events.parquet"
    wrong.parent.mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("ts"), "ts", pc.multiply(seconds, factor)), wrong)
    assert run_complete("--checkpoint", str(run), "--events", str(wrong), "--task", "long",
                        "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"u-mask: error: {wrong}: row 0, column 'ts': ts outside the plausible range")


def test_forecast_or_backtest_and_all_evidence(inference, two_users):
    """A user whose last record leaves room gets a forecast of the slots after it; one whose
    record is at the window's end a backtest; --evidence all shows every slot before the cut."""
    events, _ = two_users
    rows = latest_windows(events, inference.spec, inference.maps)
    sampled = complete_windows(inference, rows, "short", None, 1, seed=0)
    every = complete_windows(inference, rows, "short", None, 1, seed=0, evidence="all")
    observed = torch.from_numpy(rows.observed)
    before = torch.arange(168) < every["cut"][:, None]
    assert torch.equal(every["evidence"], observed & before)
    assert (sampled["evidence"].sum(1) <= every["evidence"].sum(1)).all()
    for b in range(len(rows)):
        last = int(torch.nonzero(observed[b]).max())
        forecast = last + 1 + 6 <= 168
        assert int(sampled["cut"][b]) == (last + 1 if forecast else 162)
        assert bool((observed[b] & sampled["target"][b]).any()) == (not forecast)
