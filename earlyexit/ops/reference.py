"""Pure-PyTorch references for every op: the CPU fallback and the test oracle.

The exit check here computes exactly what the fused kernels compute (same rounding points:
RMSNorm in float32, the normalized row rounded to the weight dtype as an MMA operand, float32
accumulation), but in vocabulary chunks so its extra memory is O(N * chunk), never O(N * V).
Its three steps are the statistics contract every backend follows: per-slice statistics
(:func:`exit_stats_reference`), their merge (:func:`merge_stats`) and the finalize step
(:func:`finalize_stats`); the public ``merge_exit_stats`` and ``finalize_exit_stats`` are these two.
"""

import math

import torch

from earlyexit.ops.measures import get_head_measure

#: Vocabulary columns per chunk of the reference exit check.
REFERENCE_CHUNK = 8192
#: argmax of a slice with no vocabulary column at all (an empty shard) or of an invalid row: it loses every tie.
NO_TOKEN = -1
_NO_ID = torch.iinfo(torch.int64).max


def rms_normalize(hidden, norm_weight, eps, offset=0.0):
    """RMSNorm of float32 rows as LlamaRMSNorm computes it: x * rsqrt(mean(x^2) + eps) * (offset + w).

    hidden: [N, d] float32. norm_weight: [d] any float dtype. offset: 0 (Llama) or 1 (Gemma's 1 + w),
    added in float32. Returns [N, d] float32.
    """
    inv = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    scale = norm_weight.float() if offset == 0 else offset + norm_weight.float()
    return hidden * inv * scale


def cap_logits(z, softcap):
    """Final-logit softcapping (Gemma 2): finite z -> softcap * tanh(z / softcap); softcap 0: z unchanged.

    Non-finite logits pass unchanged, so a -inf bias still masks its column and a NaN or +inf logit
    still makes its row invalid. z: float32 [...]. softcap: float >= 0.
    """
    if not softcap:
        return z
    return torch.where(torch.isfinite(z), softcap * torch.tanh(z / softcap), z)


def head_logits(
    hidden, weight, *, norm_weight=None, norm_eps=1e-6, norm_offset=0.0, bias=None, softcap=0.0, temperature=1.0
):
    """The exit head's logits in plain, differentiable torch, in float32: the definition every kernel follows.

    z = cap_logits(rmsnorm(hidden) @ weight.T + bias, softcap) / temperature (RMSNorm with scale
    norm_offset + norm_weight, only when norm_weight is given). hidden: [N, d]; weight: [V, d];
    norm_weight [d] / bias [V] or None. Returns [N, V] float32 (materialized: for training and
    tests; the exit check itself never builds it). The kernels additionally round the normalized
    row to the weight's dtype before the GEMM (see :func:`exit_stats_reference`).
    """
    x = hidden.float()
    if norm_weight is not None:
        x = rms_normalize(x, norm_weight, norm_eps, norm_offset)
    z = torch.nn.functional.linear(x, weight.float(), None if bias is None else bias.float())
    return cap_logits(z, softcap) / temperature


def softmax_stats(z, col0):
    """The exit statistics of one [N, C] float32 logits chunk whose first column has vocabulary id col0.

    Returns the :class:`earlyexit.ExitStats` fields as a tuple of [N] tensors: (max_logit, argmax,
    second_logit, sum_exp = sum exp(z - max_logit), sum_exp_z = sum exp(z - max_logit) * (z - max_logit),
    invalid = any NaN or +inf logit). -inf logits contribute nothing; a row without a finite logit has
    max_logit = -inf, sum_exp = 0 and, as argmax, its lowest id.
    """
    invalid = (torch.isnan(z) | (z == math.inf)).any(-1)
    top1, arg = z.max(-1)  # first occurrence on ties; NaN rows are invalid and never used
    second = z.scatter(-1, arg[:, None], -math.inf).max(-1).values
    m_safe = torch.where(top1 == -math.inf, torch.zeros_like(top1), top1)
    shifted = z - m_safe[:, None]
    e = torch.exp(shifted)
    s = e.sum(-1)
    t = torch.where(z == -math.inf, torch.zeros_like(e), e * shifted).sum(-1)
    return top1, arg + col0, second, s, t, invalid


def empty_stats(n, device, invalid=None):
    """The statistics of an empty vocabulary slice, the neutral element of :func:`merge_stats` ([N] each)."""
    f = dict(dtype=torch.float32, device=device)
    neg = torch.full((n,), -math.inf, **f)
    zero = torch.zeros(n, **f)
    bad = torch.zeros(n, dtype=torch.bool, device=device) if invalid is None else invalid
    return neg, torch.full((n,), NO_TOKEN, dtype=torch.int64, device=device), neg.clone(), zero, zero.clone(), bad


