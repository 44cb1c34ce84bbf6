"""Compile the Triton compaction kernels for sm_80/sm_90 without a GPU (see triton_aot.py).

Run as a script (TRITON_INTERPRET must be off when the kernels are decorated): prints one JSON line
per compiled variant with the PTX features found (16-byte loads and stores) and ptxas' usage.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # read when the kernels are decorated, at their import below

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton_aot import global_accesses, resource_usage  # noqa: E402

from earlyexit.triton_kernels.compaction import block_config, compaction_kernel, scatter_rows_kernel  # noqa: E402

# The decode batch of the benchmark: hidden bf16 [N, 4096] plus two int64 [N], as 4-byte words. The
# JIT specializes pointers and integers that are multiples of 16 (torch allocations are 256-byte
# aligned; a 4096-wide row is 2048 words): compile with the same facts so the PTX matches a launch.
_WORD = "i32"
_TENSORS = 3


def _compile(kernel, signature, constexprs, divisible, arch, num_warps):
    names = kernel.arg_names
    attrs = {}
    for path in divisible:
        attrs[(names.index(path[0]), *path[1:])] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))


def compile_compaction(partition, arch):
    cfg = block_config(interpret=False)
    constexprs = dict(
        NUM_TENSORS=_TENSORS,
        PARTITION=partition,
        BLOCK_ROWS=cfg["BLOCK_ROWS"],
        BLOCK_WORDS=cfg["BLOCK_WORDS"],
        SCAN_BLOCK=cfg["SCAN_BLOCK"],
    )
    words = tuple(["*" + _WORD] * _TENSORS)
    ints = tuple(["i32"] * _TENSORS)
    signature = dict(
        KEEP="*u8",
        INDEX="*i64",
        COUNT="*i64",
        SRCS=words,
        DSTS=words,
        SRC_STRIDES=ints,
        DST_STRIDES=ints,
        WORDS=ints,
        N="i32",
        rows_per_program="i32",
        n_col_programs="i32",
        **{k: "constexpr" for k in constexprs},
    )
    # The hidden tensor (element 0) has 16-divisible pointers, strides and width; the int64 ones do not.
    divisible = [("KEEP",), ("INDEX",), ("SRCS", 0), ("DSTS", 0), ("SRC_STRIDES", 0), ("DST_STRIDES", 0), ("WORDS", 0)]
    return _compile(compaction_kernel, signature, constexprs, divisible, arch, cfg["num_warps"])


def compile_scatter(arch):
    cfg = block_config(interpret=False)
    constexprs = dict(BLOCK_ROWS=cfg["BLOCK_ROWS"], BLOCK_WORDS=cfg["BLOCK_WORDS"])
    signature = dict(
        DEST="*" + _WORD,
        INDEX="*i64",
        SRC="*" + _WORD,
        K="i32",
        M="i32",
        W="i32",
        dest_stride="i32",
        src_stride="i32",
        rows_per_program="i32",
        n_col_programs="i32",
        **{k: "constexpr" for k in constexprs},
    )
    divisible = [("DEST",), ("INDEX",), ("SRC",), ("W",), ("dest_stride",), ("src_stride",)]
    return _compile(scatter_rows_kernel, signature, constexprs, divisible, arch, cfg["num_warps"])


def main(argv):
    for arch in (80, 90):
        variants = [("compact", compile_compaction(False, arch)), ("partition", compile_compaction(True, arch))]
        variants.append(("scatter", compile_scatter(arch)))
        for name, kernel in variants:
            rec = dict(kernel=name, arch=arch, accesses=global_accesses(kernel.asm["ptx"]))
            rec.update(usage=resource_usage(kernel))
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
