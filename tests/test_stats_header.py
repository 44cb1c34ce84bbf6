"""csrc/exit_check_stats.h on the host: the online statistics (push_logit, merge_stats, finalize_stats)
that the CUDA kernels run per warp, slice and row, checked against the reference on CPU-only machines.

Columns arrive in a shuffled order and are split over several partials, as the decode kernel's warps
and slices see them, so the index tie-break and the order-free merge are exercised too.
"""

import ctypes
import math

import pytest
import torch
from host_build import build_harness

from earlyexit.reference import MEASURES, finalize_stats, softmax_stats


@pytest.fixture(scope="module")
def fold(tmp_path_factory):
    lib = build_harness(tmp_path_factory.mktemp("stats") / "libstats.so", ["tests/stats_harness.cpp"], shared=True)
    f = ctypes.CDLL(lib).fold
    f.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_void_p,
    ]

    def run(z, parts, measure, threshold, order):
        z = z.float().contiguous()
        order = order.to(torch.int64).contiguous()
        out = torch.empty(7)
        f(z.data_ptr(), order.data_ptr(), z.numel(), parts, MEASURES.index(measure), threshold, out.data_ptr())
        return out

    return run


def reference(z, measure, threshold):
    stats = softmax_stats(z.float()[None], 0)
    token, exit_, conf, max_prob, margin, entropy, lse = finalize_stats(
        stats, torch.tensor([True]), torch.tensor([threshold]), measure
    )
    return torch.tensor([token.item(), conf.item(), max_prob.item(), margin.item(), entropy.item(), lse.item(), exit_])


def cases():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5003, generator=g) * 3
    masked = z.clone()
    masked[::3] = -math.inf
    ties = torch.zeros(700)
    ties[[650, 40, 41]] = 5.0
    dup_top2 = torch.zeros(50)
    dup_top2[[3, 30]] = 2.0  # top-1 equals top-2: margin 0
    yield "random", z
    yield "masked", masked
    yield "ties", ties
    yield "dup_top2", dup_top2
    yield "huge", torch.randn(1000, generator=g) * 1e4
    yield "single", torch.tensor([0.7])
    yield "nan", torch.tensor([1.0, math.nan, 2.0])
    yield "posinf", torch.tensor([1.0, math.inf])
    yield "all_masked", torch.full((9,), -math.inf)


@pytest.mark.parametrize("parts", [1, 8, 33])
@pytest.mark.parametrize("name,z", list(cases()), ids=[c[0] for c in cases()])
def test_online_stats_match_reference(fold, name, z, parts):
    g = torch.Generator().manual_seed(parts)
    for measure in MEASURES:
        want = reference(z, measure, 0.3)
        for order in (torch.arange(z.numel()), torch.randperm(z.numel(), generator=g)):
            got = fold(z, parts, measure, 0.3, order)
            assert got[0] == want[0], f"token {got[0]} != {want[0]}"
            assert got[6] == want[6], "exit decision"
            lse_scale = 1.0 + (abs(want[5].item()) if math.isfinite(want[5].item()) else 0.0)
            torch.testing.assert_close(got[1:5], want[1:5], rtol=0, atol=2e-5, equal_nan=True)
            torch.testing.assert_close(got[5:6], want[5:6], rtol=0, atol=2e-6 * lse_scale, equal_nan=True)
