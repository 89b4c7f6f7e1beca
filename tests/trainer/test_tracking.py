"""Rank 0's TensorBoard record (trainer/training/tracking.py): every logged step's figures, each
under its scalar name, readable by TensorBoard's own reader once the run closes."""
from types import SimpleNamespace

import pytest

from trainer.training.tracking import Trackers


def test_every_logged_step_reaches_tensorboard_under_its_scalar_name(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracking = SimpleNamespace(tensorboard=True, mlflow_uri=None, mlflow_experiment="tests")
    trackers = Trackers(tmp_path, tracking, "run")
    rows = [{"step": step, "loss": 1.0 / step, "grad_norm": 2.0 * step, "peak_rss_gb_rank1": 0.5,
             "examples_per_s": 100.0 + step, "elapsed_s": 0.1 * step} for step in (1, 2, 3)]
    for row in rows:  # steps closer together than FLUSH_S: only the close writes them all out
        trackers.log(row["step"], row)
    trackers.close()

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/grad_norm", "memory/peak_rss_gb_rank1",
                                             "perf/examples_per_s"}  # step and elapsed_s are no scalars
    for name, column in (("train/loss", "loss"), ("train/grad_norm", "grad_norm"),
                         ("perf/examples_per_s", "examples_per_s")):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([row[column] for row in rows])
