"""Cosine similarity of two hidden states per row in Triton (CALM's "state" confidence), one launch.

Grid: one program per block of BLOCK_N rows; each walks d in BLOCK_D-wide tiles, accumulating
h * p, h * h and p * p elementwise in float32 tiles that are reduced once at the end (a fixed order:
deterministic). Elementwise arithmetic and reductions only (no tl.dot, so the interpreter's bf16 dot
problem does not arise). Bytes per call: N * d * elt for each of h and p, 4 N written.

Huge, tiny, zero and non-finite rows: the same scheme as the C++/CUDA kernels (csrc/state_similarity.h).
The one-pass sums are used where hh and pp lie in [2^-60, 2^60]; if any row of the block falls outside,
the block runs the rescue: each row's largest magnitude, then the sums again over the rows scaled by
powers of two (exact) to a largest magnitude in [1, 2). The cosine is scale-free, so nothing is scaled
back. A NaN or inf gives NaN, a zero row 0; results are clamped to [-1, 1].

Under the interpreter, bfloat16 rows are passed as int16 bits and widened by a shift: the interpreter's
bfloat16 -> float32 conversion flushes subnormals (a GPU's is exact), which the tiny-magnitude tests catch.
"""

import torch
import triton
import triton.language as tl

from earlyexit.triton_kernels.device import on_device

