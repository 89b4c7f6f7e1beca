"""Training: the Ray driver (launch), the per-worker loop with DeepSpeed and TorchRec, checkpoints."""
