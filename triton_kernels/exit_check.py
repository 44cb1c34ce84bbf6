"""Fused exit check in Triton: RMSNorm + head GEMM + online softmax statistics + threshold.

One launch per call. The grid is (row blocks, vocabulary splits), row blocks fastest so that the
programs streaming the same weight slice run side by side and share it through L2. Each program
reduces its vocabulary slice to per-row partials (running max m, s = sum exp(z - m),
t = sum exp(z - m) * (z - m), top-1 value and index, top-2 value, a non-finite count) and writes
them to a small workspace: O(N * splits) floats, never the [N, V] logits.

Merging the partials happens in the same launch: after writing, each program bumps an atomic
counter for its row block; the program that sees it reach n_splits - 1 (the last to finish)
re-reads all partials and merges them as tile reductions over chunks of splits (never one dependent
L2 round trip per split). The fixed reduction order makes the result bitwise deterministic whichever
program finishes last. A second merge kernel would cost a launch
(~3-5 us at decode batch sizes, where the whole call is ~250 us for a 1 GiB head) for no gain, so
the last-program pattern is used. That program also resets its counter to zero, so the counter
buffer is allocated once per (device, stream) and never memset per call.

Bytes moved per call (the floor at decode batch sizes): V*d*elt for the weight, read once;
N*d*elt for the hidden rows, re-read from L2 for every vocabulary tile; O(N * splits) for partials.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from earlyexit.triton_kernels.device import device_index, on_device, sm_count

# Partial fields per row: m, s, t, top1, top2, non-finite count (a constexpr global: usable in kernels).
_N_FIELDS = tl.constexpr(6)


@triton.jit
def _merge(m, s, t, top1, idx, top2, bm, bs, bt, b1, bi, b2):
    """Merge the stats of two disjoint vocabulary ranges; the first holds the lower indices."""
    new_m = tl.maximum(m, bm)
    m_safe = tl.where(new_m == float("-inf"), 0.0, new_m)
    alpha_a = tl.exp(m - m_safe)
    alpha_b = tl.exp(bm - m_safe)
    # s == 0 means "nothing finite seen yet" (m = -inf): its shift is zeroed so 0 * (-inf) never makes a NaN.
    t_a = alpha_a * (t + s * tl.where(s > 0, m - m_safe, 0.0))
    t_b = alpha_b * (bt + bs * tl.where(bs > 0, bm - m_safe, 0.0))
    b_wins = b1 > top1  # strict: on ties the lower vocabulary index stays
    n1 = tl.where(b_wins, b1, top1)
    ni = tl.where(b_wins, bi, idx)
    n2 = tl.where(b_wins, tl.maximum(top1, b2), tl.maximum(top2, b1))
    return new_m, alpha_a * s + alpha_b * bs, t_a + t_b, n1, ni, n2


@triton.jit
def _softcap(z, cap):
    """Final-logit softcapping of the finite logits, cap * tanh(z / cap); non-finite ones pass unchanged.

    tanh from one exp (the interpreter has no libdevice): tanh|y| = (1 - e) / (1 + e), e = exp(-2|y|),
    and its odd series below |y| = 1/16, where 1 - e would cancel.
    """
    y = z / cap
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    y2 = a * a
    th = tl.where(a < 0.0625, a * (1.0 - y2 * (1.0 / 3.0 - y2 * (2.0 / 15.0))), (1.0 - e) / (1.0 + e))
    th = tl.where(y < 0, -th, th)
    finite = (z == z) & (tl.abs(z) < float("inf"))
    return tl.where(finite, cap * th, z)


@triton.jit
def _empty_stats(BLOCK_N: tl.constexpr):
    """Stats of an empty vocabulary range: (m, s, t, top1, idx, top2) = (-inf, 0, 0, -inf, 0, -inf)."""
    neg = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    return neg, zero, zero, neg, tl.zeros([BLOCK_N], dtype=tl.int32), neg


@triton.jit
def _merge_partials(PART_F, PART_I, pid_n, n_splits, BLOCK_N: tl.constexpr, MERGE_BLOCK: tl.constexpr):
    """Merge the n_splits partials of row block pid_n, MERGE_BLOCK splits at a time as one tile reduction.

    A serial loop over the splits would put n_splits dependent L2 round trips on the critical path of the
    call; here each chunk of splits is loaded at once ([MERGE_BLOCK, BLOCK_N] per field) and reduced along
    the split axis. Ties on the top-1 value go to the lowest vocabulary index explicitly (splits hold
    increasing columns), and the second value counts the other splits' top-1 values (duplicates count).
    Reductions run in a fixed order for a fixed configuration, so the result stays bitwise deterministic.
    Returns (m, s, t, top1, idx, top2, bad), each [BLOCK_N].
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, MERGE_BLOCK)
    m, s, t, top1, idx, top2 = _empty_stats(BLOCK_N)
    bad = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s0 in range(0, n_splits, MERGE_BLOCK):
        sp = s0 + offs_s
        ok = (sp < n_splits)[:, None]
        slot = (pid_n * n_splits + sp).to(tl.int64)
        pf = PART_F + slot[:, None] * (_N_FIELDS * BLOCK_N) + offs_n[None, :]
        # .cg: read through L2, where the other programs' stores landed, never a stale L1 line.
        bm = tl.load(pf + 0 * BLOCK_N, mask=ok, other=float("-inf"), cache_modifier=".cg")
        bs = tl.load(pf + 1 * BLOCK_N, mask=ok, other=0.0, cache_modifier=".cg")
        bt = tl.load(pf + 2 * BLOCK_N, mask=ok, other=0.0, cache_modifier=".cg")
        b1 = tl.load(pf + 3 * BLOCK_N, mask=ok, other=float("-inf"), cache_modifier=".cg")
        b2 = tl.load(pf + 4 * BLOCK_N, mask=ok, other=float("-inf"), cache_modifier=".cg")
        bad += tl.sum(tl.load(pf + 5 * BLOCK_N, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
        bi = tl.load(
            PART_I + slot[:, None] * BLOCK_N + offs_n[None, :], mask=ok, other=2147483647, cache_modifier=".cg"
        )
        cm = tl.max(bm, axis=0)
        cm_safe = tl.where(cm == float("-inf"), 0.0, cm)
        # s == 0 means "nothing finite seen" (m = -inf): such splits add nothing, and never 0 * (-inf).
        seen = bs > 0
        alpha = tl.where(seen, tl.exp(bm - cm_safe[None, :]), 0.0)
        cs = tl.sum(alpha * bs, axis=0)
        ct = tl.sum(tl.where(seen, alpha * (bt + bs * (bm - cm_safe[None, :])), 0.0), axis=0)
        c1 = tl.max(b1, axis=0)
        ci = tl.min(tl.where(b1 == c1[None, :], bi, 2147483647), axis=0)
        winner = (b1 == c1[None, :]) & (bi == ci[None, :])
        c2 = tl.maximum(tl.max(b2, axis=0), tl.max(tl.where(winner, float("-inf"), b1), axis=0))
        m, s, t, top1, idx, top2 = _merge(m, s, t, top1, idx, top2, cm, cs, ct, c1, ci, c2)
    return m, s, t, top1, idx, top2, bad


@triton.jit
def _one_minus_exp(x):
    """-expm1(x) for x <= 0 (or -inf), float32-accurate also where 1 - exp(x) cancels (x near 0: nearly tied
    top logits), as the reference's and the C++ kernels' expm1: a Taylor polynomial for |x| < 1/4 (its first
    omitted term is below 2e-9 relative), 1 - exp(x) beyond (at least 0.22, so exp's own error stays small)."""
    poly = -x * (
        1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720 + x * (1.0 / 5040))))))
    )
    return tl.where(x > -0.25, poly, 1.0 - tl.exp(x))


