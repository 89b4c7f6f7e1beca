"""The DeepSpeed config we generate: the CPU proof of the GPU settings (bf16, fused Adam)."""
import pytest

from trainer.config import DeepSpeedConfig
from trainer.training.deepspeed_config import deepspeed_config


def test_auto_precision_is_bf16_on_gpu_and_fp32_on_cpu():
    gpu = deepspeed_config(DeepSpeedConfig(), micro_batch_size=8, use_gpu=True)
    cpu = deepspeed_config(DeepSpeedConfig(), micro_batch_size=8, use_gpu=False)
    assert gpu["bf16"]["enabled"] and not gpu["fp16"]["enabled"]
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    # torch's AdamW everywhere: DeepSpeed's CPU Adam and FusedAdam are C++ built at run time
    assert cpu["optimizer"]["params"]["torch_adam"] and gpu["optimizer"]["params"]["torch_adam"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_our_keys_reach_deepspeed(stage):
    cfg = DeepSpeedConfig(zero_stage=stage, lr=3e-4, weight_decay=0.1, gradient_clipping=0.5,
                          gradient_accumulation_steps=4, precision="fp16")
    out = deepspeed_config(cfg, micro_batch_size=16, use_gpu=True)
    assert out["zero_optimization"]["stage"] == stage
    assert out["train_micro_batch_size_per_gpu"] == 16 and out["gradient_accumulation_steps"] == 4
    assert out["gradient_clipping"] == 0.5 and out["fp16"]["enabled"] and not out["bf16"]["enabled"]
    assert out["optimizer"]["params"]["lr"] == 3e-4 and out["optimizer"]["params"]["weight_decay"] == 0.1


def test_fp16_is_refused_where_deepspeed_cannot_train_it():
    from trainer.config import ConfigError, load_config

    # CPU workers: DeepSpeed's CPU engine refuses fp16 on CPUs without AVX512-FP16/AMX
    with pytest.raises(ConfigError, match=r"deepspeed\.precision: fp16 needs GPU workers .*command line"):
        load_config([], ["deepspeed.precision=fp16", "deepspeed.zero_stage=2"])
    # without ZeRO DeepSpeed 0.19 never scales the fp16 loss but still divides by the scale
    with pytest.raises(ConfigError, match=r"deepspeed\.precision: fp16 needs deepspeed\.zero_stage 1, 2 or 3"):
        load_config([], ["deepspeed.precision=fp16", "ray.use_gpu=true"])
    assert load_config([], ["deepspeed.precision=fp16", "deepspeed.zero_stage=2", "ray.use_gpu=true"])


def test_low_precision_buffers_follow_the_weights():
    """DeepSpeed 0.19 keeps float32 buffers under bf16/fp16 unless told; the model casts its
    inputs to its buffers' dtype, so they must be cast with the weights."""
    bf16 = deepspeed_config(DeepSpeedConfig(precision="bf16"), 8, use_gpu=False)
    assert bf16["data_types"]["buffer_dtype"] == "bf16" and bf16["bf16"]["check_grad_overflow"]
    assert "data_types" not in deepspeed_config(DeepSpeedConfig(precision="fp32"), 8, use_gpu=False)


@pytest.mark.parametrize("stage, precision, trainer_clips_it", [
    (0, "fp32", True), (1, "fp32", False), (0, "bf16", False), (2, "bf16", False)])
def test_the_trainer_clips_where_deepspeed_steps_a_bare_torch_optimizer(stage, precision, trainer_clips_it):
    """fp32 without ZeRO: DeepSpeed's clipping is off and the trainer clips with the norm it logs
    (trainer/training/loop.py); elsewhere DeepSpeed clips its own partitions."""
    from trainer.training.deepspeed_config import trainer_clips

    cfg = DeepSpeedConfig(zero_stage=stage, precision=precision, gradient_clipping=0.5)
    assert trainer_clips(cfg, use_gpu=False) is trainer_clips_it
    assert deepspeed_config(cfg, 8, use_gpu=False)["gradient_clipping"] == (0.0 if trainer_clips_it else 0.5)
    # no clipping asked for: nobody clips
    assert not trainer_clips(DeepSpeedConfig(zero_stage=stage, precision=precision, gradient_clipping=0.0), False)


def test_adamw_is_torchs_fused_kernel():
    """One kernel per tensor instead of torch's per-op loop on CPU (docs/training.md)."""
    params = deepspeed_config(DeepSpeedConfig(), 8, use_gpu=False)["optimizer"]["params"]
    assert params["torch_adam"] and params["fused"]
