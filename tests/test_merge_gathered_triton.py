"""The one-kernel merge of gathered exit statistics (triton_kernels/merge_stats.py) against the merge of
earlyexit.ops.reference.merge_stats (and, with the decision, finalize_exit_stats of it), on the words
all_gather_exit_stats moves: the interpreter here, the GPU where there is one. Ties across ranks, empty
and all -inf slices, invalid rows, huge logits, world sizes that are no power of two, several programs,
every measure with per-row thresholds."""

import math

import pytest
import torch
from test_exit_stats import assert_results_close, assert_stats_close, integer_head, sliced_stats

from earlyexit import ExitResult, ExitStats, exit_stats, finalize_exit_stats
from earlyexit.distributed import _pack, merge_gathered
from earlyexit.ops.backends import unavailable_reason
from earlyexit.ops.measures import HEAD_MEASURES, get_head_measure
from earlyexit.ops.reference import empty_stats

triton_here = pytest.mark.skipif(
    unavailable_reason("triton", "cpu") is not None, reason=str(unavailable_reason("triton", "cpu"))
)


def _bounds(v, ranks):
    """Uneven vocabulary shards of [0, v) over ``ranks`` ranks (the last ones may be shorter)."""
    per = -(-v // ranks)
    return [(min(r * per, v), min((r + 1) * per, v)) for r in range(ranks)]


def _same_bits(a, b):
    """Field by field bitwise equality (NaN included)."""
    bits = [(x.view(torch.int32), y.view(torch.int32)) if x.is_floating_point() else (x, y) for x, y in zip(a, b)]
    return all(torch.equal(x, y) for x, y in bits)


def _words(parts):
    """[W, 7, N] int32, as all_gather_exit_stats stacks what it gathered."""
    return torch.stack([_pack(ExitStats(*p)) for p in parts])


def _cases(device="cpu"):
    """(name, hidden, weight, per-rank stats) with every kind of slice."""
    out = []
    for ranks, n in ((1, 3), (2, 7), (3, 300), (5, 2), (8, 300)):
        hidden, weight = integer_head(n, 16, 8 * ranks + 3, device, seed=ranks)  # exact logits: ties
        bounds = _bounds(weight.shape[0], ranks)
        out.append((f"ties-w{ranks}-n{n}", hidden, weight, bounds, {}))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 32, generator=g).to(device)
    weight = torch.randn(70, 32, generator=g).to(device)
    hidden[2, 5] = math.nan  # invalid rows: NaN and inf hidden states
    hidden[6, 0] = math.inf
    bias = torch.zeros(70, device=device)
    bias[:30] = -math.inf  # rank 0 has no finite logit: neutral, not invalid
    out.append(("invalid-and-inf-bias", hidden, weight, _bounds(70, 3), dict(bias=bias)))
    out.append(("huge", hidden * 1e3, weight * 1e2, _bounds(70, 4), {}))
    return out


def _parts(hidden, weight, bounds, kw):
    return [tuple(s) for s in sliced_stats(hidden, weight, bounds, "torch", **dict(kw))]


@triton_here
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_kernel_equals_the_reference_merge(case):
    from earlyexit.triton_kernels.merge_stats import merge_gathered_triton

    _, hidden, weight, bounds, kw = case
    words = _words(_parts(hidden, weight, bounds, kw))
    got = ExitStats(*merge_gathered_triton(words))
    want = merge_gathered(words)  # on the CPU: the unpack and merge_stats
    assert_stats_close(got, want)
    assert (got.argmax[got.invalid] == -1).all()
    assert_stats_close(got, exit_stats(hidden, weight, backend="torch", **kw))  # = the unsliced head
    assert _same_bits(got, merge_gathered_triton(words))  # deterministic


@triton_here
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_kernel_decision_equals_finalize_of_the_merge(case):
    from earlyexit.triton_kernels.merge_stats import merge_check_gathered_triton

    _, hidden, weight, bounds, kw = case
    words = _words(_parts(hidden, weight, bounds, kw))
    merged = merge_gathered(words)
    n = hidden.shape[0]
    for spec in map(get_head_measure, HEAD_MEASURES):
        value = getattr(finalize_exit_stats(merged, 0.0, measure=spec.name), spec.statistic)
        # Per-row thresholds just below and above each row's own value: both sides of the rule (not at
        # equality, which float32 rounding of the two computations may decide either way).
        thr = torch.nan_to_num(value, nan=0.5) + torch.tensor([-1e-3, 1e-3]).repeat(n)[:n]
        got = ExitResult(*merge_check_gathered_triton(words, thr.contiguous(), spec.code, spec.exit_above))
        want = finalize_exit_stats(merged, thr, measure=spec.name)
        assert_results_close(got, want)
        assert got.exit.any() and not got.exit[~merged.invalid].all()  # both sides of the rule
        assert not got.exit[merged.invalid].any() and (got.token[merged.invalid] == -1).all()


@triton_here
def test_empty_ranks_are_neutral():
    """A rank whose shard has no column (or sent the neutral element) changes nothing, wherever it is."""
    from earlyexit.triton_kernels.merge_stats import merge_gathered_triton

    hidden, weight = integer_head(5, 16, 40, "cpu")
    parts = _parts(hidden, weight, _bounds(40, 2), {})
    empty = empty_stats(5, "cpu")
    got = ExitStats(*merge_gathered_triton(_words([empty, parts[0], empty, parts[1], empty])))
    assert_stats_close(got, merge_gathered(_words(parts)))
    assert _same_bits(merge_gathered_triton(_words([empty])), empty)


@pytest.mark.gpu
def test_cuda_merge_equals_the_reference():
    """On CUDA tensors merge_gathered runs the kernel (auto picks Triton there); so does the decision."""
    from earlyexit.triton_kernels.merge_stats import merge_check_gathered_triton

    for name, hidden, weight, bounds, kw in _cases():
        words = _words(_parts(hidden, weight, bounds, kw))
        merged = merge_gathered(words)
        got = merge_gathered(words.cuda())
        assert_stats_close(ExitStats(*(x.cpu() for x in got)), merged), name
        spec = get_head_measure("max_prob")
        thr = torch.full((hidden.shape[0],), 0.3)
        got = merge_check_gathered_triton(words.cuda(), thr.cuda(), spec.code, spec.exit_above)
        assert_results_close(ExitResult(*(x.cpu() for x in got)), finalize_exit_stats(merged, thr)), name
