"""Compile the Triton merge of gathered exit statistics for sm_80/sm_90 without a GPU (see triton_aot.py).

Run as a script (TRITON_INTERPRET must be off when the kernel is decorated): prints one JSON line per
compiled variant (world size, statistics or decision with each measure) with ptxas' usage.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # read when the kernels are decorated, at their import below

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton_aot import resource_usage  # noqa: E402

from earlyexit.triton_kernels.merge_stats import merge_config, merge_gathered_kernel  # noqa: E402

_PTR = dict(
    WORDS="i32",
    MAXL="fp32",
    ARGMAX="i64",
    SECOND="fp32",
    SUMEXP="fp32",
    SUMEXPZ="fp32",
    INVALID="i1",
    THR="fp32",
    TOKEN="i64",
    EXIT="i1",
    CONF="fp32",
    MAXP="fp32",
    MARGIN="fp32",
    ENTROPY="fp32",
    LSE="fp32",
)
#: (world size, FINALIZE, STATISTIC, EXIT_ABOVE): TP = 2 and 8, the statistics and each measure's decision.
VARIANTS = [(w, False, 0, True) for w in (2, 8)] + [(w, True, s, s != 2) for w in (2, 8) for s in (0, 1, 2)]


def compile_merge(world, finalize, statistic, exit_above, arch):
    w_block, block_n = merge_config(world)
    constexprs = dict(FINALIZE=finalize, STATISTIC=statistic, EXIT_ABOVE=exit_above, W_BLOCK=w_block, BLOCK_N=block_n)
    signature = {k: "*" + t for k, t in _PTR.items()}
    signature.update(W="i32", N="i32", **dict.fromkeys(constexprs, "constexpr"))
    src = ASTSource(fn=merge_gathered_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))


def main(argv):
    for arch in (80, 90):
        for world, finalize, statistic, exit_above in VARIANTS:
            kernel = compile_merge(world, finalize, statistic, exit_above, arch)
            rec = dict(kernel="merge_gathered", arch=arch, world=world, finalize=finalize, statistic=statistic)
            rec.update(usage=resource_usage(kernel))
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
