"""Kernel tests run the Triton kernels under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before umask.kernels.triton_attention is imported (Triton
picks its driver then), so it is set here, before any test module loads. On a machine
with CUDA it is left alone: the `gpu` tests then run the compiled kernels and the
interpreter tests skip.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
