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

from earlyexit.ops.measures import HEAD_MEASURES, STATISTICS
from earlyexit.ops.reference import finalize_stats, softmax_stats


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    lib = ctypes.CDLL(
        build_harness(tmp_path_factory.mktemp("stats") / "libstats.so", ["tests/stats_harness.cpp"], shared=True)
    )
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.fold.argtypes = [ptr, ptr, i64, ctypes.c_int, ctypes.c_int, ctypes.c_bool, ctypes.c_float, ptr]
    lib.fold_stats.argtypes = [ptr, ptr, i64, ctypes.c_int, ptr, ptr, ptr]
    return lib


def _order(z, order):
    return z.float().contiguous(), (torch.arange(z.numel()) if order is None else order).to(torch.int64).contiguous()


@pytest.fixture(scope="module")
def fold(lib):
    def run(z, parts, statistic, exit_above, threshold, order=None):
        """The header's finalized outputs: token, confidence, max_prob, margin, entropy, lse, exit."""
        z, order = _order(z, order)
        out = torch.empty(7)
        lib.fold(z.data_ptr(), order.data_ptr(), z.numel(), parts, statistic, exit_above, threshold, out.data_ptr())
        return out

    return run


@pytest.fixture(scope="module")
def fold_stats(lib):
    def run(z, parts, order=None):
        """The header's merged statistics in ExitStats order (what exit_stats writes)."""
        z, order = _order(z, order)
        f, idx, bad = torch.empty(4), torch.empty(1, dtype=torch.int64), torch.empty(1, dtype=torch.bool)
        lib.fold_stats(z.data_ptr(), order.data_ptr(), z.numel(), parts, f.data_ptr(), idx.data_ptr(), bad.data_ptr())
        return f[0], idx[0], f[1], f[2], f[3], bad[0]

    return run


def reference(z, measure, threshold):
    stats = softmax_stats(z.float()[None], 0)
    token, exit_, conf, max_prob, margin, entropy, lse = finalize_stats(stats, torch.tensor([threshold]), measure)
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
    for measure, spec in HEAD_MEASURES.items():
        want = reference(z, measure, 0.3)
        for order in (torch.arange(z.numel()), torch.randperm(z.numel(), generator=g)):
            got = fold(z, parts, spec.code, spec.exit_above, 0.3, order)
            assert got[0] == want[0], f"token {got[0]} != {want[0]}"
            assert got[6] == want[6], "exit decision"
            lse_scale = 1.0 + (abs(want[5].item()) if math.isfinite(want[5].item()) else 0.0)
            torch.testing.assert_close(got[1:5], want[1:5], rtol=0, atol=2e-5, equal_nan=True)
            torch.testing.assert_close(got[5:6], want[5:6], rtol=0, atol=2e-6 * lse_scale, equal_nan=True)


@pytest.mark.parametrize("parts", [1, 8, 33])
@pytest.mark.parametrize("name,z", list(cases()), ids=[c[0] for c in cases()])
def test_merged_stats_match_reference_softmax_stats(fold_stats, name, z, parts):
    """What exit_stats writes: max_logit, argmax and second_logit exact, the sums up to rounding order.
    A row without a finite logit is valid here (max -inf, sums 0, argmax its first column)."""
    want = [x[0] for x in softmax_stats(z.float()[None], 0)]
    g = torch.Generator().manual_seed(parts)
    for order in (torch.arange(z.numel()), torch.randperm(z.numel(), generator=g)):
        m, idx, second, s, t, bad = fold_stats(z, parts, order)
        assert bad == want[5]
        if bad:
            continue  # the other fields of an invalid row are unspecified
        assert m == want[0] and idx == want[1] and second == want[2]
        # One running float32 sum per partial (thousands of terms in the 1-part case) vs torch's pairwise sum.
        torch.testing.assert_close(s, want[3], rtol=1e-4, atol=0)
        torch.testing.assert_close(t, want[4], rtol=1e-4, atol=1e-5)


def test_tied_large_logits_finalize_exactly(fold):
    """Two tied logits at 2e4: probabilities from the sums, not exp(z - lse), so no ulp of lse leaks in."""
    z = torch.tensor([3.0, 2e4, -7.0, 2e4, 1.0, 2e4 - 200])
    token, _, max_prob, margin, entropy, lse, _ = fold(z, 3, HEAD_MEASURES["max_prob"].code, True, 0.5).tolist()
    assert token == 1
    assert abs(max_prob - 0.5) <= 1e-6
    assert margin == 0.0
    assert abs(entropy - math.log(2)) <= 1e-6
    assert abs(lse - (2e4 + math.log(2))) <= 2e-3  # one float32 ulp at 2e4


@pytest.mark.parametrize("statistic", range(len(STATISTICS)), ids=STATISTICS)
def test_exit_direction_is_the_callers(fold, statistic):
    """The header knows no measure: any statistic exits above or below the threshold as asked."""
    z = torch.tensor([0.0, 1.0, 2.0])
    value = fold(z, 1, statistic, True, 0.0)[1].item()
    for exit_above in (True, False):
        for threshold, want in ((value - 1e-3, exit_above), (value + 1e-3, not exit_above)):
            out = fold(z, 1, statistic, exit_above, threshold)
            assert out[1].item() == value and bool(out[6]) == want, (exit_above, threshold)
