"""The head variants of exit_check and exit_stats (norm_offset: Gemma's 1 + w norms; softcap: Gemma 2's
final-logit softcapping), on every backend that can run here, against the float64 ground truth."""

import math

import pytest
import torch
from backend_matrix import runnable_backends
from exit_check_oracle import check_against_truth, make_inputs
from test_exit_check import DTYPES

from earlyexit import exit_check, exit_stats, finalize_exit_stats, merge_exit_stats
from earlyexit.ops.reference import head_logits

BACKENDS = runnable_backends()


def gemma_inputs(n, d, v, dtype, device, bias=True, scale=1.0):
    """Gemma-like head inputs: the norm weight is stored around 0 (the scale is 1 + w)."""
    hidden, weight, _, b = make_inputs(n, d, v, dtype, device, bias=bias, scale=scale)
    norm_weight = (torch.randn(d) * 0.3).to(dtype).to(device)
    return hidden, weight, norm_weight, b


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(
    "n,d,v,norm_offset,softcap,temperature",
    [
        (1, 57, 111, 1.0, None, 1.0),
        (3, 96, 1000, 0.0, 30.0, 1.0),
        (17, 57, 5003, 1.0, 2.5, 0.7),  # a small cap: most logits sit on tanh's curved part
        (70, 8, 2, -0.5, 0.01, 1.0),  # every logit saturates: ties decide the token
        (5, 96, 111, 1.0, 30.0, 3.0),
    ],
)
def test_matches_float64_ground_truth(backend, device, dtype, n, d, v, norm_offset, softcap, temperature):
    hidden, weight, norm_weight, b = gemma_inputs(n, d, v, dtype, device)
    head = dict(norm_offset=norm_offset, softcap=softcap)
    res = exit_check(
        hidden, weight, 0.5, norm_weight=norm_weight, bias=b, temperature=temperature, backend=backend, **head
    )
    check_against_truth(res, hidden, weight, norm_weight, b, temperature=temperature, thr=0.5, **head)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_norm_offset_is_the_offset_weight(backend, device):
    """norm_offset=c equals passing the float32 weight c + w: the kernels add it in float32, as the
    reference does (so the two calls are bitwise equal)."""
    hidden, weight, norm_weight, b = gemma_inputs(9, 57, 300, torch.float32, device)
    got = exit_check(hidden, weight, 0.5, norm_weight=norm_weight, norm_offset=1.0, bias=b, backend=backend)
    want = exit_check(hidden, weight, 0.5, norm_weight=1.0 + norm_weight, bias=b, backend=backend)
    for g, w in zip(got, want):
        assert torch.equal(g.nan_to_num(), w.nan_to_num())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_softcap_equals_gemma2s_formula(backend, device):
    """Gemma2ForCausalLM: logits = tanh(logits / cap) * cap. Same tokens and probabilities (float32)."""
    hidden, weight, _, _ = make_inputs(6, 57, 400, torch.float32, device, bias=False, scale=3.0)
    cap = 4.0
    z = torch.tanh((hidden @ weight.T) / cap) * cap
    res = exit_check(hidden, weight, 0.5, softcap=cap, backend=backend)
    assert torch.equal(res.token, z.argmax(-1))
    torch.testing.assert_close(res.max_prob, z.softmax(-1).amax(-1), rtol=1e-5, atol=1e-6)
    uncapped = exit_check(hidden, weight, 0.5, backend=backend)
    assert (res.max_prob < uncapped.max_prob).all(), "capping flattens the distribution; else the test is vacuous"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_softcap_keeps_masked_columns_and_invalid_rows(backend, device):
    """A -inf bias still masks its column under softcapping; NaN/inf rows never exit; a +inf logit
    (an overflowing weight row) still makes its rows invalid instead of being capped to a finite value."""
    hidden, weight, norm_weight, b = gemma_inputs(6, 57, 50, torch.float32, device)
    plain = exit_check(hidden, weight, 0.0, norm_weight=norm_weight, norm_offset=1.0, bias=b, softcap=5.0)
    b = b.clone()
    b[plain.token[0]] = -math.inf  # mask row 0's winner
    hidden = hidden.clone()
    hidden[1, 3] = math.nan
    hidden[2, 0] = math.inf
    res = exit_check(
        hidden, weight, 0.0, norm_weight=norm_weight, norm_offset=1.0, bias=b, softcap=5.0, backend=backend
    )
    assert int(res.token[0]) != int(plain.token[0]) and bool(res.exit[0])
    assert res.token[1:3].tolist() == [-1, -1] and not res.exit[1:3].any() and res.max_prob[1:3].isnan().all()
    finite = [0, 3, 4, 5]
    check_against_truth(_rows(res, finite), hidden[finite], weight, norm_weight, b, norm_offset=1.0, softcap=5.0)
    weight = weight.clone()
    weight[7] = math.inf
    bad = exit_check(hidden[3:], weight, 0.0, norm_weight=norm_weight, softcap=5.0, backend=backend)
    assert (bad.token == -1).all() and not bad.exit.any()


