"""Compile the Triton state-similarity kernel for sm_80/sm_90 without a GPU (see triton_aot.py).

Run as a script (TRITON_INTERPRET must be off when the kernel is decorated): prints one JSON line per
compiled variant with its global accesses (16-byte loads expected for hidden-size rows) and ptxas'
usage. The variants are the launch configurations of decode batches at d = 4096 and d = 576.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # read when the kernels are decorated, at their import below

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton_aot import global_accesses, resource_usage  # noqa: E402

from earlyexit.triton_kernels.state_similarity import state_similarity_config, state_similarity_kernel  # noqa: E402

_DTYPES = ("bf16", "fp16", "fp32")
#: (n rows, d): a decode batch at a large and a small hidden size.
_SHAPES = ((64, 4096), (8, 576))


def compile_state_similarity(dtype, n, d, arch):
    cfg = state_similarity_config(n, d, interpret=False)
    constexprs = dict(BF16_BITS=False, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"])
    signature = dict(
        H="*" + dtype,
        P="*" + dtype,
        OUT="*fp32",
        N="i32",
        D="i32",
        stride_h="i32",
        stride_p="i32",
        **dict.fromkeys(constexprs, "constexpr"),
    )
    # What the JIT specializes for torch allocations of hidden-size rows: 16-divisible pointers, d, strides.
    names = state_similarity_kernel.arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in ("H", "P", "OUT", "D", "stride_h", "stride_p")}
    src = ASTSource(fn=state_similarity_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=cfg["num_warps"]))
    return kernel, cfg


def main(argv):
    for arch in (80, 90):
        for dtype in _DTYPES:
            for n, d in _SHAPES:
                kernel, cfg = compile_state_similarity(dtype, n, d, arch)
                rec = dict(kernel="state_similarity", arch=arch, dtype=dtype, n=n, d=d, block_d=cfg["BLOCK_D"])
                rec.update(accesses=global_accesses(kernel.asm["ptx"]), usage=resource_usage(kernel))
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
