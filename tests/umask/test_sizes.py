"""The named sizes in configs/model/: they load, validate, and have the parameter counts we state."""
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, load_config
from umask.config import ATTENTION_MODES, ModelConfig
from umask.kernels import MODES
from umask.model import UMask

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "model"


@pytest.mark.parametrize("size, low, high", [("tiny", 1e5, 1e6), ("base", 1.2e8, 1.4e8), ("xl", 6.5e8, 7.0e8)])
def test_presets_load_and_count_parameters_without_allocating(size, low, high):
    cfg = load_config([str(PRESETS / f"{size}.yaml")])
    assert cfg.model.size == size
    with torch.device("meta"):
        model = UMask(cfg.model, cfg.data.feature_spec(), sparse_dim=32)
    counts = model.param_count()
    assert low < counts["total"] < high, counts


def test_model_config_rejects_impossible_values():
    problems = dict(ModelConfig(hidden=72, heads=3, attention="dense", mlp_ratio=0).problems())
    assert "power of two" in problems["heads"]
    assert "evidence_keys" in problems["attention"]
    assert problems["mlp_ratio"] == "must be positive"
    assert "divide" in dict(ModelConfig(hidden=64, heads=5).problems())["heads"]


def test_nested_mask_settings_are_checked_with_their_key():
    with pytest.raises(ConfigError) as err:
        load_config([str(PRESETS / "tiny.yaml")], ["model.mask.long.target_min=80",
                                                   "model.mask.temperature=0",
                                                   "model.diffusion.sample_steps=500"])
    message = str(err.value)
    assert "model.mask.long.target_min: must satisfy 1 <= target_min <= target_max" in message
    assert "model.mask.temperature: must be positive" in message
    assert "model.diffusion.sample_steps: must be in [1, train_steps=200]" in message


def test_config_offers_exactly_the_kernels_attention_modes():
    # umask/config.py stays torch-free for the Ray driver, so it lists the modes itself.
    assert ATTENTION_MODES == MODES


@pytest.mark.parametrize("size", ["tiny", "base", "xl"])
def test_the_top_level_preset_named_after_a_size_trains_that_size(size):
    """configs/<size>.yaml is what a user passes to pick a model size (configs/common.yaml is
    what they all start from, not a size)."""
    cfg = load_config([str(PRESETS.parent / f"{size}.yaml")])
    assert cfg.model.size == size
    assert cfg.model == load_config([str(PRESETS / f"{size}.yaml")]).model
