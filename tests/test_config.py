"""Config composition, overrides and the errors users see for bad config."""
from pathlib import Path

import pytest

from trainer.config import ConfigError, RunConfig, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_preset_composes_base_and_model_size():
    cfg = load_config([str(CONFIGS / "tiny.yaml")])
    assert cfg.model.size == "tiny" and cfg.ray.num_workers == 2 and cfg.data.slots == 168


def test_command_line_overrides_win():
    cfg = load_config([str(CONFIGS / "tiny.yaml")], ["train.steps=7", "ray.use_gpu=true"])
    assert cfg.train.steps == 7 and cfg.ray.use_gpu is True


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  slotz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: data\.slotz: unknown key"):
        load_config([str(bad)])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"command line: train\.steps"):
        load_config([], ["train.steps=many"])


@pytest.mark.parametrize("override,key", [
    ("ray.num_workers=0", "ray.num_workers"),
    ("data.val_fraction=-0.1", "data.val_fraction"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("model.heads=3", "model.heads"),
    ("data.slot_seconds=10", "data.slot_seconds"),
    ("data.row_group_size=1000000", "data.row_group_size"),
])
def test_impossible_values_name_key_and_source(override, key):
    with pytest.raises(ConfigError, match=rf"{key}: .*\(set in the command line\)"):
        load_config([], [override])


def test_impossible_value_from_file_names_the_file(tmp_path):
    bad = tmp_path / "zero.yaml"
    bad.write_text("ray:\n  num_workers: 0\n")
    with pytest.raises(ConfigError, match=r"ray\.num_workers: .*zero\.yaml"):
        load_config([str(bad)])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config([str(CONFIGS / "tiny.yaml")], ["train.steps=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config([str(tmp_path / "config.yaml")]) == cfg


def test_defaults_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config([str(tmp_path / "a.yaml")])


def test_defaults_are_a_valid_config():
    assert load_config() == RunConfig()


@pytest.mark.parametrize("slot_seconds", [900, 1800, 3600, 7200, 86400])
def test_any_slot_length_that_divides_a_day_is_valid(slot_seconds):
    spec = load_config([], [f"data.slot_seconds={slot_seconds}"]).data.feature_spec()
    assert spec.slots_per_day * slot_seconds == 86400 and spec.slots_per_week == 7 * spec.slots_per_day


@pytest.mark.parametrize("slot_seconds", [1000, 5000, 100_000])
def test_a_slot_length_that_does_not_divide_a_day_is_refused(slot_seconds):
    with pytest.raises(ConfigError, match=r"data\.slot_seconds: must divide a day"):
        load_config([], [f"data.slot_seconds={slot_seconds}"])


def test_day_slots_is_no_key_any_more():
    # U-SCOPE's day is the feature spec's, so a second setting cannot disagree with the data
    with pytest.raises(ConfigError, match=r"model\.day_slots: unknown key"):
        load_config([], ["model.day_slots=24"])
