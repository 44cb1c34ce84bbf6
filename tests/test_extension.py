"""The compiled extension (earlyexit._C, ops in torch.ops.earlyexit_C): build facts, the C++ op itself
(opcheck, argument checks) and the kernels' internal paths (vocabulary chunks, row blocks, slices).

The exit_check contract over every runnable backend (the "cpu" one included) lives in test_exit_check.py;
this file covers what only the extension has: the paths that only large shapes reach (several vocabulary
chunks and row blocks on CPU, decode vs chunked path on CUDA) and ties across chunk boundaries.
"""

import math
import os
import platform
import shutil

import pytest
import torch
from exit_check_oracle import TOL

import earlyexit
from earlyexit.ops import backends, exit_check
from earlyexit.ops.measures import HEAD_MEASURES, STATISTICS
from earlyexit.ops.reference import exit_stats_reference, finalize_stats

needs_ext = pytest.mark.skipif(backends.EXTENSION is None, reason="earlyexit._C is not built")
FIELDS = earlyexit.ExitResult._fields
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_op(hidden, weight, thr, norm_weight=None, bias=None, measure="max_prob", eps=1e-6, temperature=1.0):
    spec = HEAD_MEASURES[measure]
    out = torch.ops.earlyexit_C.exit_check(
        hidden, weight, thr, norm_weight, bias, spec.code, spec.exit_above, eps, temperature
    )
    return earlyexit.ExitResult(*out)


def run_stats(hidden, weight, norm_weight=None, bias=None, eps=1e-6, temperature=1.0):
    return earlyexit.ExitStats(*torch.ops.earlyexit_C.exit_stats(hidden, weight, norm_weight, bias, eps, temperature))


def assert_matches_reference(res, hidden, weight, thr, norm_weight=None, bias=None, measure="max_prob", temp=1.0):
    """Same statistics as the reference (same rounding points) up to float32 summation order."""
    ref = exit_check(
        hidden, weight, thr, measure=measure, norm_weight=norm_weight, bias=bias, temperature=temp, backend="torch"
    )
    tol = TOL[hidden.dtype] if hidden.dtype != torch.float32 else 1e-5
    assert torch.equal(res.token, ref.token)
    assert torch.equal(res.exit, ref.exit) or _exit_flips_only_at_threshold(res, ref, thr, tol)
    for k in ("confidence", "max_prob", "margin", "entropy", "lse"):
        a, b = getattr(res, k), getattr(ref, k)
        scale = 1.0 + (b.abs().nan_to_num().max().item() if k == "lse" and b.numel() else 0.0)
        torch.testing.assert_close(a, b, rtol=0, atol=tol * scale, equal_nan=True, msg=k)


def _exit_flips_only_at_threshold(res, ref, thr, tol):
    flips = res.exit != ref.exit
    return bool(((ref.confidence[flips] - thr.reshape(-1)[flips]).abs() <= tol).all())


def assert_stats_match_reference(stats, hidden, weight, norm_weight=None, bias=None, temp=1.0):
    """exit_stats against the reference statistics (same rounding points) up to float32 summation order."""
    ref = earlyexit.ExitStats(*exit_stats_reference(hidden, weight, norm_weight, bias, 1e-6, temp))
    assert torch.equal(stats.invalid, ref.invalid)
    ok = ~ref.invalid  # the other fields of an invalid row are unspecified
    assert torch.equal(stats.argmax[ok], ref.argmax[ok])
    tol = TOL[hidden.dtype]
    for k in ("max_logit", "second_logit"):
        torch.testing.assert_close(getattr(stats, k)[ok], getattr(ref, k)[ok], rtol=tol, atol=tol, msg=k)
    torch.testing.assert_close(stats.sum_exp[ok], ref.sum_exp[ok], rtol=tol, atol=0, msg="sum_exp")
    # sum_exp_z weighs each logit's error by its probability mass: bounded by sum_exp times a logit's error.
    finite_max = torch.where(ref.max_logit.isfinite(), ref.max_logit, 0.0)[ok]
    err = (stats.sum_exp_z[ok] - ref.sum_exp_z[ok]).abs()
    assert (err <= tol * ref.sum_exp[ok] * (1 + finite_max.abs())).all(), "sum_exp_z"


