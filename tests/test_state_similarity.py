"""Contract tests of earlyexit.state_similarity, written once and run on every backend that can run here.

Accuracy follows the exit check's scheme (tests/exit_check_oracle.py): against a float64 ground truth,
a backend's error may exceed the error of plain torch in the same dtype (F.cosine_similarity) by at
most TOL[dtype]. Where plain torch itself breaks (rows at 1e30 overflow, subnormal rows underflow), its
error is taken on the same rows rescaled to unit magnitude by an exact power of two: the cosine, and
so the ground truth, is the same.
"""

import math

import pytest
import torch
from backend_matrix import runnable_backends
from exit_check_oracle import TOL
from state_similarity_oracle import check_against_truth, make_pair, naive, poison_rows

import earlyexit
from earlyexit import state_similarity
from earlyexit.ops import backends
from earlyexit.ops.state_similarity import _PREFERENCE

BACKENDS = runnable_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731

# Every N in {0, 1, 3, 17, 70} and every d in {1, 8, 57, 96, 4096}.
SHAPES = [(0, 57), (1, 1), (1, 4096), (3, 8), (3, 57), (17, 96), (17, 4096), (70, 1), (70, 96), (70, 8)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_matches_float64_ground_truth(backend, device, dtype, n, d):
    h, p = make_pair(n, d, dtype, device)
    got = state_similarity(h, p, backend=backend)
    assert got.shape == (n,) and got.dtype == torch.float32 and got.device == h.device
    check_against_truth(got, h, p)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_rows_and_leading_dims(backend, device):
    buf = torch.randn(2, 6, 64, device=device)
    h = buf[:, ::2, :57]  # [2, 3, 57]: strided rows, unit last-dim stride
    p = torch.randn(2, 3, 80, device=device)[..., 5:62]  # other row strides and an offset
    got = state_similarity(h, p, backend=backend)
    assert got.shape == (2, 3)
    flat = state_similarity(h.reshape(6, 57).contiguous(), p.reshape(6, 57).contiguous(), backend=backend)
    torch.testing.assert_close(got.reshape(-1), flat, rtol=0, atol=1e-6)
    check_against_truth(got, h, p)
    # Leading dims that cannot be viewed as rows (transposed), and a non-unit last-dim stride.
    t = torch.randn(3, 2, 57, device=device).transpose(0, 1)
    s = torch.randn(2, 3, 114, device=device)[..., ::2]
    got_t = state_similarity(t, s, backend=backend)
    torch.testing.assert_close(
        got_t, state_similarity(t.contiguous(), s.contiguous(), backend=backend), rtol=0, atol=1e-6
    )
    check_against_truth(got_t, t, s)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_column_with_any_column_stride(backend, device):
    # d = 1: torch calls a [N, 1] tensor contiguous whatever its column stride, so it reaches the kernels as is.
    h, p = torch.randn(1, 5, device=device).t(), torch.randn(1, 5, device=device).t()  # [5, 1], strides (1, 5)
    got = state_similarity(h, p, backend=backend)
    torch.testing.assert_close(got, state_similarity(h.clone(), p.clone(), backend="torch"), rtol=0, atol=1e-6)
    check_against_truth(got, h, p)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_dimensional_and_empty(backend, device):
    h, p = make_pair(1, 57, torch.float32, device)
    one = state_similarity(h[0], p[0], backend=backend)
    assert one.shape == () and one.dtype == torch.float32
    torch.testing.assert_close(one.reshape(1), state_similarity(h, p, backend=backend), rtol=0, atol=1e-6)
    empty = state_similarity(
        torch.empty(2, 0, 57, device=device), torch.empty(2, 0, 57, device=device), backend=backend
    )
    assert empty.shape == (2, 0) and empty.dtype == torch.float32


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_rows_give_nan_and_do_not_disturb(backend, device, dtype):
    h, p = make_pair(9, 96, dtype, device)
    clean = state_similarity(h, p, backend=backend)
    assert not clean.isnan().any()
    h, p, rows = poison_rows(h, p)
    got = state_similarity(h, p, backend=backend)
    bad = torch.zeros(9, dtype=torch.bool, device=device)
    bad[rows] = True
    assert got[bad].isnan().all()
    assert torch.equal(got[~bad], clean[~bad])
    assert not (got >= -2.0)[bad].any(), "a NaN row never passes a threshold"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_vectors(backend, device, dtype):
    h, p = make_pair(6, 57, dtype, device)
    clean = state_similarity(h, p, backend=backend)
    h, p = h.clone(), p.clone()
    h[1] = 0
    p[3] = 0
    h[5], p[5] = 0, 0
    got = state_similarity(h, p, backend=backend)
    zero = torch.tensor([False, True, False, True, False, True], device=device)
    assert (got[zero] == 0).all()
    assert torch.equal(got[~zero], clean[~zero])
    # As F.cosine_similarity defines a zero row (its eps clamp gives 0 / eps), except in float16, where
    # its eps = 1e-8 rounds to 0 and a zero row gives 0 / 0 = NaN.
    want = math.nan if dtype == torch.float16 else 0.0
    torch.testing.assert_close(naive(h, p)[zero.cpu()], torch.full((3,), want, dtype=torch.float64), equal_nan=True)
    neg = -torch.zeros(2, 8, dtype=dtype, device=device)  # -0.0 is a zero vector too
    assert (state_similarity(neg, torch.ones_like(neg), backend=backend) == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [1, 57, 4096])
def test_identical_and_opposite_rows(backend, device, dtype, d):
    h, _ = make_pair(5, d, dtype, device)
    same = state_similarity(h, h, backend=backend)
    opp = state_similarity(h, -h, backend=backend)
    tol = TOL[dtype]
    assert ((same <= 1) & (same >= 1 - tol)).all(), same
    assert ((opp >= -1) & (opp <= -1 + tol)).all(), opp
    # A power-of-two multiple is the same direction, exactly.
    twice = state_similarity(h, h * 4, backend=backend)
    assert ((twice <= 1) & (twice >= 1 - tol)).all(), twice


# The Triton interpreter's numpy reports the one-pass sums overflowing before the rescue takes over.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [57, 4096])
def test_huge_magnitudes(backend, device, dtype, d):
    """Rows at 1e30 (squares overflow float32) and near the float32 maximum: finite, exact cosines."""
    h, p = make_pair(6, d, dtype, device)
    k = torch.tensor([100, 100, 0, 100, 124, 120], dtype=torch.float64)[:, None]  # 2^100 ~ 1.3e30
    kp = torch.tensor([100, 0, 100, 90, 120, 2], dtype=torch.float64)[:, None]
    hs = (h.double().cpu() * 2**k).to(dtype).to(device)  # exact: a power of two within range
    ps = (p.double().cpu() * 2**kp).to(dtype).to(device)
    h[4].fill_(1.5)  # a flat row near the maximum: every square overflows float32
    hs[4] = torch.full((d,), 3.0e38).to(dtype)
    got = state_similarity(hs, ps, backend=backend)
    assert torch.isfinite(got).all()
    check_against_truth(got, hs, ps, naive_inputs=(h, p))
    torch.testing.assert_close(got[:4], state_similarity(h[:4], p[:4], backend=backend), rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_huge_magnitudes_float16(backend, device):
    """float16's largest values square to 4e9: float32 sums never overflow, still exact."""
    h, p = make_pair(4, 4096, torch.float16, device)
    hs = (h.float() * 4096).clamp(-65504, 65504).half()
    ps = (p.float() * 4096).clamp(-65504, 65504).half()
    got = state_similarity(hs, ps, backend=backend)
    assert torch.isfinite(got).all()
    check_against_truth(got, hs, ps)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [57, 4096])
def test_tiny_magnitudes(backend, device, dtype, d):
    """Rows whose squares underflow, down to subnormal scale: their true cosines, never 0 or NaN."""
    h, p = make_pair(5, d, dtype, device)
    if dtype == torch.float16:
        ks, kps = [-20, -20, 0, -16, -24], [-20, 0, -20, -24, -12]  # 2^-24: float16's smallest subnormal
    elif dtype == torch.bfloat16:
        ks, kps = [-100, -100, 0, -128, -126], [-100, 0, -127, -129, -70]  # 2^-133: bfloat16's smallest
    else:
        ks, kps = [-100, -100, 0, -138, -126], [-100, 0, -138, -140, -70]  # 2^-100 ~ 8e-31; < 2^-126 subnormal
    k = torch.tensor(ks, dtype=torch.float64)[:, None]
    kp = torch.tensor(kps, dtype=torch.float64)[:, None]
    hs = (h.double().cpu() * 2**k).to(dtype).to(device)  # subnormal rows round: the stored values are the input
    ps = (p.double().cpu() * 2**kp).to(dtype).to(device)
    # The stored rows scaled back up (exact: no subnormal after scaling up) are plain torch's fair input.
    nh = (hs.double().cpu() * 2**-k).to(dtype)
    np_ = (ps.double().cpu() * 2**-kp).to(dtype)
    zero = ((hs == 0).all(-1) | (ps == 0).all(-1)).cpu()
    got = state_similarity(hs, ps, backend=backend)
    assert torch.isfinite(got).all()
    assert (got.cpu()[zero] == 0).all()
    check_against_truth(got, hs, ps, naive_inputs=(nh, np_))
    if dtype != torch.float16:
        assert not zero.any() and (got.abs() > 0).all(), "a subnormal-scale row lost its direction"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    h, p = make_pair(70, 4096, torch.float32, device)
    first = state_similarity(h, p, backend=backend)
    assert torch.equal(first, state_similarity(h, p, backend=backend))
    if device == "cpu":
        # Each row is summed by one thread in a fixed order: the thread count changes no bit.
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(first, state_similarity(h, p, backend=backend))
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck(backend, device, dtype):
    h, p = make_pair(3, 57, dtype, device)
    torch.library.opcheck(torch.ops.earlyexit.state_similarity.default, (h, p, backend))
    if backend in ("cpu", "cuda"):
        torch.library.opcheck(torch.ops.earlyexit_C.state_similarity.default, (h, p))


def test_torch_compile_fullgraph():
    h, p = make_pair(5, 57, torch.float32, "cpu")

    def step(x, y, thr):
        cos = state_similarity(x * 2, y)
        return cos >= thr, cos

    compiled = torch.compile(step, fullgraph=True)
    got, want = compiled(h, p, 0.5), step(h, p, 0.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_auto_rule():
    """CPU: the C++ kernel when built (measured faster); CUDA: the CUDA kernel, then Triton."""
    want = "cpu" if backends.unavailable_reason("cpu", "cpu") is None else "torch"
    assert backends.resolve_preferred("auto", "cpu", _PREFERENCE) == want
    assert _PREFERENCE["cuda"] == ("cuda", "triton")


def test_errors_name_the_argument():
    h, p = make_pair(3, 8, torch.float32, "cpu")
    cases = [
        (dict(h=h.numpy()), "h"),
        (dict(h_prev=[1.0] * 8), "h_prev"),
        (dict(h=torch.randint(0, 3, (3, 8))), "h"),
        (dict(h=torch.tensor(1.0), h_prev=torch.tensor(1.0)), "h"),
        (dict(h=torch.randn(3, 0), h_prev=torch.randn(3, 0)), "h"),
        (dict(h_prev=torch.randn(3, 9)), "h_prev"),
        (dict(h_prev=torch.randn(2, 3, 8)), "h_prev"),
        (dict(h_prev=p.half()), "h_prev"),
        (dict(h_prev=p.double()), "h_prev"),
        (dict(h_prev=p.to("meta")), "h_prev"),
        (dict(backend="fastest"), "backend"),
    ]
    for override, name in cases:
        kw = dict(h=h, h_prev=p)
        kw.update(override)
        with pytest.raises(ValueError, match=rf"^{name}:"):
            state_similarity(kw.pop("h"), kw.pop("h_prev"), **kw)


def test_unavailable_backend_says_why():
    h, p = make_pair(3, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        state_similarity(h, p, backend="cuda")


def test_exported():
    assert earlyexit.state_similarity is state_similarity
    assert "state_similarity" in earlyexit.__all__ and "state_similarity" in earlyexit.ops.__all__


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


def _skip_unless(backend):
    reason = backends.unavailable_reason(backend, "cuda")
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d", [(1, 4096), (64, 4096), (300, 576), (64, 4095), (7, 1)])
def test_real_sizes_on_gpu(backend, dtype, n, d):
    """Decode and prefill row counts at hidden sizes; d = 4095 and 1 take the kernels' unaligned paths."""
    _skip_unless(backend)
    h, p = make_pair(n, d, dtype, "cuda")
    check_against_truth(state_similarity(h, p, backend=backend), h, p)
    off = torch.randn(n, d + 1, device="cuda").to(dtype)[:, 1:]  # rows 2 bytes off 16-byte alignment
    check_against_truth(state_similarity(off, p, backend=backend), off, p)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_extremes_on_gpu(backend):
    """Huge, subnormal, zero and non-finite rows in one batch on the GPU (no flush-to-zero, no overflow)."""
    _skip_unless(backend)
    h, p = make_pair(6, 4096, torch.float32, "cpu")
    k = torch.tensor([100.0, -140.0, 0.0, 0.0, 0.0, 120.0])[:, None]
    hs, ps = h * 2**k, p * 2**k
    hs[2] = 0
    ps[3, 7] = math.nan
    want = state_similarity(hs, ps, backend="torch")
    got = state_similarity(hs.cuda(), ps.cuda(), backend=backend).cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n", [1, 64])
def test_cuda_graph_capture_and_replay(backend, n):
    """A decode-time call is captured in a CUDA graph: no host sync, no allocation capture forbids."""
    _skip_unless(backend)
    h, p = make_pair(n, 4096, torch.bfloat16, "cuda")
    state_similarity(h, p, backend=backend)  # warm up (Triton compiles here)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = state_similarity(h, p, backend=backend)
    for _ in range(3):
        h.normal_()
        graph.replay()
        assert torch.equal(got, state_similarity(h, p, backend=backend))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_runs_on_the_tensors_device_not_the_current_one(backend):
    _skip_unless(backend)
    h, p = make_pair(5, 4096, torch.bfloat16, "cuda:1")
    with torch.cuda.device(0):
        got = state_similarity(h, p, backend=backend)
    with torch.cuda.device(1):
        want = state_similarity(h, p, backend=backend)
    assert got.device == h.device and torch.equal(got, want)