@triton.jit
def finalize_store(
    m,
    s,
    t,
    idx,
    top2,
    bad,
    rows,
    row_ok,
    THR,
    TOKEN,
    EXIT,
    CONF,
    MAXP,
    MARGIN,
    ENTROPY,
    LSE,
    STATISTIC: tl.constexpr,
    EXIT_ABOVE: tl.constexpr,
):
    """Exit-check outputs of merged statistics (earlyexit.ops.reference.finalize_stats, in the kernel).

    The probabilities come from the sums relative to the maximum (max_prob = 1 / s, margin =
    -expm1(top2 - m) / s), never from exp(m - lse), so they keep float32 accuracy at any logit magnitude.
    """
    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - t / s
    max_prob = 1.0 / s
    margin = _one_minus_exp(top2 - m) / s
    valid = (bad == 0) & (lse == lse) & (tl.abs(lse) < float("inf"))
    lse = tl.where(valid, lse, float("nan"))
    entropy = tl.where(valid, entropy, float("nan"))
    max_prob = tl.where(valid, max_prob, float("nan"))
    margin = tl.where(valid, margin, float("nan"))
    thr = tl.load(THR + rows, mask=row_ok, other=0.0)
    if STATISTIC == 0:
        conf = max_prob
    elif STATISTIC == 1:
        conf = margin
    else:
        conf = entropy
    if EXIT_ABOVE:
        go = conf >= thr
    else:
        go = conf <= thr
    token = tl.where(valid, idx.to(tl.int64), -1)
    tl.store(TOKEN + rows, token, mask=row_ok)
    tl.store(EXIT + rows, go & valid, mask=row_ok)
    tl.store(CONF + rows, conf, mask=row_ok)
    tl.store(MAXP + rows, max_prob, mask=row_ok)
    tl.store(MARGIN + rows, margin, mask=row_ok)
    tl.store(ENTROPY + rows, entropy, mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)


