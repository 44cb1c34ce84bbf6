"""Ragged batch compaction in Triton: scan of the keep mask plus the row gather of every tensor, one launch.

Tensors arrive as [rows, W] word views (earlyexit.ops.rows): the kernels move machine words, so one
compiled kernel serves every dtype and trailing shape, and all the tensors of a call move in the
same launch (they are passed as tuples; the tensor loop is unrolled at compile time).

Grid: (row programs, column programs). Row program p owns a contiguous range of rows; column
program c moves word chunks c, c + C, c + 2C, ... of every row, so that a decode batch of a few
hundred long rows (hidden d = 4096) still spreads over all the multiprocessors.

The scan needs no inter-program communication: each program counts the kept rows before its range
(and, for a partition, in total) by reading the keep mask itself. That costs N bytes per program
from L2, O(N * programs) in all; the grid is capped at a few programs per multiprocessor, so at
N = 65536 rows of 8 KiB it is ~35 MB of L2 reads next to 1 GiB of row traffic, and in exchange the
kernel needs no workspace, no atomics, no zeroed counters and no second launch: it is trivially
CUDA-graph capturable and deterministic.

Bytes per call: compact reads K rows and writes K rows (+ 8 K for the index); partition reads and
writes N rows (+ 8 N for perm); scatter reads K rows and writes K rows (+ 8 K index reads).
"""

import triton
import triton.language as tl

from earlyexit.triton_kernels.device import on_device, sm_count


@triton.jit
def _copy_rows(
    SRC, DST, src_rows, dst_rows, move, src_stride, dst_stride, W, pid_c, n_col_programs, BLOCK_WORDS: tl.constexpr
):
    """Copy words [0, W) of rows src_rows -> dst_rows where move; this column program's chunks only."""
    src_base = SRC + src_rows[:, None] * src_stride
    dst_base = DST + dst_rows[:, None] * dst_stride
    for c0 in range(pid_c * BLOCK_WORDS, W, n_col_programs * BLOCK_WORDS):
        cols = c0 + tl.arange(0, BLOCK_WORDS)
        m = move[:, None] & (cols < W)[None, :]
        v = tl.load(src_base + cols[None, :], mask=m)
        tl.store(dst_base + cols[None, :], v, mask=m)


