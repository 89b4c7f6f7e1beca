"""Kernel tests run the Triton kernels under the interpreter unless a GPU test asks otherwise.

TRITON_INTERPRET must be set before umask.kernels.triton_attention is imported (the
launcher picks its driver at import), so it is set here, before any test module loads.
`pytest -m gpu` on a GPU machine sets UMASK_TRITON_ON_GPU=1 to run the compiled kernels.
"""
import os

if os.environ.get("UMASK_TRITON_ON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
