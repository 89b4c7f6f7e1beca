"""Test-wide settings and fixtures: GPU tests skip (visibly) without CUDA; a tiny featurized dataset.

Without CUDA the Triton kernels run under Triton's interpreter. TRITON_INTERPRET must be set
before any module with @triton.jit is imported (Triton picks its driver then), and many test
modules import umask.model, which imports the kernels: so it is set here, in the first
conftest pytest loads. With CUDA it is left alone and the `gpu` tests run compiled kernels.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 2-week synthetic dataset of 240 users, featurized with configs/tiny.yaml.

    Returns the folder holding raw/ (the contract) and features/ (the examples).
    """
    from trainer.config import load_config
    from trainer.data.featurize import featurize
    from trainer.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny-data")
    synthesize(root / "raw", users=240, days=14, seed=0)
    featurize(load_config([str(CONFIGS / "tiny.yaml")],
                          [f"data.source={root / 'raw'}", f"data.features={root / 'features'}"]))
    return root
