"""The feature spec end to end: any slot length that divides a day and windows of one or more
weeks featurize, train on real Ray workers, evaluate and complete; features that disagree with
the run's config are refused on the driver, naming the keys."""
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from trainer.cli import main as cli_main
from trainer.config import load_config
from trainer.data.featurize import featurize
from trainer.data.loader import read_spec
from trainer.inference.evaluate import MODEL, EvalSettings, evaluate
from trainer.inference.loading import load_inference_model
from trainer.training.launch import train
from umask.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WEEK = 7 * 86400


def test_features_of_other_settings_are_refused_before_any_worker_starts(tiny_config, tmp_path):
    # featurized with C=20, K=32: C+K agrees, the layout does not (a region read as a category)
    cfg = tiny_config("data.num_categories=21", "data.num_regions=31")
    with pytest.raises(UserError) as caught:
        train(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert "data.num_categories (20 in the features, 21 in the config)" in message
    assert "data.num_regions (32 in the features, 31 in the config)" in message
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made


def test_half_hour_slots_are_refused_against_hourly_features(tiny_config):
    with pytest.raises(UserError, match=r"data\.slot_seconds \(3600 in the features, 1800 in the config\); "
                                        r"data\.slots \(168 in the features, 336 in the config\)"):
        train(tiny_config("data.slot_seconds=1800", "data.slots=336"))


@pytest.fixture(scope="module")
def matrix_raw(tmp_path_factory) -> Path:
    from trainer.data.synth import synthesize

    raw = tmp_path_factory.mktemp("slot-matrix") / "raw"
    synthesize(raw, users=80, days=14, seed=1)
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("slot_seconds, weeks", [(900, 1), (1800, 1), (3600, 2), (7200, 1), (7200, 2)])
def test_any_slot_length_trains_evaluates_and_completes(slot_seconds, weeks, matrix_raw, tmp_path,
                                                        embedded_ray, capsys):
    slots = weeks * WEEK // slot_seconds
    cfg = load_config([str(CONFIGS / "tiny.yaml")], [
        f"data.source={matrix_raw}", f"data.features={tmp_path / 'features'}",
        f"data.slot_seconds={slot_seconds}", f"data.slots={slots}", "data.row_group_size=16",
        "data.test_fraction=0.25", f"ray.storage_path={tmp_path / 'runs'}", "ray.name=grid",
        "ray.num_workers=1", "train.steps=3", "train.batch_size=4", "train.log_every=1",
        "train.checkpoint_every=3"])
    featurize(cfg)
    spec = read_spec(tmp_path / "features")
    assert (spec.slots_per_day, spec.slots_per_week, spec.slots) == (86400 // slot_seconds,
                                                                    WEEK // slot_seconds, slots)
    examples = pq.read_table(next((tmp_path / "features").glob("split=train/shard=*/*.parquet")))
    time_of_week = np.concatenate(examples.column("time_of_week").to_numpy(zero_copy_only=False))
    assert time_of_week.max() >= spec.slots_per_week - spec.slots_per_day  # Sundays are there
    assert time_of_week.max() < spec.slots_per_week

    result = train(cfg)
    assert result.error is None and math.isfinite(result.metrics["loss"])

    inference = load_inference_model(tmp_path / "runs" / "grid")
    assert inference.spec.digest == spec.digest
    assert inference.model.dit.embedder.time_of_week.num_embeddings == spec.slots_per_week
    assert inference.model.uscope.day_slots == spec.slots_per_day
    report = evaluate(inference, tmp_path / "features",
                      EvalSettings(split="test", batch_size=4, popularity_batches=2))
    for task in ("long", "cold"):  # long and cold targets always hold observed slots here
        for method in (MODEL, "hour_of_week"):
            scores = report["tasks"][task][method]["all"]
            assert scores["slots"] > 0 and math.isfinite(scores["category_mrr"]), (task, method)

    out = tmp_path / "completed"
    assert cli_main(["complete", "--checkpoint", str(tmp_path / "runs" / "grid"), "--events",
                     str(matrix_raw / "events"), "--task", "long", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    completed = pq.read_table(out / "completed.parquet")
    assert completed.num_rows % slots == 0
    assert max(completed.column("time_of_week").to_pylist()) < spec.slots_per_week
    dense = np.stack(completed.column("dense").to_numpy(zero_copy_only=False))
    assert np.isfinite(dense).all()
    # target slots print at their time of day: minutes appear with slots shorter than an hour
    times = set(re.findall(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (\d\d:\d\d)", printed))
    assert times and all(int(t[3:]) % (slot_seconds // 60 if slot_seconds < 3600 else 60) == 0 for t in times)
    if slot_seconds < 3600:
        assert any(not t.endswith(":00") for t in times)
