"""Ground truth for state_similarity tests: input pairs, the float64 cosine and the tolerance contract.

Shared by tests/test_state_similarity.py (every backend) and tests/test_cuda_emulated_similarity.py (the
CUDA kernel on the host emulator). Accuracy follows the exit check's scheme (tests/exit_check_oracle.py):
against a float64 ground truth, a result's error may exceed the error of plain torch in the same dtype
(F.cosine_similarity) by at most TOL[dtype].
"""

import math

import torch
import torch.nn.functional as F
from exit_check_oracle import TOL


def make_pair(n, d, dtype, device, scale=1.0):
    """Row pairs with a spread of similarities: h_prev = a h + b noise, per-row a (some negative) and b."""
    h = torch.randn(n, d)
    a = torch.linspace(-1.0, 2.0, n)[:, None] if n else torch.zeros(0, 1)
    b = torch.rand(n, 1) * 1.5
    p = a * h + b * torch.randn(n, d)
    return (h * scale).to(dtype).to(device), (p * scale).to(dtype).to(device)


def truth(h, p):
    """float64 ground truth per row: NaN for non-finite rows, 0 for zero rows, else the cosine."""
    d = h.shape[-1]
    x, y = h.reshape(-1, d).double().cpu(), p.reshape(-1, d).double().cpu()
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    cos = (x * y).sum(-1) / (nx * ny)
    cos = torch.where((nx == 0) | (ny == 0), torch.zeros_like(cos), cos)
    finite = torch.isfinite(x).all(-1) & torch.isfinite(y).all(-1)
    return torch.where(finite, cos, torch.full_like(cos, math.nan))


def naive(h, p):
    """Plain torch in the input dtype, as float64 [N]."""
    d = h.shape[-1]
    return F.cosine_similarity(h.reshape(-1, d), p.reshape(-1, d), dim=-1).double().cpu()


def check_against_truth(got, h, p, naive_inputs=None):
    """The tolerance contract on the finite rows, plus NaN exactly where the truth is NaN and the range."""
    t = truth(h, p)
    g = got.reshape(-1).double().cpu()
    assert torch.equal(torch.isnan(g), torch.isnan(t)), "NaN rows differ from the ground truth's"
    rows = ~torch.isnan(t)
    if not rows.any():
        return
    assert ((g[rows] >= -1) & (g[rows] <= 1)).all(), "results outside [-1, 1]"
    err = (g[rows] - t[rows]).abs().max().item()
    nh, np_ = naive_inputs if naive_inputs is not None else (h, p)
    err_naive = (naive(nh, np_)[rows] - t[rows]).abs().max().item()
    assert err <= err_naive + TOL[h.dtype], f"err {err:.3g} > naive {err_naive:.3g} + {TOL[h.dtype]}"


def poison_rows(h, p):
    """Copies of ``h``, ``p`` [N >= 9, d >= 96] with NaN/inf in rows 1, 4, 6, 7 and an inf against a zero row in 8.

    Returns (h, p, the poisoned row indices).
    """
    h, p = h.clone(), p.clone()
    h[1, 3] = math.nan
    p[4, 0] = math.inf
    h[6, 95] = -math.inf
    h[7, 10], p[7, 11] = math.nan, math.nan
    h[8], p[8] = 0, 0
    p[8, 5] = math.inf  # inf against a zero row: still NaN
    return h, p, [1, 4, 6, 7, 8]