def assert_stats_finalize_to_exit_check(stats, res, thr, measure):
    """The two ops run one kernel: the statistics exit_stats writes finalize (in Python) to what exit_check
    finalized in C++, up to the last ulp of the two finalize codes."""
    fin = earlyexit.ExitResult(*finalize_stats(tuple(stats), thr, measure))
    assert torch.equal(fin.token, res.token)
    assert torch.equal(fin.exit, res.exit) or _exit_flips_only_at_threshold(fin, res, thr, 1e-6)
    for k in ("confidence", "max_prob", "margin", "entropy", "lse"):
        a, b = getattr(fin, k), getattr(res, k)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6, equal_nan=True, msg=k)


def test_cuda_kernels_compiled_when_toolkit_present():
    """A CUDA build of torch plus nvcc must give CUDA kernels: a silently skipped CUDA build fails here."""
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("CPU-only torch or no nvcc: the CUDA part is not expected")
    info = earlyexit.build_info()
    assert info["cpu_ext"], backends.unavailable_reason("cpu", "cpu")
    assert info["cuda_archs"], "nvcc and a CUDA torch are present but earlyexit._C has no CUDA kernels"


@needs_ext
def test_build_info_is_truthful():
    info = earlyexit.build_info()
    assert info["cpu_ext"] is True
    assert info["cuda_archs"] == [a for a in backends.EXTENSION.cuda_archs.split(";") if a]
    assert all(a.isdigit() for a in info["cuda_archs"])
    assert info["backends"]["cpu"]["cpu"] is None
    assert backends.auto_backend("cpu") == "cpu"


@needs_ext
def test_build_info_names_the_cpu_bf16_path_this_cpu_has():
    # The bf16-pair path needs AVX-512 F, BW, VL and BF16; /proc/cpuinfo says whether this CPU has them.
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    pairs = platform.machine() == "x86_64" and {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    assert earlyexit.build_info()["cpu_bf16_dots"] == ("avx512bf16" if pairs else "widen")


@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "broken"),
    [
        ("3.6.0", "2.4.6", True),
        ("3.5.1+git3e1f", "2.5.0rc1", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.1", "2.4.6", False),
        ("3.10.0", "2.4.0", False),
    ],
)
def test_interpreter_reason_names_the_numpy_bound(triton_version, numpy_version, broken):
    # Triton 3.6's interpreter raises a TypeError in every kernel under numpy 2.4 (seen with both
    # installed); the backend must say so instead of failing at the first launch.
    reason = backends.interpreter_reason(triton_version, numpy_version)
    if broken:
        assert triton_version in reason and numpy_version in reason and "numpy<2.4" in reason
    else:
        assert reason is None


@pytest.mark.parametrize(
    "archs,caps,runs",
    [
        (["80", "90"], [(8, 0)], True),
        (["80", "90"], [(8, 6)], True),  # sm_80 machine code runs on later 8.x GPUs
        (["80", "90"], [(9, 0)], True),
        (["80", "90"], [(10, 0), (12, 0)], True),  # through the compute_90 PTX
        (["80", "90"], [(7, 5)], False),  # a T4: older than every target
        (["90"], [(8, 0)], False),
        (["86", "90"], [(8, 0)], False),  # 8.6 machine code needs 8.6 or newer
        (["80", "90"], [(9, 0), (7, 0)], False),  # every visible GPU must be covered
    ],
)
def test_arch_reason_follows_cuda_compatibility(archs, caps, runs):
    # "auto" must not pick the extension on a GPU it holds no code for (the launch would fail).
    reason = backends.arch_reason(archs, caps)
    if runs:
        assert reason is None
    else:
        major, minor = caps[-1]
        assert f"sm_{major}{minor}" in reason and "EARLYEXIT_CUDA_ARCHS" in reason


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_opcheck_cpp_op(dtype):
    hidden = torch.randn(5, 57).to(dtype)
    weight = torch.randn(300, 57).to(dtype)
    thr = torch.full((5,), 0.2)
    margin = HEAD_MEASURES["margin"]
    torch.library.opcheck(
        torch.ops.earlyexit_C.exit_check.default,
        (hidden, weight, thr, torch.rand(57) + 0.5, torch.randn(300), margin.code, margin.exit_above, 1e-6, 0.7),
    )
    torch.library.opcheck(
        torch.ops.earlyexit_C.exit_stats.default, (hidden, weight, torch.rand(57) + 0.5, torch.randn(300), 1e-6, 0.7)
    )


