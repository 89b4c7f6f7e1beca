"""Ahead-of-time compile every shipped Triton specialization for a GPU, without a GPU.

    python -m umask.kernels.aot --arch 90 --arch 80 [--jobs 2]

prints one JSON line per specialization (kernel, arch, dtype, head dim, mode, tiles) with
its shared memory, registers, spill bytes and whether tensor-core instructions (wgmma on
sm_90, mma on sm_80) are in the PTX. Must run with TRITON_INTERPRET unset: under the
interpreter `@triton.jit` yields functions that cannot be compiled.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# shared memory per block the hardware grants (opt-in maximum), bytes
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
DTYPES = {"fp16": "fp16", "bf16": "bf16"}
_KERNELS = {"forward": "_forward_kernel", "dkdv": "_dkdv_kernel", "dq": "_dq_kernel"}
_INT32_POINTERS = {"KV_HI", "FIRST_TARGET", "VISITED"}
_FP32_POINTERS = {"KEY_BIAS", "LSE", "DELTA", "DKEY_BIAS"}


def specializations(arch: int) -> list[dict]:
    """Every (kernel, dtype, head dim, mode, tiles) a GPU of this architecture can launch."""
    from umask.kernels import triton_attention as ta
    generation = 9 if arch >= 90 else 8
    out = []
    for kernel, by_head_dim in ta.SHIPPED_CONFIGS[generation].items():
        # the backward kernels never see MODE_EVIDENCE_KEYS_SELF (self_key.py does that term)
        modes = [0, 1, 2, 3] if kernel == "forward" else [0, 2, 3]
        for head_dim, configs in by_head_dim.items():
            for config in configs:
                for dtype in DTYPES:
                    for mode in modes:
                        out.append(dict(kernel=kernel, arch=arch, dtype=dtype, head_dim=head_dim, mode=mode,
                                        tiles=list(config)))
    return out


def _signature(kernel, dtype: str) -> dict:
    signature = {}
    for name, is_constexpr in zip(kernel.arg_names, [p.is_constexpr for p in kernel.params]):
        if is_constexpr:
            signature[name] = "constexpr"
        elif name in ("N", "H"):
            signature[name] = "i32"
        elif name == "scale":
            signature[name] = "fp32"
        elif name == "EV":
            signature[name] = "*i8"
        elif name in _INT32_POINTERS:
            signature[name] = "*i32"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        else:
            signature[name] = "*" + DTYPES[dtype]
    return signature


def compile_one(spec: dict) -> dict:
    """Compile one specialization; the record gains shared, registers, spill_bytes, tensor_cores."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from umask.kernels import triton_attention as ta
    kernel = getattr(ta, _KERNELS[spec["kernel"]])
    block_m, block_n, num_warps, num_stages = spec["tiles"]
    source = ASTSource(fn=kernel, signature=_signature(kernel, spec["dtype"]), constexprs=dict(
        HEAD_DIM=spec["head_dim"], BLOCK_M=block_m, BLOCK_N=block_n, MODE=spec["mode"], UPCAST=False,
        COUNT_TILES=False, DOT_PRECISION="tf32"))
    compiled = triton.compile(source, target=GPUTarget("cuda", spec["arch"], 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    # a kernel with no calls has no stack frame of its own; stack or local bytes are spills
    spill_bytes = sum(int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    tensor_cores = "wgmma.mma_async" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else None)
    return dict(spec, shared=compiled.metadata.shared, registers=registers, spill_bytes=spill_bytes,
                tensor_cores=tensor_cores)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT), required=True)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    specs = [s for arch in args.arch for s in specializations(arch)]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for record in pool.map(compile_one, specs):
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
