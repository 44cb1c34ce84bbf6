"""The CUDA state-similarity kernel, run unchanged on the host emulator (tests/cuda_emu), without a GPU.

The harness launches state_similarity_kernel (csrc/cuda/state_similarity_kernels.cuh) with the launcher's
grid and its choice between the 16-byte and the per-element path, so every warp of every block runs,
the last block's idle warps included. Checked here, as the contract suite checks the other backends
(tests/state_similarity_oracle.py): the float64 ground truth over dtypes and odd shapes, both load paths,
strided and misaligned rows, non-finite, zero, huge and subnormal-scale rows (the warp-uniform rescue
branch); the same bits under every block and thread order; and no out-of-bounds, misaligned or
overflowing access in an AddressSanitizer/UBSan build.
"""

import math

import pytest
import torch
from cuda_emulator import emulated_state_similarity, harness_fixtures
from state_similarity_oracle import check_against_truth, make_pair, poison_rows
from test_state_similarity import DTYPE_IDS, DTYPES, SHAPES

HARNESS = "tests/cuda_emu/state_similarity_emu.cpp"


emu, emu_sanitized, run = harness_fixtures(HARNESS, emulated_state_similarity)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_matches_float64_ground_truth(run, dtype, n, d):
    h, p = make_pair(n, d, dtype, "cpu")
    got, plan = run(h, p)
    assert got.shape == (n,)
    check_against_truth(got, h, p)
    if n:
        # The launcher's rule: 16-byte loads when d (and the aligned, contiguous rows) allow them.
        assert ("vec=1" in plan) == ((d * h.element_size()) % 16 == 0), plan
        assert f"grid={-(-n // 8)} " in plan, plan


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_both_load_paths_agree_with_the_truth(run, dtype):
    h, p = make_pair(19, 256, dtype, "cpu")
    vec, plan_v = run(h, p, path="vector")
    scalar, plan_s = run(h, p, path="scalar")
    assert "vec=1" in plan_v and "vec=0" in plan_s
    check_against_truth(vec, h, p)
    check_against_truth(scalar, h, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_and_misaligned_rows(run, dtype):
    h, p = make_pair(11, 96, dtype, "cpu")
    want, _ = run(h, p)
    strided, plan = run(h, p, h_stride=104, p_stride=96 + 8)
    assert "vec=1" in plan, plan  # strides of 16-byte multiples keep the vector path
    assert torch.equal(strided, want), "a row stride changed the bits"
    shifted, plan = run(h, p, shift=1)
    assert "vec=0" in plan, plan  # rows off 16-byte alignment take the per-element path
    check_against_truth(shifted, h, p)
    odd, plan = run(h, p, h_stride=97, p_stride=101)
    assert "vec=0" in plan, plan
    assert torch.equal(odd, shifted), "the per-element path depends on the row stride"


@pytest.mark.parametrize("order", [1, 2])
def test_same_bits_in_every_schedule(run, order):
    h, p = make_pair(70, 4096, torch.float32, "cpu")
    first, _ = run(h, p, order=0)
    again, _ = run(h, p, order=order)
    assert torch.equal(first, again), "block or thread order changed a result"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_and_zero_rows(run, dtype):
    h, p = make_pair(12, 96, dtype, "cpu")
    clean, _ = run(h, p)
    h, p, rows = poison_rows(h, p)
    h[9] = 0
    p[10] = -0.0
    got, _ = run(h, p)
    bad = torch.zeros(12, dtype=torch.bool)
    bad[rows] = True
    zero = torch.zeros(12, dtype=torch.bool)
    zero[[9, 10]] = True
    assert got[bad].isnan().all()
    assert (got[zero] == 0).all()
    keep = ~(bad | zero)
    assert torch.equal(got[keep], clean[keep]), "a bad row disturbed its warp's neighbours"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [57, 4096])
def test_huge_and_tiny_magnitudes(run, dtype, d):
    """Rows whose float32 squares overflow or underflow take the rescue path: their true cosines."""
    h, p = make_pair(6, d, dtype, "cpu")
    k = torch.tensor([100, 100, 0, -100, -126, 120], dtype=torch.float64)[:, None]
    kp = torch.tensor([100, 0, 100, -100, -70, 2], dtype=torch.float64)[:, None]
    hs, ps = (h.double() * 2**k).to(dtype), (p.double() * 2**kp).to(dtype)  # exact powers of two
    nh, np_ = (hs.double() * 2**-k).to(dtype), (ps.double() * 2**-kp).to(dtype)
    got, _ = run(hs, ps)
    assert torch.isfinite(got).all() and (got.abs() > 0).all()
    check_against_truth(got, hs, ps, naive_inputs=(nh, np_))


def test_identical_rows_give_one(run):
    h, _ = make_pair(9, 4096, torch.float32, "cpu")
    same, _ = run(h, h)
    opp, _ = run(h, -h)
    assert ((same <= 1) & (same >= 1 - 1e-6)).all(), same
    assert ((opp >= -1) & (opp <= -1 + 1e-6)).all(), opp


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d,kw", [(9, 64, {}), (17, 57, {}), (5, 96, {"shift": 1}), (3, 40, {"h_stride": 43})])
def test_sanitized_no_bad_access(emu_sanitized, tmp_path, dtype, n, d, kw):
    h, p = make_pair(n, d, dtype, "cpu")
    h[0, 0] = math.inf  # the rescue path's loops too
    got, _ = emulated_state_similarity(emu_sanitized, str(tmp_path / "case"), h, p, **kw)
    check_against_truth(got, h, p)