@triton.jit
def compaction_kernel(
    KEEP,  # [N] uint8, nonzero = keep
    INDEX,  # compact: [K] int64 out, kept rows' positions; partition: [N] int64 out, perm
    COUNT,  # partition: 0-d int64 out, K; compact: unused
    SRCS,  # tuple of [N, W_i] word views, row strides SRC_STRIDES[i]
    DSTS,  # tuple of [K or N, W_i] word views (same word type as SRCS[i]), row strides DST_STRIDES[i]
    SRC_STRIDES,
    DST_STRIDES,
    WORDS,  # tuple of W_i
    N,
    rows_per_program,
    n_col_programs,
    NUM_TENSORS: tl.constexpr,
    PARTITION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    start = pid_r * rows_per_program
    end = tl.minimum(start + rows_per_program, N)

    # Kept rows before this program's range (and in all, where the partition needs it).
    scan_end = N if PARTITION else start
    base = 0
    total = 0
    for s0 in range(0, scan_end, SCAN_BLOCK):
        offs = s0 + tl.arange(0, SCAN_BLOCK)
        k = (tl.load(KEEP + offs, mask=offs < scan_end, other=0) != 0).to(tl.int32)
        total += tl.sum(k, 0)
        base += tl.sum(tl.where(offs < start, k, 0), 0)
    if PARTITION:
        if (pid_r == 0) & (pid_c == 0):
            tl.store(COUNT, total.to(tl.int64))

    for r0 in range(start, end, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        in_range = rows < end
        kept = tl.load(KEEP + rows, mask=in_range, other=0) != 0
        ki = kept.to(tl.int32)
        kept_before = base + tl.cumsum(ki, 0) - ki
        if PARTITION:
            # The other rows follow the K kept ones, in order: total + (other rows before this one).
            dest = tl.where(kept, kept_before, total + rows - kept_before)
            move = in_range
        else:
            dest = kept_before
            move = in_range & kept
        if pid_c == 0:
            tl.store(INDEX + dest, rows.to(tl.int64), mask=move)
        src_rows = rows.to(tl.int64)
        dst_rows = dest.to(tl.int64)
        for i in tl.static_range(NUM_TENSORS):
            _copy_rows(
                SRCS[i],
                DSTS[i],
                src_rows,
                dst_rows,
                move,
                SRC_STRIDES[i],
                DST_STRIDES[i],
                WORDS[i],
                pid_c,
                n_col_programs,
                BLOCK_WORDS,
            )
        base += tl.sum(ki, 0)


@triton.jit
def scatter_rows_kernel(
    DEST,  # [M, W] word view, row stride dest_stride; written in place
    INDEX,  # [K] int64
    SRC,  # [K, W] word view, row stride src_stride
    K,
    M,
    W,
    dest_stride,
    src_stride,
    rows_per_program,
    n_col_programs,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    start = pid_r * rows_per_program
    end = tl.minimum(start + rows_per_program, K)
    for r0 in range(start, end, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        in_range = rows < end
        dest = tl.load(INDEX + rows, mask=in_range, other=-1)
        # Out-of-range rows are never written; the caller raises for them (a device-side assert on GPU).
        move = in_range & (dest >= 0) & (dest < M)
        _copy_rows(
            SRC, DEST, rows.to(tl.int64), dest, move, src_stride, dest_stride, W, pid_c, n_col_programs, BLOCK_WORDS
        )


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


def _target_programs(device, interpret):
    # Interpreter (numpy underneath): a handful of programs, enough to exercise the multi-program scan.
    return 4 if interpret else 4 * sm_count(device)


def block_config(interpret):
    """Block sizes (BLOCK_ROWS, BLOCK_WORDS, SCAN_BLOCK) and num_warps, the compile-time part of a launch."""
    # Interpreter: narrow chunks so the column split is exercised by the small test rows. GPU: a
    # [16, 256] tile of 4-byte words is 16 KiB per step, 16-byte accesses for 128 threads.
    return dict(BLOCK_ROWS=32 if interpret else 16, BLOCK_WORDS=8 if interpret else 256, SCAN_BLOCK=1024, num_warps=4)


def launch_config(n_rows, max_words, device, interpret):
    """Grid and block sizes for moving n_rows rows of at most max_words words.

    Returns :func:`block_config` plus rows_per_program and grid. Small batches split the words of
    each row over column programs; large ones give each program several row blocks, so the grid
    stays near 4 programs per multiprocessor either way.
    """
    cfg = block_config(interpret)
    target = _target_programs(device, interpret)
    row_blocks = triton.cdiv(n_rows, cfg["BLOCK_ROWS"])
    col_chunks = max(1, triton.cdiv(max_words, cfg["BLOCK_WORDS"]))
    n_col = max(1, min(col_chunks, target // row_blocks))
    n_row_programs = max(1, min(row_blocks, triton.cdiv(target, n_col)))
    rows_per_program = triton.cdiv(row_blocks, n_row_programs) * cfg["BLOCK_ROWS"]
    return dict(cfg, rows_per_program=rows_per_program, grid=(triton.cdiv(n_rows, rows_per_program), n_col))


def compaction_triton(keep, srcs, dsts, index, count, partition, interpret):
    """Launch the fused scan + gather.

    keep: [N] uint8 view of the bool mask. srcs: word views [N, W_i]; dsts: word views of the
    outputs, [K, W_i] (compact) or [N, W_i] (partition), each with the word type of its source.
    index: int64 [K] (compact) or [N] (perm). count: 0-d int64 (partition) or None.
    """
    n = keep.shape[0]
    if n == 0:
        if partition:
            count.zero_()
        return
    cfg = launch_config(n, max((s.shape[1] for s in srcs), default=0), keep.device, interpret)
    with on_device(keep.device):
        compaction_kernel[cfg["grid"]](
            keep,
            index,
            count if count is not None else index,
            tuple(srcs),
            tuple(dsts),
            tuple(s.stride(0) for s in srcs),
            tuple(d.stride(0) for d in dsts),
            tuple(s.shape[1] for s in srcs),
            n,
            cfg["rows_per_program"],
            cfg["grid"][1],
            NUM_TENSORS=len(srcs),
            PARTITION=partition,
            BLOCK_ROWS=cfg["BLOCK_ROWS"],
            BLOCK_WORDS=cfg["BLOCK_WORDS"],
            SCAN_BLOCK=cfg["SCAN_BLOCK"],
            num_warps=cfg["num_warps"],
        )


def scatter_rows_triton(dest, index, src, interpret):
    """dest[index] = src on word views: dest [M, W], src [K, W] (same word type), index int64 [K]."""
    k = index.shape[0]
    if k == 0:
        return
    cfg = launch_config(k, src.shape[1], dest.device, interpret)
    with on_device(dest.device):
        scatter_rows_kernel[cfg["grid"]](
            dest,
            index,
            src,
            k,
            dest.shape[0],
            src.shape[1],
            dest.stride(0),
            src.stride(0),
            cfg["rows_per_program"],
            cfg["grid"][1],
            BLOCK_ROWS=cfg["BLOCK_ROWS"],
            BLOCK_WORDS=cfg["BLOCK_WORDS"],
            num_warps=cfg["num_warps"],
        )
