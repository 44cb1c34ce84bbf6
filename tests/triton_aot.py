"""Compile the Triton kernels for real GPU targets on a machine without a GPU (ahead of time).

The interpreter lane checks the kernels' arithmetic, but never the GPU compiler: type errors in
loop-carried values, non-constexpr globals and layout problems only show when compiling for a
target. Triton's bundled ptxas compiles for sm_80/sm_90 without a device, so CI can catch them.

Run as a script (the test runs it in a subprocess, because TRITON_INTERPRET=1 must be off when the
kernels are decorated): prints one JSON line per compiled variant with the PTX features found
(cp.async / 16-byte loads, mma / wgmma) and ptxas' register, stack and spill figures.
"""

import collections
import json
import os
import re
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from cuda_tools import cuobjdump  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from earlyexit.triton_kernels.exit_check import exit_check_config, exit_check_kernel  # noqa: E402

_PTR = {
    "THR": "fp32",
    "TOKEN": "i64",
    "EXIT": "i1",
    "CONF": "fp32",
    "MAXP": "fp32",
    "MARGIN": "fp32",
    "ENTROPY": "fp32",
    "LSE": "fp32",
    "S_MAX": "fp32",
    "S_ARG": "i64",
    "S_SECOND": "fp32",
    "S_SUM": "fp32",
    "S_SUMZ": "fp32",
    "S_INVALID": "i1",
    "PART_F": "fp32",
    "PART_I": "i32",
    "COUNTER": "i32",
}
_FLOAT_ARGS = ("eps", "temperature", "norm_offset", "softcap")
# What the JIT specializes at run time for a real head (d, V, strides multiples of 16; torch's
# allocations are 256-byte aligned): compile with the same facts so the PTX matches a real launch.
_DIVISIBLE = set(_PTR) | {"H", "W", "BIAS", "NORM_W", "D", "V", "stride_h", "stride_w"}


def compile_exit_check(dtype, n_rows, arch, d=4096, v=128256, **variant):
    """The exit-check kernel compiled for ``arch``; ``variant`` overrides constexprs (head variants)."""
    import torch

    tdtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype])
    cfg = exit_check_config(n_rows, d, v, tdtype, torch.device("cpu"), interpret=False)
    constexprs = dict(
        STATISTIC=0,
        EXIT_ABOVE=True,
        STATS_ONLY=False,
        HAS_NORM=True,
        HAS_BIAS=True,
        HAS_SOFTCAP=False,
        UPCAST_DOT=False,
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_D=cfg["BLOCK_D"],
        # The widest merge tile a GPU launch uses (over 64 splits at decode sizes): it must not spill either.
        MERGE_BLOCK=64,
    )
    constexprs.update(variant)
    names = exit_check_kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _PTR:
            signature[name] = "*" + _PTR[name]
        elif name in ("H", "W", "BIAS", "NORM_W"):
            signature[name] = "*" + dtype
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in _DIVISIBLE}
    src = ASTSource(fn=exit_check_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
    )
    return kernel, cfg


def instructions(ptx):
    """PTX instructions with their predicate stripped (masked accesses read "@%p3 ld.global...")."""
    return [re.sub(r"^@!?%p\d+\s+", "", ln.strip()) for ln in ptx.splitlines()]


def global_accesses(ptx):
    """Count of each global load/store instruction ("ld.global.v4.b32": 8, ...), predicated ones included."""
    ops = (ins.split(" ")[0] for ins in instructions(ptx))
    return collections.Counter(op for op in ops if op.startswith(("ld.global", "st.global")))


def ptx_features(ptx):
    lines = instructions(ptx)
    loads = global_accesses(ptx)
    return {
        "cp_async_16": sum(1 for ln in lines if ln.startswith("cp.async.cg") and ", 0x10" in ln),
        "ld_v4": sum(n for op, n in loads.items() if op.startswith("ld.global") and ".v4" in op),
        "ld_b16": sum(n for op, n in loads.items() if op.startswith("ld.global") and op.endswith(".b16")),
        "mma": sum(1 for ln in lines if ln.startswith("mma.sync")),
        "wgmma": sum(1 for ln in lines if ln.startswith("wgmma.mma_async")),
    }


def resource_usage(kernel):
    """Registers, stack and spill bytes from cuobjdump on the cubin (None if cuobjdump is missing)."""
    tool = cuobjdump()
    if tool is None:
        return None
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


#: (dtype, rows, arch) variants compiled by default: the decode path on Ampere and Hopper, the
#: wgmma-sized path, and float32.
QUICK = [("bf16", 1, 90), ("bf16", 64, 90), ("bf16", 1, 80), ("fp32", 32, 90)]
FULL = [(dt, n, arch) for arch in (80, 90) for dt in ("bf16", "fp16", "fp32") for n in (1, 32, 64, 1024)]
#: Head variants a GPU run compiles beside the default (max_prob, norm and bias, exit_check): each
#: constexpr branch once, at the decode size on Hopper in bf16 (and fp16 once), so that a GPU-compiler
#: error in a branch shows here rather than in the one GPU run.
VARIANTS = {
    "exit_stats": dict(STATS_ONLY=True),
    "softcap": dict(HAS_SOFTCAP=True),
    "margin": dict(STATISTIC=1),
    "entropy": dict(STATISTIC=2, EXIT_ABOVE=False),
    "no_norm_no_bias": dict(HAS_NORM=False, HAS_BIAS=False),
}
#: (dtype, variant name) pairs compiled: every variant in bf16, the softcap branch in fp16 too.
HEAD_VARIANTS = [("bf16", name) for name in VARIANTS] + [("fp16", "softcap")]


def _record(kernel, cfg, **fields):
    rec = dict(kernel="exit_check", **fields, **ptx_features(kernel.asm["ptx"]))
    rec.update(block_n=cfg["BLOCK_N"], shared=kernel.metadata.shared, usage=resource_usage(kernel))
    return rec


def main(argv):
    for dtype, n_rows, arch in FULL if "--full" in argv else QUICK:
        kernel, cfg = compile_exit_check(dtype, n_rows, arch)
        print(json.dumps(_record(kernel, cfg, arch=arch, dtype=dtype, n_rows=n_rows, variant="default")), flush=True)
    for dtype, name in HEAD_VARIANTS:
        kernel, cfg = compile_exit_check(dtype, 1, 90, **VARIANTS[name])
        print(json.dumps(_record(kernel, cfg, arch=90, dtype=dtype, n_rows=1, variant=name)), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
