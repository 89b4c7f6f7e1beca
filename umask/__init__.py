"""The U-MASK method in plain PyTorch: U-SCOPE, masks, DiT, diffusion, losses, metrics, kernels.

Imports torch only: no Ray, no DeepSpeed, no TorchRec sharding, no process groups.
"""
