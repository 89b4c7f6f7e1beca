"""Where the libraries' logs go: a file per rank in the run folder, unless the user asks to see them.

A quiet run (the default) shows the user the driver's own lines only: progress, real warnings
and the closing lines. Everything a training worker process writes to stdout or stderr, ours
and the libraries' alike, goes to <run>/logs/rank-<r>.log instead (appended; each start writes
a header line). With `u-mask train --verbose` (or U_MASK_VERBOSE=1) nothing is redirected: Ray
forwards the workers' output to the terminal, with its `(RayTrainWorker pid=...)` prefixes.

Every line that used to reach the terminal of `make demo`, where it comes from, and what was
done about it (fixed where it is ours, kept out of the terminal where it is not):

- Ray Train's PlacementGroupCleaner "Failed to query Ray Train Controller actor state. State
  API may be temporarily unavailable", every second: OURS. The cleaner asks Ray's State API,
  which the dashboard process serves, and the embedded Ray was started without a dashboard, so
  it could never tell whether the controller was alive. FIXED: the embedded Ray starts with its
  dashboard, on 127.0.0.1 (launch.start_embedded_ray); starting it costs no measurable time.
- "core_worker.cc ... Actor with class name: 'PreemptionWatcher' ... has constructor arguments
  in the object store and max_restarts > 0" (an E line from the controller): NOT OURS. Ray
  Train's controller starts a node-preemption watcher with max_restarts=-1 and actor handles
  as arguments, and Ray core warns that a restart would fail if those arguments were lost.
  Harmless. An embedded Ray is one node that nobody drains, so there the watcher is switched
  off (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 in the job's runtime_env); on a cluster it stays
  on and the line stays in Ray's own logs (log_to_driver=False).
- Ray Train's INFO lines (requesting resources, worker group started, checkpoint created,
  reporting result): NOT OURS, informational. RunConfig(logging_config=LoggingConfig("WARNING"))
  keeps Ray Train's warnings and errors on the terminal.
- The driver's "Started a local Ray instance." (INFO) and "Token authentication is enabled for
  this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out" (WARNING): NOT OURS. ray.init's
  documented logging_level=WARNING drops the first; Ray warns about the second only when
  RAY_AUTH_MODE is unset, and the embedded Ray now sets it to token explicitly (the same
  protection as before, decided by us).
- fbgemm_gpu's "Successfully loaded: '<lib>.so'" (14 per worker: logging.info on the root
  logger at import) and the TBE dumps "[TBE=...] SplitTableBatchedEmbeddingBagsCodegen
  Arguments: {...}" (fbgemm's own INFO logs when TorchRec builds a table): NOT OURS -> this file.
- "is_fx_tracing will return true for both fx.symbolic_trace and torch.export" (W, rank
  prefixed): NOT OURS; torch.fx warns whenever torchrec's modules call its deprecated
  is_fx_tracing() -> this file.
- "torch.distributed.nn.functional.all_gather is deprecated" (FutureWarning at loop.py):
  OURS, FIXED: loop.py gathers the InfoNCE negatives with the functional collectives'
  all_gather_tensor_autograd, which torch recommends.
- "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully": DeepSpeed's CPU
  communication backend JIT-built its shared-memory op and print()ed this at every engine
  start. Gone at its cause: trainer/training/native_ops.py leaves the op out (training never
  uses it), so no worker compiles anything; any other DeepSpeed print goes to this file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

VERBOSE_ENV = "U_MASK_VERBOSE"  # 1: show the libraries' logs (the same as --verbose)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_library_warnings() -> None:
    """Drops, in this process, the library warnings listed above that are not ours and say
    nothing to the user (eval and complete run TorchRec in the command's own process)."""
    logging.getLogger("torch.fx._symbolic_trace").addFilter(
        _DropMessage("is_fx_tracing will return true for both"))


def verbose_from_env() -> bool:
    """Whether U_MASK_VERBOSE asks for the libraries' logs (1, true, yes, on)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def rank_log(run_dir: Path, rank: int) -> Path:
    """<run>/logs/rank-<rank>.log: where rank `rank` writes what its libraries print."""
    return Path(run_dir) / "logs" / f"rank-{rank}.log"


@contextlib.contextmanager
def process_output_to(path: Path):
    """Sends this process's stdout and stderr (file descriptors 1 and 2, so C++ and Python
    writers alike) to `path`, appended, until the block ends; then restores them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(target, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n".encode())
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (target, *saved):
            os.close(fd)
