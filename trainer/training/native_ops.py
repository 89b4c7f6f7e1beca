"""No C++ is compiled on a worker at run time: DeepSpeed's JIT op builds are turned off.

DeepSpeed 0.19, installed with DS_BUILD_OPS=0 (cluster/install.sh), compiles some of its C++
ops with gcc the first time a process uses them, under ~/.cache/torch_extensions/, guarded by
an empty `lock` file that torch's FileBaton waits on with no time limit. A process killed while
it builds leaves that lock behind, and from then on every worker on the machine waits on it
forever at start. It also means every fresh node needs a compiler and pays the build.

Which ops a training worker would build, and what we do instead:
- `deepspeed_shm_comm` (CPU accelerator): built when DeepSpeed sets up its communication
  backend. It serves only `inference_all_reduce` (tensor-parallel inference); training's
  collectives go through torch.distributed (gloo) either way. Left out: DeepSpeed is told the
  op is not available here, so it builds nothing and takes no lock.
- `fused_adam` (GPU): the dense optimizer is torch's AdamW on every device instead
  (trainer/training/deepspeed_config.py: torch_adam), so it is never built.
Any other run-time build DeepSpeed would start is refused with a UserError naming the op,
before any lock is taken; build such an op at install time (DS_BUILD_<OP>=1) instead.
"""
from __future__ import annotations

from umask.errors import UserError

SHM_COMM_OP = "deepspeed_shm_comm"


def without_runtime_builds() -> None:
    """Makes this process's DeepSpeed use no run-time-built op; call before deepspeed.initialize."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder.builder import OpBuilder

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is not None:  # the CPU accelerator's
        # DeepSpeed caches its probe of the ops in the module so that edits to it persist
        # (deepspeed/ops/__init__.py); its comm backend builds the op only when this says it can
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    if getattr(OpBuilder.jit_load, "_refuses_builds", False):
        return

    def refuse(self, verbose: bool = True):
        raise UserError(
            f"DeepSpeed tried to compile its C++ op {self.name!r} on this worker at run time. "
            "This trainer compiles nothing on workers (a run killed during such a build leaves a "
            "lock file that hangs every later run): build the op at install time "
            f"({getattr(self, 'BUILD_VAR', 'DS_BUILD_<OP>')}=1 when installing deepspeed, see "
            "cluster/install.sh), or use settings that do not need it")

    refuse._refuses_builds = True
    OpBuilder.jit_load = refuse
