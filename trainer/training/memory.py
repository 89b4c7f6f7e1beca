"""Peak memory of this process: the workers put it into metrics.csv, the driver into its summary.

Peak resident memory is the kernel's high-water mark of the process (getrusage ru_maxrss:
KiB on Linux, bytes on macOS), so it counts everything the process ever held at once,
the shard of the tables, the dense model, the loader's buffers and any transient copy,
and not what other processes (Ray's, the other ranks) hold.
"""
import resource
import sys

GIB = 2**30


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_device_bytes() -> int:
    """The peak of GPU memory torch allocated on this process's current device, in bytes;
    0 without CUDA."""
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0
