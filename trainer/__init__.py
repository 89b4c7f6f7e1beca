"""Orchestration: the u-mask CLI, configs, data, the Ray driver and worker loop, checkpoints, eval."""