def merge_stats(parts):
    """Merge the statistics of disjoint vocabulary slices (a sequence of 6-tuples of [...] tensors).

    Associative and exact for argmax (the largest max_logit; ties go to the lowest vocabulary id, an empty
    slice's NO_TOKEN never wins; NO_TOKEN for a row invalid in any slice, whatever the others hold) and
    second_logit (the largest of the other logits, duplicates counted);
    sum_exp and sum_exp_z are rescaled to the common maximum, in float32. The slices are reduced together,
    in the given order, so equal inputs give bitwise equal results.
    """
    if len(parts) == 1:
        return tuple(parts[0])
    m, idx, second, s, t, bad = (torch.stack(list(f)) for f in zip(*parts))  # [K, ...]
    top = m.max(0).values
    top_safe = torch.where(top == -math.inf, torch.zeros_like(top), top)
    # s == 0 means "no finite logit in that slice": it adds nothing, and never 0 * (-inf).
    seen = s > 0
    alpha = torch.where(seen, torch.exp(m - top_safe), torch.zeros_like(m))
    sum_exp = (alpha * s).sum(0)
    sum_exp_z = torch.where(seen, alpha * (t + s * (m - top_safe)), torch.zeros_like(m)).sum(0)
    key = torch.where(idx < 0, torch.full_like(idx, _NO_ID), idx)
    at_top = m == top[None]
    best = torch.where(at_top, key, torch.full_like(key, _NO_ID)).min(0).values
    winner = at_top & (key == best[None])
    invalid = bad.any(0)
    argmax = torch.where((best == _NO_ID) | invalid, torch.full_like(best, NO_TOKEN), best)
    others = torch.where(winner, torch.full_like(m, -math.inf), m).max(0).values
    return top, argmax, torch.maximum(second.max(0).values, others), sum_exp, sum_exp_z, invalid


def finalize_stats(stats, threshold, measure):
    """Turn merged statistics into the exit-check outputs.

    stats: the six :class:`earlyexit.ExitStats` fields. threshold: float32 broadcastable to them.
    measure: a name of :data:`earlyexit.ops.measures.MEASURES`.
    Returns (token int64, exit bool, confidence, max_prob, margin, entropy, lse). Computed from the sums
    relative to the maximum (max_prob = 1 / sum_exp, margin = (1 - exp(second - max)) / sum_exp,
    entropy = log(sum_exp) - sum_exp_z / sum_exp), so they keep float32 accuracy at any logit magnitude.
    Invalid rows (flagged, or without a finite logit) never exit: token -1, NaN statistics.
    """
    m, idx, second, s, t, invalid = stats
    log_s = torch.log(s)
    lse = m + log_s
    max_prob = 1.0 / s
    margin = -torch.expm1(second - m) / s
    entropy = log_s - t / s
    valid = ~invalid & torch.isfinite(lse)
    nan = torch.full_like(lse, math.nan)
    lse, entropy, max_prob, margin = (torch.where(valid, x, nan) for x in (lse, entropy, max_prob, margin))
    token = torch.where(valid, idx, torch.full_like(idx, -1))
    spec = get_head_measure(measure)
    confidence = {"max_prob": max_prob, "margin": margin, "entropy": entropy}[spec.statistic]
    # confidence is returned beside the statistic it copies: outputs of an op may not alias.
    return token, spec.exits(confidence, threshold) & valid, confidence.clone(), max_prob, margin, entropy, lse


def exit_stats_reference(
    hidden, weight, norm_weight, bias, norm_eps, temperature, norm_offset=0.0, softcap=0.0, chunk=REFERENCE_CHUNK
):
    """Reference exit statistics on validated 2-D inputs (the kernels' rounding points).

    hidden: [N, d] float32/float16/bfloat16 (row stride free). weight: [V, d] same dtype, V >= 1 local
    columns (ids 0..V-1). norm_weight: [d] or None. bias: [V] or None. norm_offset, softcap (0: none):
    as :func:`head_logits`. Returns the six ExitStats fields ([N] each); a row whose hidden state is
    not finite is invalid. Extra memory O(N * chunk).
    """
    x = hidden.float()
    hidden_finite = torch.isfinite(x).all(-1)
    if norm_weight is not None:
        x = rms_normalize(x, norm_weight, norm_eps, norm_offset)
    # The kernels feed the normalized row to the MMA in the weight's dtype: round the same way.
    x = x.to(weight.dtype).float()
    stats = None
    for v0 in range(0, weight.shape[0], chunk):
        z = x @ weight[v0 : v0 + chunk].float().T
        if bias is not None:
            z = z + bias[v0 : v0 + chunk].float()
        z = cap_logits(z, softcap) / temperature
        part = softmax_stats(z, v0)
        stats = part if stats is None else merge_stats([stats, part])
    if stats is None:
        return empty_stats(hidden.shape[0], hidden.device, ~hidden_finite)
    return (*stats[:5], stats[5] | ~hidden_finite)