@needs_ext
def test_cpp_checks_name_the_problem():
    h, w, thr = torch.randn(3, 8), torch.randn(11, 8), torch.zeros(3)
    cases = [
        ((h.double(), w.double(), thr), "float32, float16 or bfloat16"),
        ((h, w.half(), thr), "dtype of hidden"),
        ((h, torch.randn(11, 9), thr), r"\[V, 8\]"),
        ((h, torch.randn(8, 11).T, thr), "unit column stride"),
        ((torch.randn(8, 3).T, w, thr), "unit column stride"),
        ((h, w, torch.zeros(4)), "threshold"),
        ((h, w, torch.zeros(3, dtype=torch.float64)), "threshold"),
        ((h, torch.randn(0, 8), thr), "at least one vocabulary row"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            run_op(*args)
    with pytest.raises(RuntimeError, match="bias"):
        run_op(h, w, thr, bias=torch.randn(10))
    with pytest.raises(RuntimeError, match="norm_weight"):
        run_op(h, w, thr, norm_weight=torch.randn(16)[::2])
    for statistic in (-1, len(STATISTICS), 2**32):
        with pytest.raises(RuntimeError, match="statistic"):
            torch.ops.earlyexit_C.exit_check(h, w, thr, None, None, statistic, True, 1e-6, 1.0)
    with pytest.raises(RuntimeError, match="temperature"):
        run_op(h, w, thr, temperature=0.0)
    # exit_stats shares the head checks, and names itself.
    for args, msg in [c for c in cases if c[1] != "threshold"]:
        with pytest.raises(RuntimeError, match=f"exit_stats: .*{msg}"):
            run_stats(*args[:2])
    with pytest.raises(RuntimeError, match="exit_stats: bias"):
        run_stats(h, w, bias=torch.randn(10))
    with pytest.raises(RuntimeError, match="exit_stats: temperature"):
        run_stats(h, w, temperature=-1.0)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,d,v", [(1, 64, 20000), (130, 24, 3001), (300, 17, 777)])
def test_cpu_chunks_and_row_blocks(dtype, n, d, v):
    """Several vocabulary chunks and row blocks (128 rows each): partials merged across both."""
    hidden = (torch.randn(n, d) * 2).to(dtype)
    weight = torch.randn(v, d).to(dtype)
    norm_weight = (torch.rand(d) + 0.5).to(torch.bfloat16)  # a norm weight in another dtype
    bias = torch.randn(v).half()
    bias[::5] = -math.inf
    thr = torch.rand(n)
    for measure in ("max_prob", "entropy"):
        res = exit_check(hidden, weight, thr, measure=measure, norm_weight=norm_weight, bias=bias, backend="cpu")
        assert_matches_reference(res, hidden, weight, thr, norm_weight, bias, measure)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,d,v", [(1, 64, 20000), (130, 24, 3001), (300, 17, 777)])
def test_cpu_stats_chunks_and_row_blocks(dtype, n, d, v):
    """exit_stats over several vocabulary chunks and row blocks; it finalizes to exit_check's outputs."""
    hidden = (torch.randn(n, d) * 2).to(dtype)
    if n > 1:
        hidden[n // 2, 1] = math.nan
    weight = torch.randn(v, d).to(dtype)
    norm_weight = (torch.rand(d) + 0.5).to(torch.bfloat16)
    bias = torch.randn(v).half()
    bias[::5] = -math.inf
    thr = torch.rand(n)
    stats = run_stats(hidden, weight, norm_weight, bias, temperature=0.8)
    assert stats.invalid.tolist() == [n > 1 and i == n // 2 for i in range(n)]
    assert_stats_match_reference(stats, hidden, weight, norm_weight, bias, temp=0.8)
    for measure in HEAD_MEASURES:
        res = run_op(hidden, weight, thr, norm_weight, bias, measure, temperature=0.8)
        assert_stats_finalize_to_exit_check(stats, res, thr, measure)


@needs_ext
def test_cpu_stats_of_rows_without_a_finite_logit():
    """A -inf bias on every column: valid statistics (max -inf, sums 0, argmax the first column), which
    exit_check then finalizes as an invalid row. Several chunks of only -inf logits merge that way too."""
    hidden = torch.randn(3, 16)
    hidden[2, 0] = math.inf
    weight = torch.randn(20000, 16)
    stats = run_stats(hidden, weight, bias=torch.full((20000,), -math.inf))
    assert stats.invalid.tolist() == [False, False, True]
    for k in ("max_logit", "second_logit"):
        assert (getattr(stats, k)[:2] == -math.inf).all(), k
    assert stats.argmax[:2].tolist() == [0, 0]
    assert (stats.sum_exp[:2] == 0).all() and (stats.sum_exp_z[:2] == 0).all()
    res = run_op(hidden, weight, torch.zeros(3), bias=torch.full((20000,), -math.inf))
    assert res.token.tolist() == [-1] * 3 and not res.exit.any()


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cpu_tied_large_logits_finalize_exactly(dtype):
    """Two tied logits at 20480 (exact in every dtype): max_prob 1/2, margin 0, entropy log 2 to float32
    accuracy, which exp(max - lse) would miss by an ulp of lse."""
    d, v = 64, 1000
    hidden = torch.ones(2, d, dtype=dtype)
    weight = torch.zeros(v, d, dtype=dtype)
    weight[[17, 600]] = 320.0
    weight[3] = 1.0
    res = run_op(hidden, weight, torch.full((2,), 0.5))
    assert res.token.tolist() == [17, 17] and res.exit.all()
    assert ((res.max_prob - 0.5).abs() <= 1e-6).all() and (res.margin == 0).all()
    assert ((res.entropy - math.log(2)).abs() <= 1e-6).all()


@needs_ext
@pytest.mark.parametrize("statistic", range(len(STATISTICS)), ids=STATISTICS)
def test_exit_direction_is_an_argument(statistic):
    """The op knows no measure: any statistic exits above or below the threshold as asked."""
    hidden, weight = torch.randn(40, 32), torch.randn(500, 32)
    thr = torch.rand(40) * 0.5
    above, below = (
        earlyexit.ExitResult(
            *torch.ops.earlyexit_C.exit_check(hidden, weight, thr, None, None, statistic, up, 0.0, 1.0)
        )
        for up in (True, False)
    )
    value = getattr(above, STATISTICS[statistic])
    assert torch.equal(above.confidence, value) and torch.equal(below.confidence, value)
    assert torch.equal(above.exit, value >= thr) and torch.equal(below.exit, value <= thr)


@needs_ext
def test_cpu_weight_that_requires_grad():
    """An nn.Parameter head (requires_grad=True, grad mode on) runs like a plain tensor."""
    for dtype in (torch.float32, torch.bfloat16):
        head = torch.nn.Linear(40, 12000, bias=False).to(dtype)
        # > 8 rows take the BLAS path (its out= call rejects tensors needing grad); 3 vocabulary chunks
        # run on the worker threads of at::parallel_for, not only on the calling thread.
        hidden = torch.randn(12, 40).to(dtype)
        res = exit_check(hidden, head.weight, 0.1, backend="cpu")
        assert_matches_reference(res, hidden, head.weight.detach(), torch.full((12,), 0.1))


@needs_ext
def test_cpu_ties_across_chunks_pick_lowest_index():
    d, v = 8, 20000  # chunk boundaries at multiples of a few hundred columns
    hidden = torch.ones(3, d)
    weight = torch.zeros(v, d)
    tied = [257, 5000, 19999]
    weight[tied] = 1.0
    weight[[100, 12000]] = 0.5  # runner-up rows in other chunks
    res = exit_check(hidden, weight, 0.0, backend="cpu")
    assert res.token.tolist() == [257] * 3
    assert (res.margin == 0).all()
    weight[257] = 0.0
    res = exit_check(hidden, weight, 0.0, backend="cpu")
    assert res.token.tolist() == [5000] * 3


@needs_ext
def test_cpu_deterministic_and_thread_count_independent():
    hidden, weight = torch.randn(70, 96), torch.randn(9000, 96)
    first = exit_check(hidden, weight, 0.5, backend="cpu")
    again = exit_check(hidden, weight, 0.5, backend="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = exit_check(hidden, weight, 0.5, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


@needs_ext
def test_cpu_strided_rows_with_large_stride():
    hidden = torch.randn(7, 1000)[:, 3:60]  # row stride 1000, unit column stride
    weight = torch.randn(500, 57)
    norm_weight = torch.rand(57) + 0.5
    thr = torch.full((7,), 0.3)
    res = exit_check(hidden, weight, thr, norm_weight=norm_weight, backend="cpu")
    packed = exit_check(hidden.contiguous(), weight, thr, norm_weight=norm_weight, backend="cpu")
    for a, b in zip(res, packed):
        assert torch.equal(a, b)
    assert_matches_reference(res, hidden, weight, thr, norm_weight)


# --------------------------------------------------------------------------------------------
# CUDA kernels (run where a GPU is present)
# --------------------------------------------------------------------------------------------

cuda_ready = pytest.mark.skipif(
    backends.unavailable_reason("cuda", "cuda") is not None, reason=str(backends.unavailable_reason("cuda", "cuda"))
)


@pytest.mark.gpu
@cuda_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,d,v", [(1, 4096, 32000), (3, 57, 5003), (8, 96, 1000), (64, 2048, 32000), (65, 64, 3000)])
def test_cuda_matches_reference(dtype, n, d, v):
    """Decode kernel (N <= 64; RG = 1, 4, 8; 16-byte and scalar loads) and the chunked cuBLAS path (N > 64)."""
    hidden = (torch.randn(n, d, device="cuda") * 2).to(dtype)
    weight = (torch.randn(v, d, device="cuda") / math.sqrt(d) * 4).to(dtype)
    norm_weight = torch.rand(d, device="cuda") + 0.5
    bias = torch.randn(v, device="cuda").to(dtype)
    bias[::7] = -math.inf
    thr = torch.rand(n, device="cuda")
    for measure in ("max_prob", "margin", "entropy"):
        res = exit_check(hidden, weight, thr, measure=measure, norm_weight=norm_weight, bias=bias, backend="cuda")
        assert_matches_reference(res, hidden, weight, thr, norm_weight, bias, measure)


@pytest.mark.gpu
@cuda_ready
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(
    "n,d,v",
    [
        (1, 4096, 32000),  # 8 token columns, hidden resident in shared memory
        (9, 4096, 5003),  # 16 columns, V not a multiple of the 32-row warp tile
        (17, 4104, 32000),  # 32 columns, K chunks with a partial last chunk and a partial 64-wide step
        (33, 2048, 32001),  # 64 columns, K chunks
        (64, 576, 49152),  # SmolLM2's head, resident
        (64, 8, 100),  # d smaller than one K step, fewer tiles than SMs
    ],
)
def test_cuda_tensor_core_decode(dtype, n, d, v):
    """The mma.sync decode kernel (fp16/bf16, aligned rows): every token-tile width, resident and K-chunked
    hidden rows, partial tiles; a hidden view with a padded row stride keeps the 16-byte path."""
    hidden = (torch.randn(n, d + 8, device="cuda") * 2).to(dtype)[:, :d]
    weight = (torch.randn(v, d, device="cuda") / math.sqrt(d) * 4).to(dtype)
    norm_weight = torch.rand(d, device="cuda") + 0.5
    bias = torch.randn(v, device="cuda").to(dtype)
    bias[::7] = -math.inf
    thr = torch.rand(n, device="cuda")
    for measure in ("max_prob", "entropy"):
        res = exit_check(hidden, weight, thr, measure=measure, norm_weight=norm_weight, bias=bias, backend="cuda")
        assert_matches_reference(res, hidden, weight, thr, norm_weight, bias, measure)
    res = exit_check(hidden, weight, thr, temperature=0.7, backend="cuda")  # no norm: rows staged as they are
    assert_matches_reference(res, hidden, weight, thr, temp=0.7)
    # A misaligned view (first column dropped) takes the FMA kernel: same answers.
    res = exit_check(hidden[:, 1:], weight[:, 1:], thr, norm_weight=norm_weight[1:], backend="cuda")
    assert_matches_reference(res, hidden[:, 1:], weight[:, 1:], thr, norm_weight[1:])


@pytest.mark.gpu
@cuda_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", [2, 64, 100])
def test_cuda_hostile_rows_ties_and_determinism(n, dtype):
    """FMA decode (fp32), tensor-core decode (fp16/bf16, N <= 64) and the chunked path (N > 64)."""
    d, v = 64, 20000
    hidden = torch.ones(n, d, device="cuda", dtype=dtype)
    hidden[1, 0] = math.nan
    weight = torch.zeros(v, d, device="cuda", dtype=dtype)
    weight[[7001, 123, 19999]] = 1.0  # ties spread over slices: the lowest index wins
    res = exit_check(hidden, weight, 0.0, backend="cuda")
    assert res.token[1].item() == -1 and not res.exit[1].item() and res.lse[1].isnan()
    good = torch.ones(n, dtype=torch.bool, device="cuda")
    good[1] = False
    assert (res.token[good] == 123).all() and (res.margin[good] == 0).all()
    again = exit_check(hidden, weight, 0.0, backend="cuda")
    for a, b in zip(res, again):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.gpu
@cuda_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,d,v", [(1, 4096, 32000), (3, 57, 5003), (8, 96, 1000), (64, 2048, 32000), (65, 64, 3000)])
def test_cuda_stats_match_reference(dtype, n, d, v):
    """exit_stats on every CUDA path (FMA decode, tensor-core decode for fp16/bf16 with d % 8 == 0, chunked
    cuBLAS for N > 64, and the FMA kernel again for a misaligned view); each finalizes to exit_check's outputs."""
    hidden = (torch.randn(n, d + 8, device="cuda") * 2).to(dtype)[:, :d]
    if n > 1:
        hidden[n // 2, 1] = math.nan
    weight = (torch.randn(v, d, device="cuda") / math.sqrt(d) * 4).to(dtype)
    norm_weight = torch.rand(d, device="cuda") + 0.5
    bias = torch.randn(v, device="cuda").to(dtype)
    bias[::7] = -math.inf
    thr = torch.rand(n, device="cuda")
    for h, w, g in ((hidden, weight, norm_weight), (hidden[:, 1:], weight[:, 1:], norm_weight[1:])):
        stats = run_stats(h, w, g, bias, temperature=0.9)
        assert stats.invalid.tolist() == [n > 1 and i == n // 2 for i in range(n)]
        assert_stats_match_reference(stats, h, w, g, bias, temp=0.9)
        for measure in HEAD_MEASURES:
            res = run_op(h, w, thr, g, bias, measure, temperature=0.9)
            assert_stats_finalize_to_exit_check(stats, res, thr, measure)


@pytest.mark.gpu
@cuda_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", [2, 64, 100])
def test_cuda_stats_of_rows_without_a_finite_logit(dtype, n):
    """A -inf bias on every column, on the decode kernels (fp32 FMA, fp16/bf16 tensor cores) and the chunked
    path: max -inf, sums 0, argmax the first column, valid; exit_check finalizes those rows as invalid."""
    hidden = torch.randn(n, 64, device="cuda", dtype=dtype)
    hidden[1, 0] = math.nan
    weight = torch.randn(20000, 64, device="cuda", dtype=dtype)
    bias = torch.full((20000,), -math.inf, device="cuda")
    stats = run_stats(hidden, weight, bias=bias)
    ok = torch.ones(n, dtype=torch.bool, device="cuda")
    ok[1] = False
    assert torch.equal(stats.invalid, ~ok)
    assert (stats.max_logit[ok] == -math.inf).all() and (stats.second_logit[ok] == -math.inf).all()
    assert (stats.argmax[ok] == 0).all()
    assert (stats.sum_exp[ok] == 0).all() and (stats.sum_exp_z[ok] == 0).all()
    res = run_op(hidden, weight, torch.zeros(n, device="cuda"), bias=bias)
    assert (res.token == -1).all() and not res.exit.any()


@pytest.mark.gpu
@cuda_ready
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", [2, 100])
def test_cuda_tied_large_logits_finalize_exactly(dtype, n):
    """As test_cpu_tied_large_logits_finalize_exactly, on the decode kernels and the chunked path."""
    d, v = 64, 5000
    hidden = torch.ones(n, d, device="cuda", dtype=dtype)
    weight = torch.zeros(v, d, device="cuda", dtype=dtype)
    weight[[17, 4600]] = 320.0
    weight[3] = 1.0
    res = run_op(hidden, weight, torch.full((n,), 0.5, device="cuda"))
    assert (res.token == 17).all() and res.exit.all()
    assert ((res.max_prob - 0.5).abs() <= 1e-6).all() and (res.margin == 0).all()
    assert ((res.entropy - math.log(2)).abs() <= 1e-6).all()


@pytest.mark.gpu
@cuda_ready
def test_cuda_opcheck():
    hidden = torch.randn(5, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(999, 64, device="cuda", dtype=torch.bfloat16)
    thr = torch.full((5,), 0.2, device="cuda")
    entropy = HEAD_MEASURES["entropy"]
    torch.library.opcheck(
        torch.ops.earlyexit_C.exit_check.default,
        (hidden, weight, thr, None, None, entropy.code, entropy.exit_above, 1e-6, 1.0),
    )
    torch.library.opcheck(torch.ops.earlyexit_C.exit_stats.default, (hidden, weight, None, None, 1e-6, 1.0))
