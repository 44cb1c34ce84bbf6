"""One kernel for the merge of the exit statistics gathered from the ranks of a vocabulary-sharded head.

Input: the words of ``earlyexit.distributed`` as gathered, [W, 7, N] int32 (per rank: max_logit,
second_logit, sum_exp, sum_exp_z as float32 bit patterns, the int64 argmax as its low and high int32
halves, invalid). Output: the six ExitStats fields of the union, the merge of
``earlyexit.ops.reference.merge_stats`` (its rules, ties to the lowest global id; rank order; the sums
in float32), or with the exit decision too the outputs of ``finalize_stats`` (the Triton exit check's
own finalize step). One launch instead of the torch code's unpack, merge and finalize: about fifty
tensor ops that launch kernels, seventy with the decision, whose launch time on a GPU can exceed the
time to read a sharded head.
"""

import torch
import triton
import triton.language as tl

from earlyexit.triton_kernels.device import on_device
from earlyexit.triton_kernels.exit_check import finalize_store

_NO_ID = tl.constexpr(9223372036854775807)  # above every vocabulary id: never the lowest
_NEG_INF_BITS = tl.constexpr(-8388608)  # 0xff800000, float32 -inf as an int32


@triton.jit
def merge_gathered_kernel(
    WORDS,  # [W, 7, N] int32, contiguous
    MAXL,
    ARGMAX,
    SECOND,
    SUMEXP,
    SUMEXPZ,
    INVALID,  # [N] each: float32, int64, float32, float32, float32, bool (unused when FINALIZE)
    THR,  # [N] float32 thresholds (FINALIZE)
    TOKEN,
    EXIT,
    CONF,
    MAXP,
    MARGIN,
    ENTROPY,
    LSE,  # [N] exit-check outputs (FINALIZE): int64, bool, float32 x 5
    W,
    N,
    FINALIZE: tl.constexpr,  # write the exit decision instead of the merged statistics
    STATISTIC: tl.constexpr,  # the measure's statistic code and direction (earlyexit.ops.measures)
    EXIT_ABOVE: tl.constexpr,
    W_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, W_BLOCK)
    col_ok = cols < N
    ok = (ranks < W)[:, None] & col_ok[None, :]
    # A rank past W reads as an empty slice, the merge's neutral element.
    at = WORDS + ranks[:, None].to(tl.int64) * (7 * N) + cols[None, :]
    m = tl.load(at, mask=ok, other=_NEG_INF_BITS).to(tl.float32, bitcast=True)
    second = tl.load(at + N, mask=ok, other=_NEG_INF_BITS).to(tl.float32, bitcast=True)
    s = tl.load(at + 2 * N, mask=ok, other=0).to(tl.float32, bitcast=True)
    t = tl.load(at + 3 * N, mask=ok, other=0).to(tl.float32, bitcast=True)
    lo = tl.load(at + 4 * N, mask=ok, other=-1).to(tl.uint32, bitcast=True).to(tl.int64)
    hi = tl.load(at + 5 * N, mask=ok, other=-1).to(tl.int64)
    bad = tl.max(tl.load(at + 6 * N, mask=ok, other=0), axis=0) != 0
    ids = (hi << 32) | lo

    top = tl.max(m, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    # s == 0 means "no finite logit in that slice": it adds nothing, and never 0 * (-inf).
    seen = s > 0
    shift = m - top_safe[None, :]
    alpha = tl.where(seen, tl.exp(shift), 0.0)
    sum_exp = tl.sum(alpha * s, axis=0)
    sum_exp_z = tl.sum(tl.where(seen, alpha * (t + s * shift), 0.0), axis=0)
    key = tl.where(ids < 0, _NO_ID, ids)
    at_top = m == top[None, :]
    best = tl.min(tl.where(at_top, key, _NO_ID), axis=0)
    winner = at_top & (key == best[None, :])
    others = tl.max(tl.where(winner, float("-inf"), m), axis=0)
    argmax = tl.where((best == _NO_ID) | bad, -1, best)
    second = tl.maximum(tl.max(second, axis=0), others)

    if FINALIZE:
        finalize_store(
            top,
            sum_exp,
            sum_exp_z,
            argmax,
            second,
            bad,
            cols,
            col_ok,
            THR,
            TOKEN,
            EXIT,
            CONF,
            MAXP,
            MARGIN,
            ENTROPY,
            LSE,
            STATISTIC,
            EXIT_ABOVE,
        )
    else:
        tl.store(MAXL + cols, top, mask=col_ok)
        tl.store(ARGMAX + cols, argmax, mask=col_ok)
        tl.store(SECOND + cols, second, mask=col_ok)
        tl.store(SUMEXP + cols, sum_exp, mask=col_ok)
        tl.store(SUMEXPZ + cols, sum_exp_z, mask=col_ok)
        tl.store(INVALID + cols, bad, mask=col_ok)


def _fields(n, device, dtypes):
    return tuple(torch.empty(n, dtype=dt, device=device) for dt in dtypes)


def merge_config(world):
    """(W_BLOCK, BLOCK_N) for ``world`` gathered slices: the ranks padded to a power of two, and a
    program's tile of each field kept near 2K elements whatever the world size."""
    w_block = max(2, triton.next_power_of_2(world))
    return w_block, max(16, min(256, 2048 // w_block))


def _launch(words, stats_out, threshold, check_out, statistic, exit_above):
    w, _, n = words.shape
    w_block, block_n = merge_config(w)
    # The mode not in use gets dummy pointers (never dereferenced: FINALIZE is a compile-time switch).
    stats_out = stats_out or (words,) * 6
    check_out = check_out or (words,) * 7
    with on_device(words.device):
        merge_gathered_kernel[(triton.cdiv(n, block_n),)](
            words,
            *stats_out,
            words if threshold is None else threshold,
            *check_out,
            w,
            n,
            FINALIZE=threshold is not None,
            STATISTIC=statistic,
            EXIT_ABOVE=exit_above,
            W_BLOCK=w_block,
            BLOCK_N=block_n,
        )


def merge_gathered_triton(words):
    """Merge gathered exit statistics: words [W, 7, N] int32 contiguous (W >= 1, N >= 1), on one device.

    Returns the six ExitStats fields of the union, [N] each (max_logit, argmax int64 global id or -1,
    second_logit, sum_exp, sum_exp_z float32, invalid bool). Deterministic: ranks merge in one fixed order.
    """
    f32 = torch.float32
    out = _fields(words.shape[2], words.device, (f32, torch.int64, f32, f32, f32, torch.bool))
    _launch(words, out, None, None, 0, True)
    return out


def merge_check_gathered_triton(words, threshold, statistic, exit_above):
    """Merge gathered exit statistics and decide: the exit-check outputs of the union.

    words as :func:`merge_gathered_triton`; threshold: [N] float32 contiguous; statistic, exit_above: the
    measure (its statistic code and exit direction, earlyexit.ops.measures). Returns (token int64,
    exit bool, confidence, max_prob, margin, entropy, lse float32), [N] each, as
    ``earlyexit.ops.reference.finalize_stats`` of the merge.
    """
    f32 = torch.float32
    out = _fields(words.shape[2], words.device, (torch.int64, torch.bool, f32, f32, f32, f32, f32))
    _launch(words, None, threshold, out, statistic, exit_above)
    return out
