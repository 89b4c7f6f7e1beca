"""Every shipped Triton specialization compiles for sm_90 and sm_80 without a GPU, fits in
shared memory, keeps to registers (no spills) and uses tensor cores."""
import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from umask.kernels.aot import SHARED_MEMORY_LIMIT, specializations  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    # a child process: this session runs under TRITON_INTERPRET=1, whose kernels cannot compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.Popen([sys.executable, "-m", "umask.kernels.aot", "--arch", "90", "--arch", "80", "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)  # about 50 s cold on 2 idle cores
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.mark.slow
def test_every_shipped_specialization_compiles(compiled):
    assert len(compiled) == len(specializations(90)) + len(specializations(80))
    assert {r["kernel"] for r in compiled} == {"forward", "dkdv", "dq"}
    assert {(r["head_dim"], r["dtype"]) for r in compiled} == {(64, "fp16"), (64, "bf16"), (128, "fp16"),
                                                                (128, "bf16")}


@pytest.mark.slow
def test_shared_memory_registers_and_tensor_cores(compiled):
    for record in compiled:
        assert record["shared"] <= SHARED_MEMORY_LIMIT[record["arch"]], record
        assert record["spill_bytes"] == 0, record
        assert record["registers"] <= 255, record
        assert record["tensor_cores"] is not None, record
        if record["arch"] == 90 and record["kernel"] == "forward":
            assert record["tensor_cores"] == "wgmma.mma_async", record  # Hopper's warpgroup MMA
