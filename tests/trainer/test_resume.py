"""Resuming with a changed config: refused on the driver, before any worker starts, naming each key.

The checkpoint is conftest's built_checkpoint (a real tiny model's dense.safetensors, tables,
config.yaml and spec, written directly), copied into a run folder under this test's storage.
"""
import shutil

import pytest
import yaml

from trainer.data.loader import read_spec
from trainer.training.launch import train
from trainer.training.resume import check_resume
from umask.errors import UserError


@pytest.fixture
def run_with_checkpoint(built_checkpoint, tmp_path):
    """runs/built/checkpoint_000000: the built checkpoint, as a resumable run of this test."""
    _, folder, _ = built_checkpoint
    run = tmp_path / "runs" / "built"
    shutil.copytree(folder, run / "checkpoint_000000")
    return run


def _set_saved(run, **keys):
    """Rewrites the checkpoint's config.yaml as if it had been trained with these dotted keys."""
    path = run / "checkpoint_000000" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    for dotted, value in keys.items():
        node = saved
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(saved))


def _check(tiny_config, tiny_dataset, run, *overrides):
    cfg = tiny_config("ray.name=built", "ray.num_workers=1", *overrides)
    return check_resume(cfg, run, read_spec(tiny_dataset / "features"))


def test_the_same_config_resumes(tiny_config, tiny_dataset, run_with_checkpoint):
    assert _check(tiny_config, tiny_dataset, run_with_checkpoint) == run_with_checkpoint / "checkpoint_000000"


@pytest.mark.parametrize("overrides", [
    ("deepspeed.lr=0.01", "deepspeed.weight_decay=0.1", "deepspeed.gradient_clipping=0.5"),
    ("deepspeed.gradient_accumulation_steps=2", "train.steps=500", "train.checkpoint_every=7"),
    ("model.loss.consistency_weight=0.5", "model.mask.family=uniform", "embeddings.lr=0.1"),
    ("embeddings.app.sharding_types=[table_wise]", "ray.cpus_per_worker=2"),
    ("ray.num_workers=2",),
], ids=["optimizer hyperparameters", "schedule", "loss and mask", "placement", "world size"])
def test_what_may_change_on_resume(tiny_config, tiny_dataset, run_with_checkpoint, overrides):
    assert _check(tiny_config, tiny_dataset, run_with_checkpoint, *overrides) is not None


@pytest.mark.parametrize("overrides,saved,named", [
    (["deepspeed.zero_stage=3"], {}, r"deepspeed\.zero_stage: 0 in the checkpoint, 3 in this run"),
    (["deepspeed.zero_stage=0"], {"deepspeed.zero_stage": 2}, r"deepspeed\.zero_stage: 2 in the checkpoint, 0"),
    (["deepspeed.precision=bf16"], {}, r"deepspeed\.precision: 'fp32' in the checkpoint, 'bf16' in this run"),
    (["embeddings.app.num_embeddings=8192"], {}, r"embeddings\.app\.num_embeddings: 4096 in the checkpoint, 8192"),
    (["embeddings.optimizer=adagrad"], {}, r"embeddings\.optimizer: 'row_wise_adagrad' in the checkpoint"),
    (["train.batch_size=16"], {}, r"train\.batch_size: 8 in the checkpoint, 16"),
    (["model.hidden=128"], {}, r"the dense model's shapes differ .* keys changed: model\.hidden"),
    (["embeddings.loc.dim=8"], {}, r"(?s)embeddings\.loc\.dim: 16 in the checkpoint, 8 .* keys changed: embeddings\.loc\.dim"),
    # CPU runs hash tables with the fused kernel only, so the GPU-only values are the saved ones
    ([], {"embeddings.app.collision": "zch"},
     r"embeddings\.app\.collision: 'zch' in the checkpoint, 'hash' in this run; ids map to other rows"),
    ([], {"embeddings.loc.compute_kernel": "fused_uvm_caching"},
     r"embeddings\.loc\.compute_kernel: 'fused_uvm_caching' in the checkpoint, 'fused' in this run; "
     r"the table's state was written by the other FBGEMM kernel"),
], ids=["zero 0->3", "zero 2->0", "precision", "table rows", "table optimizer", "batch size",
        "model width", "table width", "table collision", "table kernel"])
def test_what_may_not_change_is_refused_naming_the_key(tiny_config, tiny_dataset, run_with_checkpoint,
                                                      overrides, saved, named):
    _set_saved(run_with_checkpoint, **saved)
    with pytest.raises(UserError, match=named) as err:
        _check(tiny_config, tiny_dataset, run_with_checkpoint, *overrides)
    assert "Set these keys back to the checkpoint's values, or start a new run" in str(err.value)


def test_zero_1_and_2_may_follow_each_other(tiny_config, tiny_dataset, run_with_checkpoint):
    _set_saved(run_with_checkpoint, **{"deepspeed.zero_stage": 1})
    assert _check(tiny_config, tiny_dataset, run_with_checkpoint, "deepspeed.zero_stage=2") is not None


def test_every_refused_key_is_named_in_one_error(tiny_config, tiny_dataset, run_with_checkpoint):
    with pytest.raises(UserError) as err:
        _check(tiny_config, tiny_dataset, run_with_checkpoint, "deepspeed.zero_stage=3",
               "deepspeed.precision=bf16", "embeddings.optimizer=adagrad")
    lines = [line for line in str(err.value).splitlines() if line.startswith("  ")]
    assert [line.split(":")[0].strip() for line in lines] == [
        "deepspeed.zero_stage", "deepspeed.precision", "embeddings.optimizer"]


def test_u_mask_train_refuses_before_any_worker_starts(tiny_config, run_with_checkpoint, monkeypatch):
    import trainer.training.launch as launch

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started: the refusal came too late")

    monkeypatch.setattr(launch, "_start_ray", no_ray)
    with pytest.raises(UserError, match=r"deepspeed\.zero_stage: 0 in the checkpoint, 3 in this run"):
        train(tiny_config("ray.name=built", "ray.num_workers=1", "deepspeed.zero_stage=3"))


def test_a_checkpoint_from_before_collision_and_kernel_keys_resumes(tiny_config, tiny_dataset, run_with_checkpoint):
    path = run_with_checkpoint / "checkpoint_000000" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    for table in ("app", "loc"):
        del saved["embeddings"][table]["collision"], saved["embeddings"][table]["compute_kernel"]
    path.write_text(yaml.safe_dump(saved))
    assert _check(tiny_config, tiny_dataset, run_with_checkpoint) is not None  # read as hash and fused


def test_a_changed_collision_is_refused_before_any_worker_starts(tiny_config, run_with_checkpoint, monkeypatch):
    import trainer.training.launch as launch

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started: the refusal came too late")

    monkeypatch.setattr(launch, "_start_ray", no_ray)
    _set_saved(run_with_checkpoint, **{"embeddings.loc.collision": "zch"})
    with pytest.raises(UserError, match=r"embeddings\.loc\.collision: 'zch' in the checkpoint, 'hash' in this run"):
        train(tiny_config("ray.name=built", "ray.num_workers=1"))


def test_a_partial_newer_checkpoint_is_not_what_a_run_resumes(tiny_config, tiny_dataset, run_with_checkpoint):
    partial = run_with_checkpoint / "checkpoint_000001"
    shutil.copytree(run_with_checkpoint / "checkpoint_000000", partial)
    (partial / "manifest-rank0.json").unlink()  # its writer died before the manifest
    assert _check(tiny_config, tiny_dataset, run_with_checkpoint) == run_with_checkpoint / "checkpoint_000000"
