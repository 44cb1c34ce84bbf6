"""Ground truth (float64) and the naive same-dtype torch computation for exit-check tests.

Tolerance scheme (from Cut Cross-Entropy): a backend's error against the float64 ground truth may
exceed the error of plain torch in the same dtype by at most tol(dtype).
"""

import math

import torch

from earlyexit.ops.measures import get_measure

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
STATS = ("max_prob", "margin", "entropy", "lse")


def _softcap(z, softcap):
    # Finite logits only: a -inf (masked) column stays masked, as the op documents.
    return z if softcap is None else torch.where(torch.isfinite(z), softcap * torch.tanh(z / softcap), z)


def logits_float64(
    hidden, weight, norm_weight=None, bias=None, temperature=1.0, eps=1e-6, norm_offset=0.0, softcap=None
):
    """[N, V] float64 logits of 2-D hidden rows: the ground truth."""
    x = hidden.double()
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (norm_offset + norm_weight.double())
    z = x @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return _softcap(z, softcap) / temperature


def logits_naive(hidden, weight, norm_weight=None, bias=None, temperature=1.0, eps=1e-6, norm_offset=0.0, softcap=None):
    """[N, V] float32 logits computed as an eager HF model does, in the input dtype (softcap in float32)."""
    x = hidden
    if norm_weight is not None:
        xf = x.float()
        scale = (norm_offset + norm_weight.float()).to(hidden.dtype)
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype) * scale
    z = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(hidden.dtype))
    return _softcap(z.float(), softcap) / temperature


def stats_from_logits(z):
    """Dict of token/max_prob/margin/entropy/lse (float64) from full [N, V] logits."""
    z = z.double()
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse[:, None])
    top = torch.topk(p, min(2, z.shape[1]), dim=-1).values
    max_prob = top[:, 0]
    margin = max_prob - top[:, 1] if z.shape[1] > 1 else max_prob.clone()
    entropy = -torch.xlogy(p, p).sum(-1)
    return {"token": z.argmax(-1), "max_prob": max_prob, "margin": margin, "entropy": entropy, "lse": lse}


def max_err(result, truth, rows):
    """Per-statistic max abs error over the selected rows."""
    return {
        k: (getattr(result, k).double().reshape(-1)[rows] - truth[k][rows]).abs().max().item() if rows.any() else 0.0
        for k in STATS
    }


def assert_tokens_close(token, z_true, z_naive, rows, dtype):
    """Tokens must be argmax of the ground truth, except where another logit is within tolerance of the max."""
    token = token.reshape(-1)[rows]
    zt = z_true[rows]
    slack = 2 * (z_naive.double()[rows] - zt).abs().amax(-1) + TOL[dtype] * (1 + zt.abs().amax(-1))
    chosen = zt.gather(1, token[:, None].clamp(min=0))[:, 0]
    gap = zt.amax(-1) - chosen
    bad = (token < 0) | (gap > slack)
    assert not bad.any(), f"tokens off the argmax beyond tolerance at rows {bad.nonzero().flatten().tolist()[:5]}"


def expected_exit(conf, threshold, measure):
    return get_measure(measure).exits(conf, threshold)


def make_inputs(n, d, v, dtype, device, norm=True, bias=True, scale=1.0):
    """Random hidden [n, d], head weight [v, d], RMSNorm weight [d] and bias [v] (None when not asked for)."""
    hidden = (torch.randn(n, d) * scale).to(dtype).to(device)
    weight = (torch.randn(v, d) / math.sqrt(d) * 4).to(dtype).to(device)
    norm_weight = (torch.rand(d) + 0.5).to(dtype).to(device) if norm else None
    b = torch.randn(v).to(dtype).to(device) if bias else None
    return hidden, weight, norm_weight, b


def check_against_truth(res, hidden, weight, norm_weight, bias, temperature=1.0, measure="max_prob", thr=None, **head):
    """Asserts the tolerance contract for every statistic, the tokens and the exit decisions.

    head: norm_offset / softcap, as given to the op."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    z_true = logits_float64(h2, weight, norm_weight, bias, temperature, **head)
    z_naive = logits_naive(h2, weight, norm_weight, bias, temperature, **head)
    truth = stats_from_logits(z_true)
    naive = stats_from_logits(z_naive)
    rows = torch.isfinite(truth["lse"])
    err = max_err(res, truth, rows)
    err_naive = {k: (naive[k][rows] - truth[k][rows]).abs().max().item() if rows.any() else 0.0 for k in STATS}
    tol = TOL[hidden.dtype]
    lse_scale = 1.0 + (truth["lse"][rows].abs().max().item() if rows.any() else 0.0)
    for k in STATS:
        allowed = err_naive[k] + tol * (lse_scale if k == "lse" else 1.0)
        assert err[k] <= allowed, f"{k}: err {err[k]:.3g} > naive {err_naive[k]:.3g} + tol"
    assert_tokens_close(res.token, z_true, z_naive, rows, hidden.dtype)
    if thr is not None:
        conf = getattr(res, measure)  # the ExitResult field of each head measure is named after it
        assert torch.equal(res.confidence, conf)
        want = expected_exit(res.confidence, thr, measure) & torch.isfinite(res.lse)
        assert torch.equal(res.exit, want)
