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
