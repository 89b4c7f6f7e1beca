"""The driver's checks and error translation, without starting workers."""
import pytest
from ray.train import WorkerGroupError

from umask.errors import UserError
from trainer.training.launch import _worker_user_error, train


def test_user_errors_on_workers_become_one_message():
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = UserError("data/x: no such folder")
    err = WorkerGroupError("snippet", {1: wrapped, 0: UserError("data/x: no such folder")})
    assert str(_worker_user_error(err)) == "on rank 0, 1: data/x: no such folder"


def test_other_worker_errors_stay_as_they_are():
    err = WorkerGroupError("snippet", {0: UserError("bad"), 1: ZeroDivisionError("bug")})
    assert _worker_user_error(err) is None


def test_row_wise_on_cpu_fails_on_the_driver(tiny_config):
    cfg = tiny_config("embeddings.app.sharding_types=[row_wise]")
    with pytest.raises(UserError, match=r"embeddings\.app\.sharding_types: \['row_wise'\] cannot run on cpu"):
        train(cfg)


def test_missing_features_fail_on_the_driver(tiny_config, tmp_path):
    with pytest.raises(UserError, match="manifest.json: missing"):
        train(tiny_config(f"data.features={tmp_path / 'nothing'}"))


def test_existing_run_is_not_overwritten_without_resume(tiny_config, tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    with pytest.raises(UserError, match="run 'taken' already exists"):
        train(tiny_config("ray.name=taken", "train.resume=false"))
