"""The compiled extension (earlyexit._C, ops in torch.ops.earlyexit_C): build facts, the C++ op itself
(opcheck, argument checks) and the kernels' internal paths (vocabulary chunks, row blocks, slices).

The exit_check contract over every runnable backend (the "cpu" one included) lives in test_exit_check.py;
this file covers what only the extension has: the paths that only large shapes reach (several vocabulary
chunks and row blocks on CPU, decode vs chunked path on CUDA) and ties across chunk boundaries.
"""

import math
import shutil

import pytest
import torch
from exit_check_oracle import TOL

import earlyexit
from earlyexit import backends, exit_check

needs_ext = pytest.mark.skipif(backends.EXTENSION is None, reason="earlyexit._C is not built")
FIELDS = earlyexit.ExitResult._fields
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_op(hidden, weight, thr, norm_weight=None, bias=None, measure="max_prob", eps=1e-6, temperature=1.0):
    out = torch.ops.earlyexit_C.exit_check(hidden, weight, thr, norm_weight, bias, measure, eps, temperature)
    return earlyexit.ExitResult(*out)


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
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_opcheck_cpp_op(dtype):
    hidden = torch.randn(5, 57).to(dtype)
    weight = torch.randn(300, 57).to(dtype)
    thr = torch.full((5,), 0.2)
    torch.library.opcheck(
        torch.ops.earlyexit_C.exit_check.default,
        (hidden, weight, thr, torch.rand(57) + 0.5, torch.randn(300), "margin", 1e-6, 0.7),
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
    with pytest.raises(RuntimeError, match="measure"):
        run_op(h, w, thr, measure="top1")
    with pytest.raises(RuntimeError, match="temperature"):
        run_op(h, w, thr, temperature=0.0)


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
def test_cuda_opcheck():
    hidden = torch.randn(5, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(999, 64, device="cuda", dtype=torch.bfloat16)
    thr = torch.full((5,), 0.2, device="cuda")
    torch.library.opcheck(
        torch.ops.earlyexit_C.exit_check.default, (hidden, weight, thr, None, None, "entropy", 1e-6, 1.0)
    )
