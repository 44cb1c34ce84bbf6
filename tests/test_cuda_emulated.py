"""The CUDA exit-check kernels, run unchanged on the host emulator (tests/cuda_emu), without a GPU.

The harness launches decode_kernel, decode_mma_kernel (its mma.sync emulated as the PTX ISA defines the
fragments) and the chunked path's normalize / chunk_stats kernels with the grids of
csrc/cuda/exit_check_plan.h for an H200's 132 SMs and shared memory, so every block, slice and merge
of a real launch runs. Checked here:
- the outputs against the float64 ground truth under the contract suite's tolerances
  (tests/exit_check_oracle.py), for every path, dtype and odd shape, and the edge cases of that suite;
- the same bits whatever the order of blocks and threads between barriers (a missing __syncthreads
  or an order-dependent merge would differ) and on a second call (the merge counters reset);
- no out-of-bounds, misaligned or overflowing access (AddressSanitizer and UBSan build);
- that the emulator reports the faults it is there for (tests/cuda_emu/emu_selftest.cpp).
What only a GPU shows (timing, the memory model between blocks, the real mma unit's rounding,
compute-sanitizer's racecheck) stays with benchmarks/gpu_check.sh.
"""

import math
import subprocess

import pytest
import torch
from cuda_emulator import H200, EmulatorError, build_emulated, emulated_exit_check, harness_fixtures
from exit_check_oracle import check_against_truth, logits_float64, make_inputs, stats_from_logits
from test_exit_check import DTYPES

from earlyexit import finalize_exit_stats

HARNESS = "tests/cuda_emu/exit_check_emu.cpp"


emu, emu_sanitized, run = harness_fixtures(HARNESS, emulated_exit_check)