def _rows(res, rows):
    return type(res)(*(f[rows] for f in res))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_saturated_ties_pick_the_lowest_index(backend, device):
    """Huge logits all saturate to +cap: an exact tie, broken towards the lowest index like torch.argmax."""
    d = 8
    hidden = torch.ones(2, d, device=device)
    weight = torch.zeros(20, d, device=device)
    weight[[4, 9, 13]] = torch.tensor([1e4, 3e4, 2e4]).repeat_interleave(d).view(3, d).to(device) / d
    res = exit_check(hidden, weight, 0.5, softcap=1.0, backend=backend)
    assert res.token.tolist() == [4, 4]
    uncapped = exit_check(hidden, weight, 0.5, backend=backend)
    assert uncapped.token.tolist() == [9, 9]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sliced_statistics_merge_to_the_whole_head(backend, device):
    hidden, weight, norm_weight, b = gemma_inputs(11, 57, 1000, torch.float32, device)
    head = dict(norm_weight=norm_weight, norm_offset=1.0, softcap=7.0, temperature=0.8)
    whole = exit_check(hidden, weight, 0.3, bias=b, backend=backend, **head)
    cuts = [0, 137, 600, 1000]
    parts = [
        exit_stats(hidden, weight[a:c], bias=b[a:c], vocab_start=a, backend=backend, **head)
        for a, c in zip(cuts, cuts[1:])
    ]
    merged = finalize_exit_stats(merge_exit_stats(parts), 0.3)
    assert torch.equal(merged.token, whole.token) and torch.equal(merged.exit, whole.exit)
    torch.testing.assert_close(merged.max_prob, whole.max_prob, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(merged.entropy, whole.entropy, rtol=1e-5, atol=1e-6)


def test_head_logits_is_the_ops_definition():
    """The plain-torch head_logits (used for training and oracles) gives the op's statistics, and is
    differentiable."""
    hidden, weight, norm_weight, b = gemma_inputs(7, 57, 300, torch.float32, "cpu")
    head = dict(norm_weight=norm_weight, norm_offset=1.0, softcap=3.0, temperature=0.9)
    z = head_logits(hidden, weight, bias=b, **head)
    res = exit_check(hidden, weight, 0.5, bias=b, backend="torch", **head)
    assert torch.equal(res.token, z.argmax(-1))
    torch.testing.assert_close(res.max_prob, z.softmax(-1).amax(-1), rtol=1e-5, atol=1e-6)
    w = weight.clone().requires_grad_(True)
    head_logits(hidden, w, bias=b, **head).logsumexp(-1).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    from earlyexit.ops.exit_check import exit_check_op
    from earlyexit.ops.exit_stats import exit_stats_op

    hidden, weight, norm_weight, b = gemma_inputs(4, 57, 300, torch.float32, device)
    thr = torch.full((4,), 0.5, device=device)
    torch.library.opcheck(exit_check_op, (hidden, weight, thr, norm_weight, b, "entropy", 1e-6, 0.9, 1.0, 3.0, backend))
    torch.library.opcheck(exit_stats_op, (hidden, weight, norm_weight, b, 1e-6, 0.9, 1.0, 3.0, backend))


def test_torch_compile_fullgraph():
    hidden, weight, norm_weight, b = gemma_inputs(4, 57, 300, torch.float32, "cpu")

    def f(h):
        return exit_check(h, weight, 0.5, norm_weight=norm_weight, norm_offset=1.0, bias=b, softcap=3.0).token

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(hidden), f(hidden))


@pytest.mark.parametrize(
    "override,name",
    [
        (dict(softcap=0.0), "softcap"),
        (dict(softcap=-1.0), "softcap"),
        (dict(softcap=math.nan), "softcap"),
        (dict(softcap=math.inf), "softcap"),
        (dict(softcap=True), "softcap"),
        (dict(softcap="30"), "softcap"),
        (dict(norm_offset=math.nan), "norm_offset"),
        (dict(norm_offset=-math.inf), "norm_offset"),
        (dict(norm_offset=None), "norm_offset"),
        (dict(norm_offset=1.0, norm_weight=None), "norm_offset"),
        (dict(threshold=math.nan), "threshold"),
    ],
)
@pytest.mark.parametrize("op", ["exit_check", "exit_stats"])
def test_errors_name_the_argument(override, name, op):
    hidden, weight, norm_weight, b = gemma_inputs(3, 8, 11, torch.float32, "cpu")
    kw = dict(norm_weight=norm_weight, bias=b, threshold=0.5)
    kw.update(override)
    threshold = kw.pop("threshold")
    with pytest.raises(ValueError, match=name):
        if op == "exit_check":
            exit_check(hidden, weight, threshold, **kw)
        elif name != "threshold":
            exit_stats(hidden, weight, **kw)
        else:
            finalize_exit_stats(exit_stats(hidden, weight, **kw), threshold)
