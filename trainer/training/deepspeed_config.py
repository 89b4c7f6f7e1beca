"""Builds the DeepSpeed config dict from ours, so the YAML stays the one source of truth.

The dense model (the U-MASK DiT and U-SCOPE) is owned by DeepSpeed; the embedding tables are
not (TorchRec shards them and steps them with fused optimizers).
"""
from __future__ import annotations

from trainer.config import DeepSpeedConfig


def resolve_precision(cfg: DeepSpeedConfig, use_gpu: bool) -> str:
    """auto means bf16 on GPU and fp32 on CPU (the CPU engine has no fused low-precision Adam)."""
    if cfg.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return cfg.precision


def trainer_clips(cfg: DeepSpeedConfig, use_gpu: bool) -> bool:
    """Whether the trainer clips the dense gradients itself, with DeepSpeed's clipping off.

    Only where DeepSpeed steps a bare torch optimizer (fp32 without ZeRO): there its clip is a
    Python loop of per-parameter norms and an all-reduce of a norm every rank already holds
    (deepspeed/runtime/utils.py: clip_grad_norm_, averaged for MoE), while the trainer has the
    norm already (its grad_norm metric) and clips with torch's clip_grads_with_norm_: the same
    coefficient, min(1, max_norm / (norm + 1e-6)). Under ZeRO or bf16/fp16 the gradients live in
    DeepSpeed's partitions and flat buffers, so DeepSpeed clips them.
    """
    return resolve_precision(cfg, use_gpu) == "fp32" and cfg.zero_stage == 0 and cfg.gradient_clipping > 0


def deepspeed_config(cfg: DeepSpeedConfig, micro_batch_size: int, use_gpu: bool) -> dict:
    precision = resolve_precision(cfg, use_gpu)
    low_precision = {"data_types": {
        # DeepSpeed 0.19 casts only the parameters to bf16/fp16 and keeps float32 buffers, but the
        # model casts its inputs to its buffers' dtype (umask/model.py: _model_inputs), so they
        # then met bf16 weights as float32 ("mat1 and mat2 must have the same dtype")
        "buffer_dtype": precision}} if precision in ("bf16", "fp16") else {}
    return {
        **low_precision,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": 0.0 if trainer_clips(cfg, use_gpu) else cfg.gradient_clipping,
        "optimizer": {
            "type": "AdamW",
            # torch_adam on every device: DeepSpeed's own Adams (CPU Adam, FusedAdam on GPU) are
            # C++ built at run time on the worker (trainer/training/native_ops.py); torch's is not.
            # fused: torch's one-kernel-per-tensor AdamW (CPU and CUDA, shipped with torch), where
            # the default on CPU is a Python loop of ~10 ops per tensor: 3.4 against 14.9 ms a step
            # for the bench's base_like model (5.2 M weights, 69 tensors) on one core here.
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True, "fused": True},
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        # check_grad_overflow: a bf16 step with non-finite gradients is skipped, as fp16's is.
        # DeepSpeed 0.19's default, spelled out because trainer/training/guard.py relies on it.
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # our own progress line reports; DeepSpeed's would duplicate it
        "wall_clock_breakdown": False,
    }
