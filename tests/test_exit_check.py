"""Contract tests of earlyexit.exit_check, written once and run on every backend that can run here."""

import math

import pytest
import torch
from backend_matrix import runnable_backends
from exit_check_oracle import STATS, check_against_truth, logits_float64, make_inputs

import earlyexit
from earlyexit import exit_check

BACKENDS = runnable_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (N, d, V, with RMSNorm, with bias): every N in {0,1,3,17,70}, d in {8,57,96}, V in {1,2,111,1000,5003}.
SHAPES = [
    (0, 8, 111, True, False),
    (1, 8, 1, False, True),
    (1, 57, 2, True, True),
    (3, 96, 111, True, False),
    (3, 8, 5003, False, False),
    (17, 57, 1000, True, True),
    (17, 96, 2, False, False),
    (70, 96, 5003, True, True),
    (70, 57, 111, False, True),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,d,v,norm,bias", SHAPES)
def test_matches_float64_ground_truth(backend, device, dtype, n, d, v, norm, bias):
    hidden, weight, norm_weight, b = make_inputs(n, d, v, dtype, device, norm, bias)
    res = exit_check(hidden, weight, 0.5, norm_weight=norm_weight, bias=b, backend=backend)
    assert res.token.shape == (n,) and res.token.dtype == torch.int64
    assert res.exit.dtype == torch.bool
    for k in ("confidence", *STATS):
        assert getattr(res, k).dtype == torch.float32 and getattr(res, k).shape == (n,)
    if n:
        check_against_truth(res, hidden, weight, norm_weight, b, thr=0.5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("measure", ["max_prob", "margin", "entropy"])
def test_measures_split_rows_at_threshold(backend, device, measure):
    hidden, weight, norm_weight, b = make_inputs(40, 57, 300, torch.float32, device)
    hidden[::2] *= 4  # sharper rows: a spread of confidences
    ref = exit_check(hidden, weight, 0.0, measure=measure, norm_weight=None, bias=b, backend="torch")
    thr = ref.confidence.median().item()
    res = exit_check(hidden, weight, thr, measure=measure, bias=b, backend=backend)
    assert 0 < int(res.exit.sum()) < 40, "threshold should split the batch"
    check_against_truth(res, hidden, weight, None, b, measure=measure, thr=thr)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_margin_of_nearly_tied_top_logits(backend, device):
    # 1 - exp(second - top) cancels when the two nearly tie: the margin must keep its float32 relative accuracy
    # (expm1), or a margin threshold decides differently on different backends.
    gaps = torch.tensor([1e-7, 3e-7, 1e-6, 1e-4, 0.01, 0.2, 0.3, 3.0])
    n = gaps.numel()
    hidden = torch.ones(n, 1, device=device)
    weight = torch.tensor([[0.0], [1.0]], device=device)
    bias = torch.zeros(2, device=device)
    # Row i's logits are (0, 1) scaled by the gap: a [n, 1] hidden column times the weight gives exactly that.
    hidden = (hidden * gaps[:, None].to(device)).contiguous()
    res = exit_check(hidden, weight, 0.5, measure="margin", bias=bias, backend=backend)
    z = (hidden.double() @ weight.double().T).cpu()
    p = torch.softmax(z, -1)
    truth = (p[:, 1] - p[:, 0]).float()
    torch.testing.assert_close(res.margin.cpu(), truth, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_norm_of_a_row_whose_float32_sum_of_squares_overflows(backend, device, dtype):
    # The float32 mean of squares is inf (each square is finite): RMSNorm gives zeros, as LlamaRMSNorm does,
    # on every backend alike (one once summed in float64 and normalized the row instead).
    hidden = torch.tensor([[1.5e19, -1.2e19, 1e19], [1.0, 2.0, 3.0]], device=device).to(dtype)
    weight = torch.tensor([[-1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], device=device).to(dtype)
    norm_weight = torch.ones(3, device=device)
    res = exit_check(hidden, weight, 0.3, norm_weight=norm_weight, backend=backend)
    ref = exit_check(hidden, weight, 0.3, norm_weight=norm_weight, backend="torch")
    assert res.token.tolist() == ref.token.tolist() and res.exit.tolist() == ref.exit.tolist()
    assert res.max_prob[0] == ref.max_prob[0] == 0.25  # all four logits 0: a uniform row


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_temperature(backend, device):
    hidden, weight, norm_weight, b = make_inputs(5, 57, 111, torch.float32, device)
    res = exit_check(hidden, weight, 0.5, norm_weight=norm_weight, bias=b, temperature=0.37, backend=backend)
    check_against_truth(res, hidden, weight, norm_weight, b, temperature=0.37)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_rows_and_leading_dims(backend, device):
    buf = torch.randn(2, 6, 64, device=device)
    hidden = buf[:, ::2, :57]  # [2, 3, 57]: strided rows, unit last-dim stride
    weight = torch.randn(111, 57, device=device)
    res = exit_check(hidden, weight, 0.1, backend=backend)
    assert res.token.shape == (2, 3)
    flat = exit_check(hidden.reshape(6, 57).contiguous(), weight, 0.1, backend=backend)
    # The reference's BLAS may round strided and packed rows 1 ulp apart; kernels match bitwise.
    for a, b in zip(res, flat):
        torch.testing.assert_close(a.reshape(-1), b, equal_nan=True)
    # Leading dims that cannot be viewed as rows (transposed) are handled too.
    t = torch.randn(3, 2, 57, device=device).transpose(0, 1)
    res_t = exit_check(t, weight, 0.1, backend=backend)
    ref_t = exit_check(t.contiguous(), weight, 0.1, backend=backend)
    assert torch.equal(res_t.token, ref_t.token)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", [3, 20])
def test_broadcast_weight_rows(backend, device, dtype, n):
    # An expanded head (row stride 0, every vocabulary row the same): all logits tie, token 0 on every row.
    # The C++ kernel's prefetch distance once divided by the row stride.
    # Small integers: every logit is exact, so the tie is exact whatever order a backend sums in.
    hidden = torch.randint(-3, 4, (n, 8), device=device).to(dtype)
    weight = torch.randint(-3, 4, (8,), device=device).to(dtype).expand(50, 8)
    res = exit_check(hidden, weight, 0.5, backend=backend)
    assert torch.equal(res.token, torch.zeros(n, dtype=torch.long, device=device))
    torch.testing.assert_close(res.max_prob, torch.full((n,), 1 / 50, device=device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_column_with_any_column_stride(backend, device):
    # d = 1: torch calls a [N, 1] tensor contiguous whatever its column stride, so it reaches the kernels as is.
    hidden = torch.randn(1, 4, device=device).t()  # [4, 1], strides (1, 4)
    weight = torch.randn(1, 7, device=device).t()  # [7, 1], strides (1, 7)
    res = exit_check(hidden, weight, 0.5, backend=backend)
    ref = exit_check(hidden.clone(), weight.clone(), 0.5, backend="torch")
    assert torch.equal(res.token, ref.token)
    torch.testing.assert_close(res.max_prob, ref.max_prob)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_per_row_thresholds(backend, device):
    hidden, weight, _, _ = make_inputs(6, 57, 111, torch.float32, device, norm=False, bias=False)
    base = exit_check(hidden, weight, 0.0, backend=backend)
    thr = base.max_prob.clone()
    thr[::2] += 1e-3  # just above: these rows must not exit
    thr[1::2] -= 1e-3  # just below: these must
    res = exit_check(hidden, weight, thr, backend=backend)
    assert res.exit.tolist() == [False, True] * 3
    # Broadcast: [2, 1] thresholds against leading dims [2, 3].
    res2 = exit_check(hidden.reshape(2, 3, 57), weight, torch.tensor([[0.0], [2.0]], device=device), backend=backend)
    assert res2.exit.tolist() == [[True] * 3, [False] * 3]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_neg_inf_bias_entries(backend, device):
    hidden, weight, norm_weight, b = make_inputs(9, 57, 1000, torch.float32, device)
    plain = exit_check(hidden, weight, 0.5, norm_weight=norm_weight, bias=b, backend="torch")
    b = b.clone()
    b[plain.token] = -math.inf  # mask every row's favourite
    b[::7] = -math.inf
    res = exit_check(hidden, weight, 0.5, norm_weight=norm_weight, bias=b, backend=backend)
    assert torch.isfinite(res.lse).all() and torch.isfinite(res.entropy).all()
    assert not torch.isin(res.token, plain.token).any()
    check_against_truth(res, hidden, weight, norm_weight, b, thr=0.5)
    # All columns masked: no finite logit, so no distribution: the row is invalid, never exits.
    allmask = torch.full_like(b, -math.inf)
    dead = exit_check(hidden, weight, 0.0, bias=allmask, backend=backend)
    assert not dead.exit.any() and (dead.token == -1).all() and dead.max_prob.isnan().all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_nonfinite_rows_never_exit_and_do_not_disturb(backend, device, dtype):
    hidden, weight, norm_weight, b = make_inputs(8, 57, 111, dtype, device)
    clean = exit_check(hidden, weight, 0.0, norm_weight=norm_weight, bias=b, backend=backend)
    assert clean.exit.all()
    dirty = hidden.clone()
    dirty[1, 3] = math.nan
    dirty[4, 0] = math.inf
    dirty[6, 10] = -math.inf
    res = exit_check(dirty, weight, 0.0, norm_weight=norm_weight, bias=b, backend=backend)
    bad = torch.zeros(8, dtype=torch.bool, device=device)
    bad[[1, 4, 6]] = True
    assert not res.exit[bad].any()
    assert (res.token[bad] == -1).all() and res.confidence[bad].isnan().all()
    for a, c in zip(res, clean):
        assert torch.equal(a[~bad], c[~bad])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nonfinite_weight_row_invalidates_rows(backend, device):
    hidden, weight, _, _ = make_inputs(4, 8, 111, torch.float32, device, norm=False, bias=False)
    weight = weight.clone()
    weight[50, 2] = math.nan
    res = exit_check(hidden, weight, 0.0, backend=backend)
    assert not res.exit.any() and (res.token == -1).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_huge_logits(backend, device, dtype):
    hidden, weight, _, b = make_inputs(5, 96, 1000, dtype, device, norm=False)
    scale = 1e4 / logits_float64(hidden, weight).abs().max().item()
    hidden = (hidden.float() * scale).to(dtype)
    res = exit_check(hidden, weight, 0.5, bias=b, backend=backend)
    assert torch.isfinite(res.lse).all() and res.lse.abs().max() > 1e3
    check_against_truth(res, hidden, weight, None, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_exact_ties_pick_lowest_index(backend, device, dtype):
    # Small integers: every dot product is exact in float32, so identical weight rows tie exactly.
    d, v = 16, 700
    signs = torch.randint(0, 2, (4, d)) * 2 - 1
    hidden = (signs * torch.randint(1, 3, (4, d))).to(dtype).to(device)
    for r in range(4):
        weight = torch.randint(-1, 2, (v, d)).to(dtype).to(device)
        tied = [10 + r, 400 + r, 699 - r]
        weight[tied] = (3 * signs[r]).to(dtype).to(device)  # 3 * sum|h| beats any other row's dot
        res = exit_check(hidden[r : r + 1], weight, 0.0, backend=backend)
        assert res.token.item() == 10 + r
        assert res.margin.item() == 0.0
        assert abs(res.max_prob.item() - 1 / 3) < 1e-6


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vocab_of_one(backend, device):
    hidden, weight, _, _ = make_inputs(3, 8, 1, torch.float32, device, norm=False, bias=False)
    res = exit_check(hidden, weight, 0.99, backend=backend)
    assert (res.token == 0).all() and (res.max_prob == 1).all() and (res.margin == 1).all()
    assert res.exit.all() and (res.entropy.abs() < 1e-6).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    weight = torch.randn(111, 57, device=device)
    res = exit_check(torch.empty(2, 0, 57, device=device), weight, 0.5, backend=backend)
    assert all(t.shape == (2, 0) for t in res)
    assert res.token.dtype == torch.int64 and res.exit.dtype == torch.bool


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    hidden, weight, norm_weight, b = make_inputs(17, 96, 5003, torch.float32, device)
    a = exit_check(hidden, weight, 0.5, norm_weight=norm_weight, bias=b, backend=backend)
    c = exit_check(hidden, weight, 0.5, norm_weight=norm_weight, bias=b, backend=backend)
    for x, y in zip(a, c):
        assert torch.equal(x, y)  # no NaN here, so equal means bitwise equal


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    hidden, weight, norm_weight, b = make_inputs(3, 57, 111, torch.float32, device)
    thr = torch.full((3,), 0.5, device=device)
    torch.library.opcheck(
        torch.ops.earlyexit.exit_check.default,
        (hidden, weight, thr, norm_weight, b, "max_prob", 1e-6, 1.0, 0.0, 0.0, backend),
    )


def test_torch_compile_fullgraph():
    hidden, weight, norm_weight, b = make_inputs(5, 57, 111, torch.float32, "cpu")

    def step(h, thr):
        r = exit_check(h * 2, weight, thr, measure="margin", norm_weight=norm_weight, bias=b)
        return r.token.where(r.exit, -2), r.confidence

    compiled = torch.compile(step, fullgraph=True)
    for thr in (0.1, torch.full((5,), 0.3)):
        got, want = compiled(hidden, thr), step(hidden, thr)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_torch_compile_fullgraph_float_arguments_that_change():
    # A float that changes between calls is traced as a symbolic float on the recompile: the argument
    # checks must be traceable on it (math.isfinite is not).
    hidden, weight, norm_weight, b = make_inputs(5, 57, 111, torch.float32, "cpu")

    def step(h, temperature, softcap, norm_offset, norm_eps):
        kw = dict(norm_weight=norm_weight, bias=b, norm_offset=norm_offset, norm_eps=norm_eps)
        r = exit_check(h, weight, 0.1, temperature=temperature, softcap=softcap, **kw)
        return r.token, r.confidence

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for args in ((1.0, 30.0, 0.0, 1e-6), (2.0, 20.0, 1.0, 1e-5), (0.5, 10.0, 0.5, 1e-4)):
        got, want = compiled(hidden, *args), step(hidden, *args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n", [1, 64, 100])
def test_cuda_graph_capture_and_replay(backend, n):
    """Decode-time calls are captured in CUDA graphs: no host sync, no allocation or attribute call that
    capture forbids, and the merge counters stay consistent across replays."""
    if earlyexit.ops.backends.unavailable_reason(backend, "cuda"):
        pytest.skip(earlyexit.ops.backends.unavailable_reason(backend, "cuda"))
    hidden, weight, norm_weight, b = make_inputs(n, 256, 5000, torch.bfloat16, "cuda")
    thr = torch.full((n,), 0.01, device="cuda")
    exit_check(hidden, weight, thr, norm_weight=norm_weight, bias=b, backend=backend)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = exit_check(hidden, weight, thr, norm_weight=norm_weight, bias=b, backend=backend)
    for _ in range(3):
        hidden.normal_()
        graph.replay()
        want = exit_check(hidden, weight, thr, norm_weight=norm_weight, bias=b, backend=backend)
        for got_field, want_field in zip(res, want):
            assert torch.equal(got_field.nan_to_num(), want_field.nan_to_num())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_runs_on_the_tensors_device_not_the_current_one(backend):
    """Triton launches on the current device: the launcher must switch to the tensors' device."""
    if earlyexit.ops.backends.unavailable_reason(backend, "cuda"):
        pytest.skip(earlyexit.ops.backends.unavailable_reason(backend, "cuda"))
    hidden, weight, norm_weight, b = make_inputs(5, 256, 3000, torch.bfloat16, "cuda:1")
    with torch.cuda.device(0):
        got = exit_check(hidden, weight, 0.5, norm_weight=norm_weight, bias=b, backend=backend)
    with torch.cuda.device(1):
        want = exit_check(hidden, weight, 0.5, norm_weight=norm_weight, bias=b, backend=backend)
    for got_field, want_field in zip(got, want):
        assert got_field.device == hidden.device and torch.equal(got_field.nan_to_num(), want_field.nan_to_num())


def test_errors_name_the_argument():
    h, w, g, b = make_inputs(3, 8, 11, torch.float32, "cpu")
    cases = [
        (dict(weight=w.half()), "weight"),
        (dict(weight=torch.randn(11, 9)), "weight"),
        (dict(weight=torch.randn(11, 8, 1)), "weight"),
        (dict(hidden=torch.randint(0, 3, (3, 8))), "hidden"),
        (dict(weight=torch.randint(0, 3, (11, 8))), "weight"),
        (dict(bias=torch.randn(10)), "bias"),
        (dict(norm_weight=torch.randn(7)), "norm_weight"),
        (dict(measure="top1"), "measure"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(threshold=torch.ones(4)), "threshold"),
        (dict(threshold="high"), "threshold"),
        (dict(norm_eps=-1.0), "norm_eps"),
        (dict(norm_eps=math.inf), "norm_eps"),
        (dict(temperature=10**400), "temperature"),
        (dict(softcap=math.nan), "softcap"),
        (dict(threshold=10**400), "threshold"),
        (dict(backend="fastest"), "backend"),
        (dict(weight=torch.randn(0, 8)), "weight"),
        (dict(weight=torch.randn(8, 11).T), "weight"),
    ]
    for override, name in cases:
        kw = dict(hidden=h, weight=w, threshold=0.5, norm_weight=g, bias=b)
        kw.update(override)
        hidden, weight, threshold = kw.pop("hidden"), kw.pop("weight"), kw.pop("threshold")
        with pytest.raises(ValueError, match=name):
            exit_check(hidden, weight, threshold, **kw)


def test_errors_on_other_device():
    h, w, _, _ = make_inputs(3, 8, 11, torch.float32, "cpu")
    with pytest.raises(ValueError, match="bias"):
        exit_check(h, w, 0.5, bias=torch.randn(11, device="meta"))
    with pytest.raises(ValueError, match="weight"):
        exit_check(h, w.to("meta"), 0.5)


def test_unavailable_backend_says_why():
    h, w, _, _ = make_inputs(3, 8, 11, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        exit_check(h, w, 0.5, backend="cuda")


def test_build_info_reports_backends():
    info = earlyexit.build_info()
    for key in ("torch", "triton", "cpu_ext", "cuda_archs", "backends"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_archs"], list)
    assert info["backends"]["torch"]["cpu"] is None
    assert isinstance(info["backends"]["cuda"]["cpu"], str)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 8, 64, 300])
@pytest.mark.parametrize("backend", [b.values[0] for b in BACKENDS if b.values[1] == "cuda"] or ["triton"])
def test_real_head_sizes_on_gpu(backend, n):
    """bf16 at a real head size on the GPU: decode row counts and a prefill-sized block."""
    hidden, weight, norm_weight, b = make_inputs(n, 2048, 32000, torch.bfloat16, "cuda", bias=False)
    res = exit_check(hidden, weight, 0.5, norm_weight=norm_weight, backend=backend)
    check_against_truth(res, hidden, weight, norm_weight, None, thr=0.5)
