"""Pure-PyTorch references for every op: the CPU fallback and the test oracle.

The exit check here computes exactly what the fused kernels compute (same rounding points:
RMSNorm in float32, the normalized row rounded to the weight dtype as an MMA operand, float32
accumulation), but in vocabulary chunks so its extra memory is O(N * chunk), never O(N * V).
"""

import math

import torch

MEASURES = ("max_prob", "margin", "entropy")

#: Vocabulary columns per chunk of the reference exit check.
REFERENCE_CHUNK = 8192


def rms_normalize(hidden, norm_weight, eps):
    """RMSNorm of float32 rows as LlamaRMSNorm computes it: x * rsqrt(mean(x^2) + eps) * w.

    hidden: [N, d] float32. norm_weight: [d] any float dtype. Returns [N, d] float32.
    """
    inv = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return hidden * inv * norm_weight.float()


def softmax_stats(z, col0):
    """Statistics of one [N, C] float32 logits chunk whose first column is vocabulary index col0.

    Returns (m, s, t, top1, idx, top2, bad): running max m, s = sum exp(z - m),
    t = sum exp(z - m) * (z - m), the top-2 values with the (lowest) index of the top-1,
    and bad = any NaN or +inf. -inf logits contribute nothing; an all -inf row has m = -inf, s = 0.
    """
    bad = (torch.isnan(z) | (z == math.inf)).any(-1)
    top1, arg = z.max(-1)  # first occurrence on ties
    # torch.max returns NaN where present; those rows are flagged bad and never used.
    z2 = z.scatter(-1, arg[:, None], -math.inf)
    top2 = z2.max(-1).values
    m_safe = torch.where(top1 == -math.inf, torch.zeros_like(top1), top1)
    shifted = z - m_safe[:, None]
    e = torch.exp(shifted)
    s = e.sum(-1)
    t = torch.where(z == -math.inf, torch.zeros_like(e), e * shifted).sum(-1)
    return top1, s, t, top1, arg + col0, top2, bad


def merge_stats(a, b):
    """Merge two stats tuples of disjoint vocabulary ranges; ``a`` must hold the lower indices."""
    am, as_, at, a1, ai, a2, abad = a
    bm, bs, bt, b1, bi, b2, bbad = b
    m = torch.maximum(am, bm)
    m_safe = torch.where(m == -math.inf, torch.zeros_like(m), m)

    def rescale(mx, s, t):
        alpha = torch.exp(mx - m_safe)
        # s == 0 means "nothing seen yet": skip it so that 0 * (-inf) never makes a NaN.
        t_new = torch.where(s > 0, alpha * (t + s * (mx - m_safe)), torch.zeros_like(t))
        return alpha * s, t_new

    sa, ta = rescale(am, as_, at)
    sb, tb = rescale(bm, bs, bt)
    b_wins = b1 > a1  # strict: ties keep the lower index
    top1 = torch.where(b_wins, b1, a1)
    idx = torch.where(b_wins, bi, ai)
    top2 = torch.where(b_wins, torch.maximum(a1, b2), torch.maximum(a2, b1))
    return m, sa + sb, ta + tb, top1, idx, top2, abad | bbad


def finalize_stats(stats, hidden_finite, threshold, measure):
    """Turn merged stats into the exit-check outputs.

    Returns (token int64, exit bool, confidence, max_prob, margin, entropy, lse) all [N].
    Rows with a non-finite hidden state, a NaN/+inf logit, or no finite logit at all are invalid:
    exit False, token -1 and NaN statistics.
    """
    m, s, t, top1, idx, top2, bad = stats
    log_s = torch.log(s)
    lse = m + log_s
    entropy = log_s - t / s
    max_prob = torch.exp(top1 - lse)
    margin = max_prob - torch.exp(top2 - lse)
    valid = hidden_finite & ~bad & torch.isfinite(lse)
    nan = torch.full_like(lse, math.nan)
    lse, entropy, max_prob, margin = (torch.where(valid, x, nan) for x in (lse, entropy, max_prob, margin))
    token = torch.where(valid, idx, torch.full_like(idx, -1))
    if measure == "max_prob":
        confidence, exit_ = max_prob, max_prob >= threshold
    elif measure == "margin":
        confidence, exit_ = margin, margin >= threshold
    else:
        confidence, exit_ = entropy, entropy <= threshold
    # confidence is returned beside the statistic it copies: outputs of an op may not alias.
    return token, exit_ & valid, confidence.clone(), max_prob, margin, entropy, lse


def exit_check_reference(
    hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature, chunk=REFERENCE_CHUNK
):
    """Reference fused exit check on validated 2-D inputs.

    hidden: [N, d] float32/float16/bfloat16 (row stride free). weight: [V, d] same dtype.
    threshold: [N] float32. norm_weight: [d] or None. bias: [V] or None.
    Returns the seven output tensors of :func:`earlyexit.exit_check` for N rows, on hidden's device.
    """
    v = weight.shape[0]
    x = hidden.float()
    hidden_finite = torch.isfinite(x).all(-1)
    if norm_weight is not None:
        x = rms_normalize(x, norm_weight, norm_eps)
    # The kernels feed the normalized row to the MMA in the weight's dtype: round the same way.
    x = x.to(weight.dtype).float()
    stats = None
    for v0 in range(0, v, chunk):
        z = x @ weight[v0 : v0 + chunk].float().T
        if bias is not None:
            z = z + bias[v0 : v0 + chunk].float()
        z = z / temperature
        part = softmax_stats(z, v0)
        stats = part if stats is None else merge_stats(stats, part)
    if stats is None:  # V == 0 is rejected by validation; keep the reference total anyway.
        raise ValueError("weight: expected at least one vocabulary row")
    return finalize_stats(stats, hidden_finite, threshold, measure)


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
