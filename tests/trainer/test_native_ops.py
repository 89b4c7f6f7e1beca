"""A worker builds no C++ at run time, so a stale build lock cannot hang a run (issue 13, item 10).

Before: DeepSpeed JIT-compiled its CPU comm op (deepspeed_shm_comm) under the torch extensions
folder at every worker start, guarded by a `lock` file that torch waits on forever; a run
killed mid-build left the lock, and every later run hung at worker start. Here a real Trainer
(one gloo rank, a real DeepSpeed engine) starts with such a stale lock in its extensions folder.
"""
from pathlib import Path

import pytest

from gloo_ranks import run_ranks, values

pytestmark = pytest.mark.slow


def _start_with_stale_lock(rank: int, cfg, run_dir: str) -> dict:
    import deepspeed.comm as ds_comm
    from torch.utils.cpp_extension import _get_build_directory

    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder

    import trainer.training.loop as loop
    from umask.errors import UserError

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")  # what a build killed halfway leaves behind

    class Local(loop.Trainer):
        def restore(self) -> None:
            pass

        def save(self, metrics) -> None:
            pass

    trainer = Local(cfg, Path(run_dir))
    loss = float(trainer.train_step().values["loss"])
    try:  # any other op DeepSpeed would compile here is refused, naming it, before any lock
        CPUAdamBuilder().jit_load()
        refused = None
    except UserError as err:
        refused = str(err)
    return {"loss": loss, "shm_op": ds_comm.comm.cdb.shm_comm_op, "lock_left": lock.exists(),
            "built": sorted(p.name for p in lock.parent.iterdir() if p.name != "lock"), "refused": refused}


def test_a_stale_build_lock_does_not_stop_a_worker(tiny_config, tmp_path):
    cfg = tiny_config("ray.name=lock", "ray.num_workers=1")
    extensions = tmp_path / "torch_extensions"
    out = values(run_ranks(_start_with_stale_lock, 1, cfg, str(tmp_path / "runs" / "lock"),
                           env={"TORCH_EXTENSIONS_DIR": str(extensions)}, wait_s=600))[0]
    assert out["loss"] > 0
    assert out["shm_op"] is None  # DeepSpeed's comm backend runs without the shm op
    assert out["lock_left"] and out["built"] == []  # nobody took the lock or compiled anything
    assert out["refused"] and "'cpu_adam'" in out["refused"] and "install time" in out["refused"]