def exit_check_reference(
    hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature, norm_offset=0.0, softcap=0.0
):
    """Reference fused exit check on validated 2-D inputs: threshold [N] float32, the rest as
    :func:`exit_stats_reference`. Returns the seven output tensors of :func:`earlyexit.exit_check`."""
    stats = exit_stats_reference(hidden, weight, norm_weight, bias, norm_eps, temperature, norm_offset, softcap)
    return finalize_stats(stats, threshold, measure)


# --------------------------------------------------------------------------------------------
# Ragged batch compaction
# --------------------------------------------------------------------------------------------


def partition_positions(keep):
    """Destination row of every input row when kept rows go first, each group in original order.

    keep: [N] bool. Returns (dest int64 [N], count int64 0-d), both on keep's device, with no host
    synchronization: kept row i goes to (kept rows before i), the others to count + (others before i).
    """
    k = keep.to(torch.int64)
    kept_before = torch.cumsum(k, 0) - k
    count = k.sum()
    rows = torch.arange(keep.shape[0], device=keep.device)
    dest = torch.where(keep, kept_before, count + rows - kept_before)
    return dest, count


def compact_reference(keep, tensors):
    """Kept rows of every tensor, and their original positions.

    keep: [N] bool. tensors: sequence of [N, ...] tensors (any dtype, any strides), on keep's device.
    Returns a list: tensors[i][keep] for each i (contiguous), then index int64 [K] ascending.
    One host synchronization (nonzero learns K) when keep is on a GPU.
    """
    index = torch.nonzero(keep).reshape(-1)
    return [x.index_select(0, index) for x in tensors] + [index]


def partition_rows_reference(keep, tensors, out):
    """Writes kept rows then the other rows of tensors[i] into out[i]; no host synchronization.

    keep: [N] bool. tensors, out: sequences of [N, ...] tensors, out[i] shaped and typed like tensors[i].
    Returns (perm int64 [N], the original row of each output row; count int64 0-d, the kept rows).
    """
    dest, count = partition_positions(keep)
    for x, o in zip(tensors, out):
        o.index_copy_(0, dest, x)
    perm = torch.empty_like(dest).scatter_(0, dest, torch.arange(keep.shape[0], device=keep.device))
    return perm, count


def scatter_rows_reference(dest, index, src):
    """dest[index] = src in place. dest: [M, ...]; index: [K] int64 in [0, M); src: [K, ...] like dest."""
    dest.index_copy_(0, index, src)


# --------------------------------------------------------------------------------------------
# Hidden-state similarity
# --------------------------------------------------------------------------------------------


def _pow2_factors(amax):
    """Two float32 powers of two per row, each a normal float, with s1 * s2 * amax in [1, 2).

    amax: [N] float32, finite and > 0 (callers substitute 1 elsewhere). The exponent comes from
    frexp (subnormals included: amax = m * 2^e, m in [0.5, 1)); the factors are built from their
    bits, so they are exact on every device. Their product 2^k (k in [-127, 149]) is not always a
    float32 itself, hence two factors, as in csrc/state_similarity.h.
    """
    k = 1 - torch.frexp(amax).exponent
    k1 = torch.div(k, 2, rounding_mode="floor")
    return tuple(((e + 127) << 23).to(torch.int32).view(torch.float32) for e in (k1, k - k1))


def state_similarity_reference(h, h_prev):
    """Cosine similarity of two hidden states per row, in float32: the CPU fallback and the test oracle.

    h, h_prev: validated [N, d] float32/float16/bfloat16 (same dtype, d >= 1, rows may be strided).
    Returns float32 [N]: dot(h, h_prev) / (|h| |h_prev|) clamped to [-1, 1]; NaN where either row holds
    a NaN or an inf; 0 where either row is all zeros. Each row is first scaled by powers of two (exact)
    to a largest magnitude in [1, 2), so no square overflows or underflows at any finite magnitude
    (the kernels take that path only for rows whose one-pass sums leave [2^-60, 2^60]; scaling does not
    change the cosine). Sync-free: no data-dependent branch.
    """
    x, y = h.float(), h_prev.float()
    ax, ay = x.abs().amax(-1), y.abs().amax(-1)
    finite = torch.isfinite(x).all(-1) & torch.isfinite(y).all(-1)
    zero = (ax == 0) | (ay == 0)
    one = torch.ones_like(ax)
    ok = finite & ~zero
    xs, ys = x, y
    for s in _pow2_factors(torch.where(ok, ax, one)):
        xs = xs * s[:, None]
    for s in _pow2_factors(torch.where(ok, ay, one)):
        ys = ys * s[:, None]
    dot = (xs * ys).sum(-1)
    hh = (xs * xs).sum(-1)
    pp = (ys * ys).sum(-1)
    cos = (dot / torch.sqrt(torch.where(ok, hh * pp, one))).clamp(-1.0, 1.0)
    cos = torch.where(zero, torch.zeros_like(cos), cos)
    return torch.where(finite, cos, torch.full_like(cos, math.nan))