# (N, d, V): every decode row group (1, 2, 4, 8 rows) and tensor-core token tile (8, 16, 32, 64 rows), d
# that allows 16-byte loads or not (57, 100: the FMA kernel for every dtype), V below and above the
# number of slices, and the chunked path past 64 rows.
SHAPES = [
    (1, 64, 1),
    (1, 96, 1000),
    (2, 57, 111),
    (3, 128, 2047),
    (5, 64, 300),
    (8, 100, 777),
    (9, 64, 500),
    (17, 57, 333),
    (30, 128, 260),
    (64, 64, 129),
    (70, 57, 111),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,d,v", SHAPES)
def test_matches_float64_ground_truth(run, dtype, n, d, v):
    hidden, weight, norm_weight, bias = make_inputs(n, d, v, dtype, "cpu")
    res, plan = run(hidden, weight, 0.3, norm_weight=norm_weight, bias=bias)
    check_against_truth(res, hidden, weight, norm_weight, bias, thr=0.3)
    aligned = d % 8 == 0 and dtype != torch.float32
    want = "normalize_kernel" if n > 64 else "decode_mma_kernel" if aligned else "decode_kernel "
    assert plan.startswith(want), plan


@pytest.mark.parametrize(
    "dtype,n,d,v,path",
    [
        (torch.float32, 3, 96, 1000, "decode"),
        (torch.bfloat16, 8, 64, 700, "decode"),
        (torch.float16, 5, 64, 1000, "mma"),
        (torch.bfloat16, 40, 128, 900, "mma"),
        (torch.float16, 70, 64, 300, "chunked"),
    ],
)
def test_same_bits_in_every_schedule_and_call(run, dtype, n, d, v, path):
    hidden, weight, norm_weight, bias = make_inputs(n, d, v, dtype, "cpu")
    first, _ = run(hidden, weight, 0.5, norm_weight=norm_weight, bias=bias, path=path, calls=2)
    for order in (1, 2):
        res, _ = run(hidden, weight, 0.5, norm_weight=norm_weight, bias=bias, path=path, order=order)
        for a, b in zip(first, res):
            assert torch.equal(a, b), f"order {order}"


@pytest.mark.parametrize(
    "dtype,n,d,v,path,kw",
    [
        (torch.float32, 3, 57, 300, "decode", {}),
        (torch.bfloat16, 2, 64, 300, "decode", {"weight_shift": 1}),
        (torch.float16, 9, 64, 500, "mma", {"hidden_stride": 72, "weight_stride": 80}),
        (torch.bfloat16, 1, 64, 100, "mma", {}),
        (torch.float32, 66, 40, 200, "chunked", {"weight_stride": 41}),
    ],
)
def test_sanitized_no_bad_access(emu_sanitized, tmp_path, dtype, n, d, v, path, kw):
    hidden, weight, norm_weight, bias = make_inputs(n, d, v, dtype, "cpu")
    res, _ = emulated_exit_check(
        emu_sanitized, str(tmp_path / "case"), hidden, weight, 0.5, norm_weight=norm_weight, bias=bias, path=path, **kw
    )
    check_against_truth(res, hidden, weight, norm_weight, bias, thr=0.5)


def test_strides_and_misaligned_weight_take_the_scalar_paths(run):
    hidden, weight, norm_weight, bias = make_inputs(9, 64, 400, torch.bfloat16, "cpu")
    res, plan = run(hidden, weight, 0.5, norm_weight=norm_weight, bias=bias, weight_shift=1)
    assert plan.startswith("decode_kernel RG=8 VEC=1"), plan
    check_against_truth(res, hidden, weight, norm_weight, bias, thr=0.5)
    res, plan = run(hidden, weight, 0.5, norm_weight=norm_weight, bias=bias, hidden_stride=70, weight_stride=72)
    assert plan.startswith("decode_kernel RG=8 VEC=8"), plan  # the hidden rows are not 16-byte aligned
    check_against_truth(res, hidden, weight, norm_weight, bias, thr=0.5)


def test_large_d_shrinks_row_groups_and_stages_k_chunks(run):
    # float32, d = 8192: 8 rows do not fit in an H200's shared memory, so the plan halves the group.
    hidden, weight, norm_weight, _ = make_inputs(8, 8192, 40, torch.float32, "cpu", bias=False)
    res, plan = run(hidden, weight, 0.5, norm_weight=norm_weight)
    assert plan.startswith("decode_kernel RG=4"), plan
    check_against_truth(res, hidden, weight, norm_weight, None, thr=0.5)
    # float32, d = 6976: 8 rows (223232 bytes) fit the opt-in limit less the arrays' 8192 bytes, but not less
    # the static shared memory an sm_90 build reports (with its flags and 1 KiB reservation): the plan
    # takes the budget as the runtime reports it, so the group halves rather than the launch failing.
    hidden, weight, _, _ = make_inputs(8, 6976, 40, torch.float32, "cpu", norm=False, bias=False)
    res, plan = run(hidden, weight, 0.5)
    assert plan.startswith("decode_kernel RG=4"), plan
    check_against_truth(res, hidden, weight, None, None, thr=0.5)
    # bf16, 40 rows (64 padded) x d = 2048 exceed it too: the tensor-core kernel stages K chunks per round.
    hidden, weight, norm_weight, bias = make_inputs(40, 2048, 50, torch.bfloat16, "cpu")
    res, plan = run(hidden, weight, 0.5, norm_weight=norm_weight, bias=bias)
    kc = int(plan.split("kc=")[1].split()[0])
    assert plan.startswith("decode_mma_kernel NT=8") and kc < 2048, plan
    check_against_truth(res, hidden, weight, norm_weight, bias, thr=0.5)


def test_chunked_path_over_several_chunks(run):
    # 1100 rows: the plan's 16 MiB chunk is 3712 columns, so V = 4000 takes two chunks.
    hidden, weight, _, bias = make_inputs(1100, 16, 4000, torch.float32, "cpu", norm=False)
    res, plan = run(hidden, weight, 0.2, bias=bias)
    assert "chunks=2" in plan, plan
    check_against_truth(res, hidden, weight, None, bias, thr=0.2)


def test_fewer_sms_fewer_slices(run):
    hidden, weight, norm_weight, bias = make_inputs(3, 64, 3000, torch.float16, "cpu")
    for device in ({"sms": 1, "smem_optin": H200["smem_optin"]}, {"sms": 7, "smem_optin": 101376}):
        for path in ("decode", "mma"):
            res, plan = run(hidden, weight, 0.5, norm_weight=norm_weight, bias=bias, path=path, device=device)
            check_against_truth(res, hidden, weight, norm_weight, bias, thr=0.5)
            # Decode: one row group, at most 4 blocks per SM; tensor cores: at most one block per SM.
            grid = plan.split("grid=")[1].split()[0]
            slices = int(grid.split("x")[1]) if path == "decode" else int(grid)
            assert slices <= (4 if path == "decode" else 1) * device["sms"], plan


@pytest.mark.parametrize("measure", ["max_prob", "margin", "entropy"])
@pytest.mark.parametrize("path", ["decode", "mma", "chunked"])
def test_measures_temperature_and_head_variants(run, measure, path):
    n = 70 if path == "chunked" else 6
    hidden, weight, norm_weight, bias = make_inputs(n, 64, 257, torch.bfloat16, "cpu")
    head = {"norm_offset": 1.0, "softcap": 3.0}
    # Thresholds just above or below each row's true statistic, alternating: both decisions occur.
    truth = stats_from_logits(logits_float64(hidden, weight, norm_weight, bias, 0.7, **head))[measure].float()
    thr = truth * torch.tensor([0.9, 1.1]).repeat(n // 2)
    res, _ = run(
        hidden, weight, thr, norm_weight=norm_weight, bias=bias, temperature=0.7, measure=measure, path=path, **head
    )
    check_against_truth(res, hidden, weight, norm_weight, bias, 0.7, measure, thr=thr, **head)
    assert 0 < res.exit.sum() < n


@pytest.mark.parametrize("path", ["decode", "mma", "chunked"])
def test_nonfinite_rows_and_weights(run, path):
    n = 70 if path == "chunked" else 8
    hidden, weight, norm_weight, bias = make_inputs(n, 64, 300, torch.float16, "cpu")
    clean, _ = run(hidden, weight, 0.0, norm_weight=norm_weight, bias=bias, path=path)
    dirty = hidden.clone()
    dirty[1, 3], dirty[4, 0], dirty[6, 10] = math.nan, math.inf, -math.inf
    res, _ = run(dirty, weight, 0.0, norm_weight=norm_weight, bias=bias, path=path)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[[1, 4, 6]] = True
    assert not res.exit[bad].any() and (res.token[bad] == -1).all() and res.confidence[bad].isnan().all()
    for a, c in zip(res, clean):
        assert torch.equal(a[~bad], c[~bad])
    w = weight.clone()
    w[123, 5] = math.nan
    res, _ = run(hidden, w, 0.0, norm_weight=norm_weight, bias=bias, path=path)
    assert not res.exit.any() and (res.token == -1).all()
    masked = bias.clone()
    masked[:299] = -math.inf  # only column 299 is left
    res, _ = run(hidden, weight, 0.5, norm_weight=norm_weight, bias=masked, path=path)
    assert (res.token == 299).all() and (res.max_prob == 1).all() and res.exit.all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("path", ["decode", "mma"])
def test_exact_ties_pick_the_lowest_index_across_slices(run, dtype, path):
    if path == "mma" and dtype == torch.float32:
        pytest.skip("the tensor-core kernel takes 16-bit rows")
    d, v = 16, 3000  # tied columns land in different slices and warps
    signs = torch.randint(0, 2, (1, d)) * 2 - 1
    hidden = (signs * torch.randint(1, 3, (1, d))).to(dtype)
    weight = torch.randint(-1, 2, (v, d)).to(dtype)
    weight[[2999, 1700, 41]] = (3 * signs).to(dtype)
    res, _ = run(hidden, weight, 0.0, path=path)
    assert res.token.item() == 41 and res.margin.item() == 0.0
    assert abs(res.max_prob.item() - 1 / 3) < 1e-6


@pytest.mark.parametrize("path", ["decode", "mma", "chunked"])
def test_stats_mode_finalizes_to_the_check(run, path):
    n = 65 if path == "chunked" else 4
    hidden, weight, norm_weight, bias = make_inputs(n, 64, 500, torch.bfloat16, "cpu")
    hidden[2, 0] = math.nan
    stats, _ = run(hidden, weight, norm_weight=norm_weight, bias=bias, path=path, stats=True)
    check, _ = run(hidden, weight, 0.4, norm_weight=norm_weight, bias=bias, path=path)
    final = finalize_exit_stats(stats, 0.4)  # the token and decision exactly, the statistics to rounding
    assert torch.equal(final.token, check.token) and torch.equal(final.exit, check.exit)
    for a, b in zip(final[2:], check[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert stats.invalid[2] and stats.argmax[2] == -1


def test_huge_logits(run):
    hidden, weight, _, bias = make_inputs(5, 64, 1000, torch.bfloat16, "cpu", norm=False)
    hidden = (hidden.float() * (1e4 / logits_float64(hidden, weight).abs().max().item())).to(torch.bfloat16)
    for path in ("decode", "mma"):
        res, _ = run(hidden, weight, 0.5, bias=bias, path=path)
        assert torch.isfinite(res.lse).all() and res.lse.abs().max() > 1e3
        check_against_truth(res, hidden, weight, None, bias, thr=0.5)


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    d = tmp_path_factory.mktemp("emu_self")
    return (
        build_emulated(d / "fast", "tests/cuda_emu/emu_selftest.cpp"),
        build_emulated(d / "asan", "tests/cuda_emu/emu_selftest.cpp", sanitized=True),
    )


def _selftest(exe, kernel, order=0):
    return subprocess.run([exe, kernel, str(order)], capture_output=True, text=True, timeout=60)


def test_emulator_reports_the_faults_it_is_for(selftest):
    fast, asan = selftest
    good = [_selftest(fast, "block_sum", order) for order in (0, 1, 2)]
    assert all(r.returncode == 0 for r in good) and len({r.stdout for r in good}) == 1
    assert float(good[0].stdout.split()[0]) == sum(range(64))
    racy = {_selftest(fast, "missing_barrier", order).stdout for order in (0, 1)}
    assert len(racy) == 2, "a missing __syncthreads must change the result with the schedule"
    hang = _selftest(fast, "divergent_shuffle")
    assert hang.returncode == 2 and "deadlock" in hang.stderr
    exited = _selftest(fast, "shuffle_after_exit")
    assert exited.returncode == 2 and "lanes exited" in exited.stderr
    oob = _selftest(asan, "out_of_bounds")
    assert oob.returncode != 0 and "heap-buffer-overflow" in oob.stderr
    assert _selftest(asan, "block_sum").returncode == 0


def test_a_fault_is_an_error_not_a_result(run):
    # An emulator fault reaches the caller as EmulatorError (here: a shared-memory budget no plan fits).
    hidden, weight, _, _ = make_inputs(2, 64, 100, torch.float32, "cpu", norm=False, bias=False)
    with pytest.raises(EmulatorError, match="do not fit"):
        run(hidden, weight, 0.5, path="decode", device={"sms": 132, "smem_optin": 4096})
