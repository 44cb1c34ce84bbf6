"""The statistics contract (exit_stats, merge_exit_stats, finalize_exit_stats), on every backend here.

Merging the statistics of vocabulary slices must equal the unsliced op: the tokens exactly (with the
lowest global id on ties across slice boundaries), the statistics to float32 rounding; empty slices and
padding rows are neutral; invalid rows stay invalid; the measures read one table.
"""

import math

import pytest
import torch
from backend_matrix import runnable_backends
from exit_check_oracle import expected_exit

import earlyexit
from earlyexit import ExitStats, exit_check, exit_stats, finalize_exit_stats, merge_exit_stats
from earlyexit.ops.exit_stats import exit_stats_op
from earlyexit.ops.measures import HEAD_MEASURE_NAMES, HEAD_MEASURES, MEASURE_NAMES, MEASURES, STATISTICS

BACKENDS = runnable_backends()
FLOAT_FIELDS = ("max_logit", "second_logit", "sum_exp", "sum_exp_z")


def integer_head(n, d, v, device, seed=0):
    """Small-integer rows and weights: every logit is exact in float32, whatever the summation order."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (n, d), generator=g).float()
    weight = torch.randint(-2, 3, (v, d), generator=g).float()
    return hidden.to(device), weight.to(device)


def sliced_stats(hidden, weight, bounds, backend, **kw):
    """exit_stats of each [a, b) slice of the head, each with its global vocab_start."""
    bias = kw.pop("bias", None)
    return [
        exit_stats(hidden, weight[a:b], bias=None if bias is None else bias[a:b], vocab_start=a, backend=backend, **kw)
        for a, b in bounds
    ]


def assert_stats_close(got, want):
    assert torch.equal(got.argmax, want.argmax)
    assert torch.equal(got.invalid, want.invalid)
    ok = ~want.invalid
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(got, name)[ok], getattr(want, name)[ok], rtol=2e-6, atol=2e-6)


def assert_results_close(got, want):
    assert torch.equal(got.token, want.token) and torch.equal(got.exit, want.exit)
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, equal_nan=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fields_shapes_and_dtypes(backend, device):
    hidden, weight = integer_head(6, 16, 50, device)
    s = exit_stats(hidden.reshape(2, 3, 16), weight, backend=backend)
    assert isinstance(s, ExitStats)
    assert all(x.shape == (2, 3) for x in s)
    assert s.argmax.dtype == torch.int64 and s.invalid.dtype == torch.bool
    assert all(getattr(s, f).dtype == torch.float32 for f in FLOAT_FIELDS)
    # max_logit is the largest logit and argmax its lowest id; sum_exp counts the maximum itself.
    z = hidden @ weight.T
    assert torch.equal(s.max_logit.reshape(-1), z.max(-1).values)
    assert torch.equal(s.argmax.reshape(-1), z.argmax(-1))
    assert (s.sum_exp >= 1).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "bounds",
    [
        [(0, 300)],
        [(0, 0), (0, 120), (120, 121), (121, 300)],  # an empty slice first, a one-column slice
        [(0, 77), (77, 77), (77, 300), (300, 300)],  # empty slices in the middle and at the end
    ],
    ids=["whole", "with-empty-and-single", "empty-middle-end"],
)
def test_merged_slices_equal_the_unsliced_op(backend, device, bounds):
    torch.manual_seed(1)
    hidden = torch.randn(9, 40, device=device)
    weight = torch.randn(300, 40, device=device) / 3
    bias = torch.randn(300, device=device)
    norm = torch.rand(40, device=device) + 0.5
    kw = dict(norm_weight=norm, bias=bias, temperature=0.7)
    whole = exit_stats(hidden, weight, backend=backend, **kw)
    merged = merge_exit_stats(sliced_stats(hidden, weight, bounds, backend, **kw))
    assert_stats_close(merged, whole)
    thr = torch.rand(9, device=device)
    for measure in HEAD_MEASURE_NAMES:
        got = finalize_exit_stats(merged, thr, measure=measure)
        want = exit_check(hidden, weight, thr, measure=measure, backend=backend, **kw)
        assert_results_close(got, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ties_across_slice_boundaries_pick_the_lowest_global_id(backend, device):
    hidden, weight = integer_head(4, 16, 200, device)
    hidden[:, :4] = torch.eye(4, device=device)
    top = 2 * hidden.abs().sum(-1).max().item() + 1  # beats any other row's dot with weights in [-2, 2]
    # Row r's winning logit stands at several ids in different slices: the lowest global id must win.
    for r, ids in enumerate([(49, 50), (150, 10), (199, 0, 100), (60, 61, 62)]):
        weight[list(ids)] = 0
        weight[list(ids), r] = top
    weight_rows = weight
    bounds = [(0, 50), (50, 61), (61, 150), (150, 200)]
    merged = merge_exit_stats(sliced_stats(hidden, weight_rows, bounds, backend))
    z = hidden @ weight_rows.T
    assert merged.argmax.tolist() == [49, 10, 0, 60] == z.argmax(-1).tolist()
    assert torch.equal(merged.max_logit, z.max(-1).values)
    assert torch.equal(merged.second_logit, z.topk(2, -1).values[:, 1])  # duplicates count
    whole = exit_stats(hidden, weight_rows, backend=backend)
    assert_stats_close(merged, whole)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_padding_rows_are_ignored(backend, device):
    hidden, weight = integer_head(5, 16, 100, device)
    # vLLM pads the vocabulary with zero rows: their logit 0 would beat the real ones if counted.
    weight = -weight.abs() - 1
    padded = torch.cat([weight, torch.zeros(28, 16, device=device)])
    hidden = hidden.abs() + 1
    want = exit_check(hidden, weight, 0.5, backend=backend)
    got = exit_check(hidden, padded, 0.5, vocab_size=100, backend=backend)
    assert_results_close(got, want)
    # As shards: [0, 64) and [64, 128) with the padding at the tail of the second.
    shards = [
        exit_stats(hidden, padded[a:b], vocab_start=a, vocab_size=100, backend=backend) for a, b in [(0, 64), (64, 128)]
    ]
    assert_results_close(finalize_exit_stats(merge_exit_stats(shards), 0.5), want)
    # A shard made only of padding is an empty slice.
    only_pad = exit_stats(hidden, padded[100:], vocab_start=100, vocab_size=100, backend=backend)
    assert (only_pad.argmax == -1).all() and (only_pad.sum_exp == 0).all() and (only_pad.max_logit == -math.inf).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_invalid_rows_stay_invalid_and_do_not_disturb(backend, device):
    torch.manual_seed(2)
    hidden = torch.randn(6, 24, device=device)
    weight = torch.randn(90, 24, device=device)
    hidden[1, 3] = math.nan
    hidden[4, 0] = math.inf
    bias = torch.randn(90, device=device)
    bias[:30] = -math.inf  # the first slice has no finite logit at all: not invalid by itself
    bounds = [(0, 30), (30, 60), (60, 90)]
    parts = sliced_stats(hidden, weight, bounds, backend, bias=bias)
    assert not parts[0].invalid[[0, 2, 3, 5]].any() and (parts[0].max_logit[[0, 2, 3, 5]] == -math.inf).all()
    res = finalize_exit_stats(merge_exit_stats(parts), 0.0)
    want = exit_check(hidden, weight, 0.0, bias=bias, backend=backend)
    assert_results_close(res, want)
    assert (res.token[[1, 4]] == -1).all() and not res.exit[[1, 4]].any() and res.max_prob[[1, 4]].isnan().all()
    # A +inf logit in one slice only: the merged row is invalid and its argmax -1, whatever the other
    # slices (and whichever backend computed the invalid one) hold.
    spiked = bias.clone()
    spiked[70] = math.inf
    merged = merge_exit_stats(sliced_stats(hidden, weight, bounds, backend, bias=spiked))
    assert merged.invalid.all() and (merged.argmax == -1).all()
    # Every slice -inf: no distribution, the row is invalid at finalize.
    dead = finalize_exit_stats(
        merge_exit_stats(sliced_stats(hidden, weight, bounds, backend, bias=bias * 0 - math.inf)), 0.0
    )
    assert (dead.token == -1).all() and not dead.exit.any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_huge_tied_logits_keep_float32_accuracy(backend, device):
    """Two tied logits at 2e4: max_prob is 0.5 to float32 rounding (exp(max - lse) gave 0.49985)."""
    d = 8
    hidden = torch.zeros(2, d, device=device)
    hidden[0, 0] = 1.0
    hidden[1, 1] = 1.0
    weight = torch.zeros(64, d, device=device)
    weight[[5, 40], 0] = 2e4
    weight[[7, 8], 1] = 2e4
    weight[20, 0] = 2e4 - 30  # a distant third: exp(-30) does not move max_prob at float32
    res = exit_check(hidden, weight, 0.5, backend=backend)
    assert res.token.tolist() == [5, 7]
    assert (res.max_prob - 0.5).abs().max().item() < 1e-6
    assert res.margin.abs().max().item() < 1e-6
    assert (res.entropy - math.log(2)).abs().max().item() < 1e-6
    assert res.exit.all()
    merged = merge_exit_stats(sliced_stats(hidden, weight, [(0, 6), (6, 30), (30, 64)], backend))
    sharded = finalize_exit_stats(merged, 0.5)
    assert sharded.token.tolist() == [5, 7] and (sharded.max_prob - 0.5).abs().max().item() < 1e-6


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_per_row_thresholds_and_every_measure(backend, device):
    torch.manual_seed(3)
    hidden = torch.randn(8, 32, device=device) * torch.linspace(0.2, 6, 8, device=device)[:, None]
    weight = torch.randn(120, 32, device=device) / 4
    stats = merge_exit_stats(sliced_stats(hidden, weight, [(0, 50), (50, 120)], backend))
    for name, spec in HEAD_MEASURES.items():
        base = finalize_exit_stats(stats, 0.0, measure=name)
        value = getattr(base, spec.statistic)
        assert torch.equal(base.confidence, value)
        thr = value.median()
        res = finalize_exit_stats(stats, thr, measure=name)
        assert torch.equal(res.exit, expected_exit(value, thr, name))
        assert 0 < int(res.exit.sum()) < 8
        per_row = value + torch.where(torch.arange(8, device=device) % 2 == 0, 1e-3, -1e-3)
        per_row = torch.where(torch.tensor(spec.exit_above, device=device), per_row, 2 * value - per_row)
        assert finalize_exit_stats(stats, per_row, measure=name).exit.tolist() == [False, True] * 4


def test_measure_table_is_what_the_kernels_read():
    assert MEASURE_NAMES == ("max_prob", "margin", "entropy", "state")
    assert HEAD_MEASURE_NAMES == ("max_prob", "margin", "entropy")
    assert all(m.source == "head" for m in HEAD_MEASURES.values()) and MEASURES["state"].source == "state"
    assert all(m.statistic in STATISTICS and STATISTICS[m.code] == m.statistic for m in HEAD_MEASURES.values())
    assert [m.exit_above for m in MEASURES.values()] == [True, True, False, True]
    # The state measure is no head statistic: no kernel code, and the head ops refuse it by name.
    with pytest.raises(ValueError, match="measure.*state_similarity"):
        _ = MEASURES["state"].code
    with pytest.raises(ValueError, match="measure.*state_similarity"):
        finalize_exit_stats(exit_stats(torch.randn(2, 8), torch.randn(5, 8)), 0.5, measure="state")
    for m in MEASURES.values():
        v = torch.tensor([0.2, 0.8])
        assert torch.equal(m.from_score(m.score(v)), v)
        assert torch.equal(m.exits(v, 0.5), v >= 0.5 if m.exit_above else v <= 0.5)


def test_merge_is_deterministic_and_neutral():
    torch.manual_seed(4)
    hidden = torch.randn(5, 16)
    weight = torch.randn(70, 16)
    parts = sliced_stats(hidden, weight, [(0, 30), (30, 70)], "torch")
    a = merge_exit_stats(parts)
    b = merge_exit_stats(parts)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    empty = exit_stats(hidden, weight[:0])
    assert (empty.argmax == -1).all() and (empty.sum_exp == 0).all()
    with_empty = merge_exit_stats([empty, *parts, empty])
    for x, y in zip(with_empty, a):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_and_empty_batch(backend, device):
    hidden, weight = integer_head(3, 16, 40, device)
    norm = torch.rand(16, device=device) + 0.5
    torch.library.opcheck(exit_stats_op, (hidden, weight, norm, None, 1e-6, 1.0, 0.0, 0.0, backend))
    empty = exit_stats(torch.empty(0, 16, device=device), weight, backend=backend)
    assert all(x.shape == (0,) for x in empty)


def test_torch_compile_fullgraph_through_slices():
    hidden, weight = integer_head(4, 16, 60, "cpu")

    def step(h, thr):
        parts = [exit_stats(h, weight[a:b], vocab_start=a) for a, b in [(0, 25), (25, 60)]]
        r = finalize_exit_stats(merge_exit_stats(parts), thr, measure="entropy")
        return r.token, r.exit, r.entropy

    compiled = torch.compile(step, fullgraph=True)
    for thr in (0.5, 2.0):
        for got, want in zip(compiled(hidden, thr), step(hidden, thr)):
            assert torch.equal(got, want)


def test_errors_name_the_argument():
    hidden, weight = integer_head(3, 8, 20, "cpu")
    cases = [
        (lambda: exit_stats(hidden, weight, vocab_start=-1), "vocab_start"),
        (lambda: exit_stats(hidden, weight, vocab_start=1.5), "vocab_start"),
        (lambda: exit_stats(hidden, weight, vocab_start=math.inf), "vocab_start"),
        (lambda: exit_stats(hidden, weight, vocab_start=math.nan), "vocab_start"),
        (lambda: exit_stats(hidden, weight, vocab_start=2**63 - 5), "vocab_start"),  # ids past int64
        (lambda: exit_stats(hidden, weight, vocab_start=0, vocab_size=math.inf), "vocab_size"),
        (lambda: exit_stats(hidden, weight, vocab_start=30, vocab_size=20), "vocab_start"),
        (lambda: exit_stats(hidden, weight, vocab_size=0), "vocab_size"),
        (lambda: exit_stats(hidden, weight.half()), "weight"),
        (lambda: exit_check(hidden, weight, 0.5, vocab_start=-3), "vocab_start"),
        (lambda: exit_check(hidden, weight[:0], 0.5), "weight"),
        (lambda: merge_exit_stats([]), "stats"),
        (lambda: merge_exit_stats([exit_stats(hidden, weight), (1, 2)]), r"stats\[1\]"),
        (lambda: merge_exit_stats([exit_stats(hidden, weight), exit_stats(hidden[:2], weight)]), r"stats\[1\]"),
        (lambda: finalize_exit_stats(exit_stats(hidden, weight), 0.5, measure="top1"), "measure"),
        (lambda: finalize_exit_stats(exit_stats(hidden, weight), torch.ones(4)), "threshold"),
        (lambda: finalize_exit_stats((1, 2), 0.5), "stats"),
        (lambda: exit_stats(hidden, weight, group=object()), "group"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_public_names():
    for name in ("ExitStats", "exit_stats", "merge_exit_stats", "finalize_exit_stats"):
        assert name in earlyexit.__all__ and hasattr(earlyexit, name)
