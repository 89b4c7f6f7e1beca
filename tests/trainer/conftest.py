"""Trainer fixtures: one embedded Ray for the session, and the tiny preset aimed at tmp folders.

Ray starts on loopback with exactly the CPUs the tests use; stop_embedded_ray() at the end ends
the processes this session's Ray started, and only those, by process id.
"""
import shutil
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="session")
def embedded_ray():
    from trainer.training.launch import start_embedded_ray, stop_embedded_ray

    start_embedded_ray(num_cpus=3, env_vars={"DS_ACCELERATOR": "cpu"})  # the same Ray as `u-mask train`'s
    try:
        yield
    finally:
        stop_embedded_ray()


@pytest.fixture
def tiny_config(tmp_path, tiny_dataset):
    """tiny_config(*overrides): the tiny preset on the test dataset, runs under tmp_path/runs."""
    from trainer.config import load_config

    def make(*overrides: str):
        return load_config([str(CONFIGS / "tiny.yaml")], [
            f"data.source={tiny_dataset / 'raw'}", f"data.features={tiny_dataset / 'features'}",
            f"ray.storage_path={tmp_path / 'runs'}", *overrides])
    return make


@pytest.fixture(scope="session")
def built_checkpoint(tmp_path_factory, tiny_dataset):
    """A checkpoint in the trainer's format, written directly instead of trained (seconds, not a
    minute): dense.safetensors of a seeded tiny UMask, tables/ saved by save_sharded from a
    1-rank gloo group, config.yaml, the features' spec/, state.json (step 7) and
    manifest-rank0.json.

    Returns (run folder, checkpoint folder, {"dense": state dict, "tables": full weights}).
    """
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from embeddings.checkpoint import save_sharded
    from embeddings.sharded import ShardedTables
    from embeddings.tables import pooled_dim
    from trainer.training.checkpoint import write_manifest, write_state
    from trainer.config import load_config, to_yaml
    from trainer.data.loader import read_spec
    from umask.spec import SPEC_DIR
    from umask.model import UMask

    run = tmp_path_factory.mktemp("built-runs") / "built"
    folder = run / "checkpoint_000000"
    cfg = load_config([str(CONFIGS / "tiny.yaml")], [
        f"data.source={tiny_dataset / 'raw'}", f"data.features={tiny_dataset / 'features'}",
        f"ray.storage_path={run.parent}", "ray.name=built"])
    torch.manual_seed(3)
    model = UMask(cfg.model, read_spec(tiny_dataset / "features"), pooled_dim(cfg.embeddings))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tables = ShardedTables(cfg.embeddings, dist.group.WORLD, torch.device("cpu"))
        save_sharded(tables, folder / "tables")
        weights = {}
        for key, value in tables.dmp.state_dict().items():
            shards = value.local_shards() if hasattr(value, "local_shards") else None
            weights[key.split(".")[1]] = (shards[0].tensor if shards else value).detach().clone()
    finally:
        dist.destroy_process_group()
    dense = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(dense, str(folder / "dense.safetensors"))
    (folder / "config.yaml").write_text(to_yaml(cfg))
    shutil.copytree(tiny_dataset / "features" / SPEC_DIR, folder / SPEC_DIR)
    write_state(folder, step=7, world_size=1, run_name="built")
    write_manifest(folder, rank=0, run_name="built")
    return run, folder, {"dense": dense, "tables": weights}


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, tiny_dataset, embedded_ray):
    """The tiny preset trained 8 steps by 2 Ray workers without interruption, logging every step
    and checkpointing every 4: the reference the resume and fault tests compare against.
    Returns its run folder."""
    from trainer.config import load_config
    from trainer.training.launch import train

    storage = tmp_path_factory.mktemp("straight-runs")
    result = train(load_config([str(CONFIGS / "tiny.yaml")], [
        f"data.source={tiny_dataset / 'raw'}", f"data.features={tiny_dataset / 'features'}",
        f"ray.storage_path={storage}", "ray.name=straight", *STRAIGHT]))
    assert result.error is None
    return storage / "straight"


STRAIGHT = ("train.steps=8", "train.log_every=1", "train.checkpoint_every=4")


@pytest.fixture
def straight_overrides() -> tuple[str, ...]:
    """straight_run's train.* overrides, for modules that must not `import conftest` (a spawned
    rank unpickling their functions may find another tests/*/conftest.py first)."""
    return STRAIGHT