@triton.jit
def exit_check_kernel(
    H,  # [N, d] hidden rows, row stride stride_h, unit column stride
    W,  # [V, d] head weight, row stride stride_w
    BIAS,  # [V] or dummy
    NORM_W,  # [d] RMSNorm weight or dummy
    THR,  # [N] float32 thresholds
    TOKEN,  # [N] int64 out
    EXIT,  # [N] bool out
    CONF,  # [N] float32 out (the chosen measure)
    MAXP,  # [N] float32 out
    MARGIN,  # [N] float32 out
    ENTROPY,  # [N] float32 out
    LSE,  # [N] float32 out
    S_MAX,  # STATS_ONLY: [N] float32 out, max_logit (the six ExitStats fields instead of the seven above)
    S_ARG,  # [N] int64 out, argmax (local column id)
    S_SECOND,  # [N] float32 out, second_logit
    S_SUM,  # [N] float32 out, sum_exp
    S_SUMZ,  # [N] float32 out, sum_exp_z
    S_INVALID,  # [N] bool out, invalid
    PART_F,  # [row_blocks, n_splits, 6, BLOCK_N] float32 partials
    PART_I,  # [row_blocks, n_splits, BLOCK_N] int32 top-1 indices
    COUNTER,  # [>= row_blocks] int32, zero on entry, zero again on exit
    N,
    D,
    V,
    stride_h,
    stride_w,
    tiles_per_split,
    n_splits,
    eps,
    temperature,
    norm_offset,  # the RMSNorm scale is norm_offset + norm_weight (Gemma: 1)
    softcap,  # final-logit softcapping (HAS_SOFTCAP)
    STATISTIC: tl.constexpr,  # the measure's statistic code (earlyexit.ops.measures.STATISTICS)
    EXIT_ABOVE: tl.constexpr,  # exit when the statistic is >= the threshold (else <=)
    STATS_ONLY: tl.constexpr,  # write the slice's statistics, not the exit decision
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MERGE_BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # int64 row offsets: N * stride_h and V * stride_w can pass 2^31.
    h_rows = H + rows.to(tl.int64)[:, None] * stride_h
    offs_d = tl.arange(0, BLOCK_D)

    # Prologue: RMSNorm scale and a non-finite count per row (N * d reads, tiny next to the head).
    sumsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    nonfinite = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        d_ok = (k + offs_d) < D
        x = tl.load(h_rows + (k + offs_d)[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
        nonfinite += tl.sum(tl.where((x == x) & (tl.abs(x) < float("inf")), 0.0, 1.0), axis=1)
    inv_rms = 1.0 / tl.sqrt(sumsq / D + eps)

    m, s, t, top1, idx, top2 = _empty_stats(BLOCK_N)
    bad = nonfinite

    offs_v = tl.arange(0, BLOCK_V)
    first_tile = pid_s * tiles_per_split
    for j in range(0, tiles_per_split):
        cols = (first_tile + j) * BLOCK_V + offs_v
        col_ok = cols < V
        w_rows = W + cols.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for k in range(0, D, BLOCK_D):
            d_ok = (k + offs_d) < D
            x = tl.load(h_rows + (k + offs_d)[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if HAS_NORM:
                g = tl.load(NORM_W + k + offs_d, mask=d_ok, other=0.0).to(tl.float32)
                x = x.to(tl.float32) * inv_rms[:, None] * (norm_offset + g[None, :])
            x = x.to(W.dtype.element_ty)  # the MMA operand, rounded as the reference rounds it
            w = tl.load(w_rows + (k + offs_d)[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST_DOT:
                # The interpreter multiplies bf16 bit patterns in tl.dot: upcast (exact) there.
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        z = acc
        if HAS_BIAS:
            z += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            z = _softcap(z, softcap)
        z = z / temperature
        z = tl.where(col_ok[None, :], z, float("-inf"))
        bad += tl.sum(tl.where((z != z) | (z == float("inf")), 1.0, 0.0), axis=1)

        # Tile statistics, then merge into the running ones.
        tm = tl.max(z, axis=1)
        tm_safe = tl.where(tm == float("-inf"), 0.0, tm)
        # -inf logits (masked tail, -inf bias) add exp(-inf) = 0 to s and, guarded, 0 to t.
        shifted = tl.where(z == float("-inf"), 0.0, z - tm_safe[:, None])
        e = tl.where(z == float("-inf"), 0.0, tl.exp(shifted))
        ts = tl.sum(e, axis=1)
        tt = tl.sum(e * shifted, axis=1)
        ti = tl.min(tl.where(z == tm[:, None], cols[None, :], 2147483647), axis=1)
        t2 = tl.max(tl.where(cols[None, :] == ti[:, None], float("-inf"), z), axis=1)
        m, s, t, top1, idx, top2 = _merge(m, s, t, top1, idx, top2, tm, ts, tt, tm, ti, t2)

    # Publish this split's partials.
    offs_n = tl.arange(0, BLOCK_N)
    slot = (pid_n * n_splits + pid_s).to(tl.int64)
    pf = PART_F + slot * (_N_FIELDS * BLOCK_N) + offs_n
    tl.store(pf + 0 * BLOCK_N, m)
    tl.store(pf + 1 * BLOCK_N, s)
    tl.store(pf + 2 * BLOCK_N, t)
    tl.store(pf + 3 * BLOCK_N, top1)
    tl.store(pf + 4 * BLOCK_N, top2)
    tl.store(pf + 5 * BLOCK_N, bad)
    tl.store(PART_I + slot * BLOCK_N + offs_n, idx)

    # Every thread's stores must be issued before the (release) atomic that announces them.
    tl.debug_barrier()
    done = tl.atomic_add(COUNTER + pid_n, 1, sem="acq_rel")
    if done == n_splits - 1:
        m, s, t, top1, idx, top2, bad = _merge_partials(PART_F, PART_I, pid_n, n_splits, BLOCK_N, MERGE_BLOCK)
        if STATS_ONLY:
            tl.store(S_MAX + rows, m, mask=row_ok)
            tl.store(S_ARG + rows, idx.to(tl.int64), mask=row_ok)
            tl.store(S_SECOND + rows, top2, mask=row_ok)
            tl.store(S_SUM + rows, s, mask=row_ok)
            tl.store(S_SUMZ + rows, t, mask=row_ok)
            tl.store(S_INVALID + rows, bad != 0, mask=row_ok)
        else:
            finalize_store(
                m,
                s,
                t,
                idx,
                top2,
                bad,
                rows,
                row_ok,
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
        tl.store(COUNTER + pid_n, 0)  # ready for the next call on this stream


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

_COUNTERS = {}


def _counter(device, n):
    """A zeroed int32 buffer of >= n counters for this (device, stream); the kernel re-zeroes it.

    Under CUDA-graph capture each call gets its own buffer, zeroed by a captured fill: a shared one would
    be zeroed only by the first graph captured (graphs share torch's capture stream and may replay in any
    order, even concurrently on several streams).
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device_index(device) if device.type == "cuda" else -1, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 64) if buf is None else max(n, 2 * buf.numel()), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _pow2_at_least(x, lo):
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


def exit_check_config(n, d, v, dtype, device, interpret):
    """Block sizes and split count for one call, from (row bucket, d, V, dtype).

    Returns a dict with BLOCK_N, BLOCK_V, BLOCK_D, MERGE_BLOCK, num_warps, num_stages, n_splits,
    tiles_per_split. BLOCK_N is at least 16, the MMA minimum; nothing assumes d or V are powers of two.
    MERGE_BLOCK splits are merged per step of the final reduction.
    """
    block_n = 16 if n <= 16 else (32 if n <= 32 else 64)
    if interpret:
        # numpy underneath: few, large tiles, and a few splits so the merge path is exercised.
        block_v = min(256, _pow2_at_least(v, 16))
        block_d = min(64, _pow2_at_least(d, 16))
        num_warps, num_stages, target_programs = 4, 1, 3
    else:
        # float32 tiles of 128 columns spill (255 registers, stack in use, seen in ptxas' report): 64 for fp32.
        block_v = 128 if dtype != torch.float32 else 64
        block_d = 64 if dtype != torch.float32 else 32
        num_warps = 4 if block_n <= 32 else 8
        num_stages = 4 if dtype != torch.float32 else 3
        target_programs = 2 * sm_count(device)
    row_blocks = triton.cdiv(n, block_n)
    tiles = triton.cdiv(v, block_v)
    n_splits = max(1, min(tiles, triton.cdiv(target_programs, row_blocks)))
    tiles_per_split = triton.cdiv(tiles, n_splits)
    n_splits = triton.cdiv(tiles, tiles_per_split)  # no empty splits
    # Interpreter: 2, so the test shapes' three splits take a full and a masked chunk.
    merge_block = 2 if interpret else min(64, _pow2_at_least(n_splits, 2))
    return dict(
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        MERGE_BLOCK=merge_block,
        num_warps=num_warps,
        num_stages=num_stages,
        n_splits=n_splits,
        tiles_per_split=tiles_per_split,
    )


class HeadArgs(NamedTuple):
    """The head besides its weight, validated: norm_weight [d] / bias [V] contiguous or None, norm_eps >= 0,
    norm_offset (the RMSNorm scale is norm_offset + norm_weight), softcap (0: none), temperature > 0."""

    norm_weight: torch.Tensor | None
    bias: torch.Tensor | None
    norm_eps: float
    norm_offset: float
    softcap: float
    temperature: float


def exit_check_triton(hidden, weight, threshold, head, statistic, exit_above, out, interpret):
    """Launch the fused exit check on validated inputs, writing into ``out``.

    hidden: [N, d] with unit column stride; weight: [V, d] with unit column stride, same dtype;
    threshold: [N] float32 contiguous; head: :class:`HeadArgs`;
    statistic, exit_above: the measure (its statistic code and exit direction, earlyexit.ops.measures);
    out: (token int64, exit bool, confidence, max_prob, margin, entropy, lse float32), each [N] contiguous.
    """
    return _launch(hidden, weight, head, interpret, out, None, threshold, statistic, exit_above)


def exit_stats_triton(hidden, weight, head, out, interpret):
    """Launch the same kernel for the statistics of this vocabulary slice, writing into ``out``.

    Inputs as :func:`exit_check_triton`; out: (max_logit float32, argmax int64 local column id, second_logit,
    sum_exp, sum_exp_z float32, invalid bool), each [N] contiguous (earlyexit.ExitStats).
    """
    return _launch(hidden, weight, head, interpret, None, out)


def _launch(hidden, weight, head, interpret, out, stats_out, threshold=None, statistic=0, exit_above=True):
    norm_weight, bias = head.norm_weight, head.bias
    n, d = hidden.shape
    v = weight.shape[0]
    result = out if stats_out is None else stats_out
    if n == 0:
        return result
    cfg = exit_check_config(n, d, v, hidden.dtype, hidden.device, interpret)
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    part_f = torch.empty(
        (row_blocks, cfg["n_splits"], _N_FIELDS.value, cfg["BLOCK_N"]), dtype=torch.float32, device=hidden.device
    )
    part_i = torch.empty((row_blocks, cfg["n_splits"], cfg["BLOCK_N"]), dtype=torch.int32, device=hidden.device)
    upcast = interpret and hidden.dtype == torch.bfloat16
    # The mode not in use gets dummy pointers (never dereferenced: STATS_ONLY is a compile-time switch).
    out = out if out is not None else (hidden,) * 7
    stats_out = stats_out if stats_out is not None else (hidden,) * 6
    with on_device(hidden.device):
        counter = _counter(hidden.device, row_blocks)
        exit_check_kernel[(row_blocks, cfg["n_splits"])](
            hidden,
            weight,
            bias if bias is not None else hidden,
            norm_weight if norm_weight is not None else hidden,
            threshold if threshold is not None else hidden,
            *out,
            *stats_out,
            part_f,
            part_i,
            counter,
            n,
            d,
            v,
            hidden.stride(0),
            weight.stride(0),
            cfg["tiles_per_split"],
            cfg["n_splits"],
            float(head.norm_eps),
            float(head.temperature),
            float(head.norm_offset),
            float(head.softcap),
            STATISTIC=statistic,
            EXIT_ABOVE=exit_above,
            STATS_ONLY=threshold is None,
            HAS_NORM=norm_weight is not None,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=head.softcap > 0,
            UPCAST_DOT=upcast,
            DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_V=cfg["BLOCK_V"],
            BLOCK_D=cfg["BLOCK_D"],
            MERGE_BLOCK=cfg["MERGE_BLOCK"],
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return result
