"""Keeps a worker's freed memory in its heap between steps (glibc malloc), instead of handing it
back to the kernel and faulting it in again on the next step.

glibc returns the free top of the heap to the kernel once it exceeds a trim threshold, and
serves allocations above a dynamic mmap threshold with fresh mappings; both thresholds move
with the process's history. A training step allocates and frees the same activations and
gradients every step, so in our worker alone glibc settled on giving them back each time:
29,016 minor page faults per base_like step on one worker (about 113 MB of pages zeroed and
mapped again), against 235 for the DDP peer in a process of its own, and about 90 each when
both ran in one process; that was the gap left between the two on one worker
(docs/training.md). Fixed thresholds end it: 263 faults per step.

- M_MMAP_THRESHOLD 32 MiB (glibc's largest): blocks below it come from the heap and are reused;
  larger ones (none in a step of the bench's models) are still mapped per allocation.
- M_TRIM_THRESHOLD 1 GiB: the heap keeps up to 1 GiB of free memory at its top. A worker's
  resident memory then stays at its per-step peak between steps instead of dropping below it;
  the peak itself (peak_rss_gb in metrics.csv) is unchanged.
Setting either also turns off glibc's dynamic adjustment (mallopt(3)).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 1 << 30
MMAP_THRESHOLD_BYTES = 32 << 20


def keep_freed_memory() -> bool:
    """Sets the two thresholds for this process; True where it could (glibc), False elsewhere
    (macOS, musl), where the allocator keeps its own defaults."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return (libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
            and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)
