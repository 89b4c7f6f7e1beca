"""Trainer fixtures: one embedded Ray for the session, and the tiny preset aimed at tmp folders.

Ray starts on loopback with exactly the CPUs the tests use; ray.shutdown() at the end ends the
processes this session started, and only those.
"""
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="session")
def embedded_ray():
    import ray

    ray.init(num_cpus=3, _node_ip_address="127.0.0.1", include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield
    ray.shutdown()


@pytest.fixture
def tiny_config(tmp_path, tiny_dataset):
    """tiny_config(*overrides): the tiny preset on the test dataset, runs under tmp_path/runs."""
    from trainer.config import load_config

    def make(*overrides: str):
        return load_config([str(CONFIGS / "tiny.yaml")], [
            f"data.source={tiny_dataset / 'raw'}", f"data.features={tiny_dataset / 'features'}",
            f"ray.storage_path={tmp_path / 'runs'}", *overrides])
    return make