# Globals read inside a kernel must be constexpr.
_SAFE_LO = tl.constexpr(2.0**-60)
_SAFE_HI = tl.constexpr(2.0**60)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _load_f32(ptrs, mask, BF16_BITS: tl.constexpr):
    """Elements as float32. BF16_BITS: the pointers are int16 views of bfloat16 values, widened by their
    bits (exact; the interpreter's own bfloat16 conversion flushes subnormals, a GPU's cvt does not)."""
    if BF16_BITS:
        bits = tl.load(ptrs, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_sums(
    H,
    P,
    rows,
    row_mask,
    stride_h,
    stride_p,
    D,
    sh1,
    sh2,
    sp1,
    sp2,
    SCALED: tl.constexpr,
    BF16_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(dot, hh, pp) [BLOCK_N] float32 of the block's rows; h scaled by sh1 then sh2, p by sp1 then sp2."""
    h_base = H + rows[:, None] * stride_h
    p_base = P + rows[:, None] * stride_p
    acc_d = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = row_mask[:, None] & (cols < D)[None, :]
        x = _load_f32(h_base + cols[None, :], m, BF16_BITS)
        y = _load_f32(p_base + cols[None, :], m, BF16_BITS)
        if SCALED:
            x = x * sh1[:, None] * sh2[:, None]
            y = y * sp1[:, None] * sp2[:, None]
        acc_d += x * y
        acc_h += x * x
        acc_p += y * y
    return tl.sum(acc_d, 1), tl.sum(acc_h, 1), tl.sum(acc_p, 1)


@triton.jit
def _row_amax(
    H, P, rows, row_mask, stride_h, stride_p, D, BF16_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Largest magnitude of each row of h and of p ([BLOCK_N] float32), and whether a row pair holds a NaN/inf."""
    h_base = H + rows[:, None] * stride_h
    p_base = P + rows[:, None] * stride_p
    mh = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    mp = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    bad = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = row_mask[:, None] & (cols < D)[None, :]
        x = tl.abs(_load_f32(h_base + cols[None, :], m, BF16_BITS))
        y = tl.abs(_load_f32(p_base + cols[None, :], m, BF16_BITS))
        # NaN fails every comparison: "not <= FLT_MAX" flags NaN and inf alike.
        bad = tl.maximum(bad, tl.where((x <= _FLT_MAX) & (y <= _FLT_MAX), 0, 1))
        mh = tl.maximum(mh, tl.where(x <= _FLT_MAX, x, 0.0))
        mp = tl.maximum(mp, tl.where(y <= _FLT_MAX, y, 0.0))
    return tl.max(mh, 1), tl.max(mp, 1), tl.max(bad, 1) != 0


@triton.jit
def _pow2_scale(amax):
    """Two powers of two (s1, s2), each a normal float32, with s1 * s2 * amax in [1, 2); amax finite > 0."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    sub = e == 0  # subnormal: renormalize by 2^64 (exact) to read its exponent
    e_sub = ((amax * 18446744073709551616.0).to(tl.int32, bitcast=True) >> 23) & 0xFF
    k = tl.where(sub, 127 - e_sub + 64, 127 - e)
    k1 = (k + 256) // 2 - 128  # floor(k / 2) from a non-negative numerator
    k2 = k - k1
    return ((k1 + 127) << 23).to(tl.float32, bitcast=True), ((k2 + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _cosine(dot, hh, pp):
    c = tl.div_rn(dot, tl.sqrt_rn(hh * pp))
    return tl.minimum(tl.maximum(c, -1.0), 1.0)


@triton.jit
def state_similarity_kernel(
    H,  # [N, D] rows, unit column stride, row stride stride_h
    P,  # [N, D] like H, row stride stride_p
    OUT,  # [N] float32
    N,
    D,
    stride_h,
    stride_p,
    BF16_BITS: tl.constexpr,  # H and P are int16 views of bfloat16 rows (the interpreter lane)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = rows.to(tl.int64)
    one = tl.full([BLOCK_N], 1.0, tl.float32)
    dot, hh, pp = _row_sums(
        H, P, rows, row_mask, stride_h, stride_p, D, one, one, one, one, False, BF16_BITS, BLOCK_N, BLOCK_D
    )
    safe = (hh >= _SAFE_LO) & (hh <= _SAFE_HI) & (pp >= _SAFE_LO) & (pp <= _SAFE_HI)
    cos = _cosine(dot, tl.where(safe, hh, 1.0), tl.where(safe, pp, 1.0))
    if tl.max(tl.where(row_mask & ~safe, 1, 0), 0) > 0:
        mh, mp, bad = _row_amax(H, P, rows, row_mask, stride_h, stride_p, D, BF16_BITS, BLOCK_N, BLOCK_D)
        zero = (mh == 0.0) | (mp == 0.0)
        sh1, sh2 = _pow2_scale(tl.where(zero, 1.0, mh))
        sp1, sp2 = _pow2_scale(tl.where(zero, 1.0, mp))
        dot2, hh2, pp2 = _row_sums(
            H, P, rows, row_mask, stride_h, stride_p, D, sh1, sh2, sp1, sp2, True, BF16_BITS, BLOCK_N, BLOCK_D
        )
        # Scaled sums of a non-zero finite row lie in [1, 4 D): hh2 * pp2 is a normal float.
        ok = ~zero & ~bad
        rescued = _cosine(dot2, tl.where(ok, hh2, 1.0), tl.where(ok, pp2, 1.0))
        rescued = tl.where(zero, 0.0, rescued)
        rescued = tl.where(bad, float("nan"), rescued)
        cos = tl.where(safe, cos, rescued)
    tl.store(OUT + rows, cos, mask=row_mask)


def _pow2_at_least(x):
    return 1 << max(0, int(x) - 1).bit_length()


def state_similarity_config(n, d, interpret):
    """BLOCK_N, BLOCK_D and num_warps for n rows of width d.

    GPU: tiles of up to 2048 elements (16-byte loads for 128 threads in bf16 at BLOCK_D = 1024), one row
    per program at hidden sizes (d >= 1024), several rows per program for narrow rows. Interpreter:
    narrow tiles, so that the tests' small rows still loop over d and over several programs.
    """
    if interpret:
        return dict(BLOCK_N=4, BLOCK_D=32, num_warps=1)
    block_d = min(1024, _pow2_at_least(d))
    block_n = max(1, min(2048 // block_d, _pow2_at_least(n)))
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)


def state_similarity_triton(h, p, out, interpret):
    """out[i] = cosine of rows h[i], p[i]. h, p: [N, d] same dtype, unit column stride; out: float32 [N]."""
    n, d = h.shape
    if n == 0:
        return out
    cfg = state_similarity_config(n, d, interpret)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    bits = interpret and h.dtype == torch.bfloat16
    with on_device(h.device):
        state_similarity_kernel[grid](
            h.view(torch.int16) if bits else h,
            p.view(torch.int16) if bits else p,
            out,
            n,
            d,
            h.stride(0),
            p.stride(0),
            BF16_BITS=bits,
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"],
        )
    return out
