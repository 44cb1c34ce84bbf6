"""measure="state" (CALM's hidden-state saturation) on small random-weight Llama and Qwen3 models (CPU, seconds).

A row exits at exit layer k when cos(h_k, h_(k-1)) >= threshold, decided without the head; only the
exiting rows then go through the head for their token. The oracle is transformers itself: model.generate,
output_hidden_states (the states the similarity compares, and the exit tokens) and the model's own cache.
"""

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from test_hf_generate import (  # noqa: E402
    _first_step_states,
    assert_cache_is_the_models_own,
    assert_first_step_cache,
)
from tiny_models import left_padded_batch, random_ids, tiny_causal_lm  # noqa: E402

import earlyexit  # noqa: E402
from earlyexit import CostModel, EarlyExitLM, calibrate  # noqa: E402
from earlyexit.hf import DraftPolicy  # noqa: E402
from earlyexit.hf.draft_policy import NEVER_STATE, THRESHOLDS, AdaptiveDraft, FixedDraft  # noqa: E402
from earlyexit.tuning.calibrate import exit_scores  # noqa: E402
from earlyexit.tuning.teacher_forcing import collect_states  # noqa: E402
from earlyexit.tuning.text_data import token_windows  # noqa: E402

L = 6
EXITS = [2, 4]
T = 7


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return tiny_causal_lm(request.param, num_layers=L)


@pytest.fixture(scope="module")
def llama():
    """Calibration and costs run on one family: the state measure's scoring does not depend on it."""
    return tiny_causal_lm("llama", num_layers=L)


@pytest.fixture(scope="module")
def batch():
    """Three prompts of lengths 7, 4 and 2 (T = 7), left-padded with token 0."""
    return left_padded_batch()


def _reference(model, ids, am, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=am, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _similarities(hidden, k):
    """cos(h_k, h_(k-1)) of the last position, float32 [B], from output_hidden_states."""
    return F.cosine_similarity(hidden[k][:, -1].float(), hidden[k - 1][:, -1].float(), dim=-1)


def _direct_token(model, h, head=None):
    """The exit token of hidden states h [B, d]: (adapter,) final norm, lm_head, argmax."""
    return model.lm_head(model.model.norm(h if head is None else head(h))).argmax(-1)


def test_unreachable_threshold_is_full_depth(model, batch):
    """Cosines are <= 1: at 1.5 no row exits, the output is greedy generate's and the head ran only at full depth."""
    ids, am = batch
    out = EarlyExitLM(model, EXITS, measure="state", threshold=1.5).generate(ids, am, max_new_tokens=8)
    assert torch.equal(out.sequences, _reference(model, ids, am, 8))
    assert (out.exit_layer[out.exit_layer > 0] == L).all()
    assert out.stats["head_rows"] == out.stats["new_tokens"]


def test_every_row_exits_at_the_first_exit_layer(model, batch):
    """At -1.5 every row exits at the first exit layer, with the head's token of the first k layers, and
    the head is evaluated once per token (the exiting rows only)."""
    ids, am = batch
    k, n = EXITS[0], 4
    out = EarlyExitLM(model, EXITS, measure="state", threshold=-1.5).generate(
        ids, am, max_new_tokens=n, eos_token_id=[]
    )
    assert (out.exit_layer == k).all()
    assert out.stats["head_rows"] == ids.shape[0] * n == out.stats["new_tokens"]
    with torch.no_grad():
        hidden, _, _ = _first_step_states(model, ids, am)
        assert torch.equal(out.sequences[:, T], _direct_token(model, hidden[k][:, -1]))


def _split_thresholds(s):
    """Thresholds [t0, t1] halfway between neighbouring similarities s (two [B] tensors) so that one row
    exits at the first exit layer, one at the second and the third runs full depth."""
    order0 = s[0].argsort(descending=True).tolist()
    rest = sorted(order0[1:], key=lambda r: -float(s[1][r]))
    t0 = float(s[0][order0[0]] + s[0][order0[1]]) / 2
    t1 = float(s[1][rest[0]] + s[1][rest[1]]) / 2
    return [t0, t1]


def test_middle_threshold_splits_rows_and_propagates_the_cache(model, batch):
    """Thresholds from the direct similarities split the rows of the first step over both exit layers and
    full depth; decisions equal cos(h_k, h_(k-1)) >= thr, exit tokens the direct ones, and every cache
    entry of that step is the layer's own (below the exit) or state propagation of the exit state."""
    ids, am = batch
    with torch.no_grad():
        hidden, hf_cache, pos = _first_step_states(model, ids, am)
    s = [_similarities(hidden, k) for k in EXITS]
    thr = _split_thresholds(s)
    eem = EarlyExitLM(model, EXITS, measure="state", threshold=thr)
    out = eem.generate(ids, am, max_new_tokens=2)
    exit_at = out.exit_layer[:, 0]
    want = torch.where(s[0] >= thr[0], EXITS[0], torch.where(s[1] >= thr[1], EXITS[1], L))
    assert torch.equal(exit_at, want) and sorted(exit_at.tolist()) == sorted([*EXITS, L])

    with torch.no_grad():
        for r in range(3):
            h = hidden[int(exit_at[r])][r, -1]
            assert int(out.sequences[r, T]) == int(model.lm_head(model.model.norm(h)).argmax(-1)), f"row {r}"
    assert_first_step_cache(model, out, exit_at, hidden, hf_cache, pos)
    # The head ran once per token: the exiting row at its exit layer, the others at full depth.
    assert out.stats["head_rows"] == out.stats["new_tokens"]
    # The masking-only reference path takes the same decisions and tokens.
    eem.compaction = False
    masked = eem.generate(ids, am, max_new_tokens=2)
    assert torch.equal(masked.sequences, out.sequences) and torch.equal(masked.exit_layer, out.exit_layer)


def test_adapters_shape_the_token_not_the_decision(model, batch):
    """With per-exit adapters the similarity still compares the raw hidden states (same exit layers as
    without them); the exit token comes from the adapter then the shared head."""
    ids, am = batch
    torch.manual_seed(5)
    adapter = torch.nn.Linear(model.config.hidden_size, model.config.hidden_size)
    with torch.no_grad():
        hidden, _, _ = _first_step_states(model, ids, am)
    thr = _split_thresholds([_similarities(hidden, k) for k in EXITS])
    plain = EarlyExitLM(model, EXITS, measure="state", threshold=thr).generate(ids, am, max_new_tokens=1)
    adapted = EarlyExitLM(model, EXITS, measure="state", threshold=thr, heads={EXITS[0]: adapter}).generate(
        ids, am, max_new_tokens=1
    )
    assert torch.equal(adapted.exit_layer, plain.exit_layer)
    r = int((adapted.exit_layer[:, 0] == EXITS[0]).nonzero())
    with torch.no_grad():
        want = _direct_token(model, hidden[EXITS[0]][r : r + 1, -1], adapter)
    assert int(adapted.sequences[r, T]) == int(want)


def test_sampling_runs_and_counts_one_head_per_token(model, batch):
    ids, am = batch
    torch.manual_seed(0)
    out = EarlyExitLM(model, EXITS, measure="state", threshold=0.0).generate(
        ids, am, max_new_tokens=5, do_sample=True, temperature=0.8, eos_token_id=[]
    )
    assert ((out.sequences >= 0) & (out.sequences < 300)).all()
    assert out.stats["head_rows"] == out.stats["new_tokens"] == 15


class _Recording(FixedDraft):
    """A fixed draft policy that records each round's confidences."""

    def __init__(self, policy):
        super().__init__(policy)
        self.rounds = []

    def observe_round(self, depth, confidences, drafted, accepted, draft_s, verify_s):
        self.rounds.append((list(confidences), drafted))


@pytest.mark.parametrize("threshold", [-math.inf, "first", 1.5])
def test_exact_mode_drafts_on_the_state_similarity(model, batch, threshold):
    """Exact mode with measure="state" equals generate whatever stops the rounds; a round's confidence is
    the min-over-rows cos(h_E, h_(E-1)) of the draft step (checked against the model's own states for the
    first one), so threshold 1.5 stops every round at its first draft and -inf never stops early."""
    ids, am = batch
    n, depth = 7, EXITS[0]
    ref = _reference(model, ids, am, n)
    with torch.no_grad():  # the first draft step's input is the first generated token (full-depth prefill)
        am1 = torch.cat([am, am.new_ones(3, 1)], dim=1)
        hidden, _, _ = _first_step_states(model, ref[:, : T + 1], am1)
    first = float(_similarities(hidden, depth).min())
    thr = first if threshold == "first" else threshold
    eem = EarlyExitLM(model, EXITS, measure="state", threshold=0.9)
    spy = _Recording(DraftPolicy(depth, thr, max_tokens=4))
    eem._draft_policy = lambda batch, chooser: spy
    out = eem.generate(ids, am, max_new_tokens=n, mode="exact")
    assert torch.equal(out.sequences, ref)
    assert spy.rounds and spy.rounds[0][0][0] == pytest.approx(first, abs=1e-5)
    if threshold == 1.5:  # every round stops at its first draft, which is dropped
        assert all(len(c) == 1 and d == 0 for c, d in spy.rounds)
    elif threshold == -math.inf:  # no round stops early: every draft step is verified
        assert all(len(c) == d for c, d in spy.rounds) and max(d for _, d in spy.rounds) == 4
        assert_cache_is_the_models_own(model, out, am)


@pytest.mark.gpu
def test_cuda_state_measure(batch):
    """The state path on a GPU (float32): the similarity kernel, the exiting rows' head, compaction and
    propagation on CUDA tensors; full depth equals generate, compacted equals masking-only, exact equals generate."""
    model = tiny_causal_lm("llama", num_layers=L).to("cuda")
    ids, am = (t.cuda() for t in batch)
    ref = _reference(model, ids, am, 8)
    eem = EarlyExitLM(model, EXITS, measure="state", threshold=1.5)
    assert torch.equal(eem.generate(ids, am, max_new_tokens=8).sequences, ref)
    eem.thresholds = [0.6, 0.8]
    out = eem.generate(ids, am, max_new_tokens=8)
    assert out.sequences.device.type == "cuda" and out.stats["head_rows"] == out.stats["new_tokens"]
    eem.compaction = False
    assert torch.equal(eem.generate(ids, am, max_new_tokens=8).sequences, out.sequences)
    eem.draft = DraftPolicy(EXITS[0], float("-inf"), max_tokens=3)
    assert torch.equal(eem.generate(ids, am, max_new_tokens=8, mode="exact").sequences, ref)


def test_adaptive_policy_thresholds_follow_the_measure():
    """Under "state" the adaptive policy tries -inf (never stop) and quantiles of the similarities seen at
    the depth; the head measures keep their probability grid."""
    assert AdaptiveDraft(L, EXITS, 4)._thresholds(2) == THRESHOLDS
    policy = AdaptiveDraft(L, EXITS, 4, measure="state")
    assert policy._thresholds(2) == (NEVER_STATE,)
    policy.observe_plain(1.0)
    policy.observe_round(2, [0.9, 0.8, 0.95, float("-inf")], 3, [3, 1], 0.3, 0.5)
    grid = policy._thresholds(2)
    assert grid[0] == NEVER_STATE and set(grid[1:]) <= {0.8, 0.9, 0.95} and len(grid) > 1
    assert policy._thresholds(4) == (NEVER_STATE,)
    choice = policy.choose(10)
    assert choice.depth is None or choice.threshold in policy._thresholds(choice.depth)


def test_exact_mode_auto_equals_generate(model, batch):
    ids, am = batch
    eem = EarlyExitLM(model, EXITS, measure="state", threshold=0.9)
    eem.draft_tokens = 3
    out = eem.generate(ids, am, max_new_tokens=10, mode="exact")
    assert torch.equal(out.sequences, _reference(model, ids, am, 10))


def _costs(exit_layers, state=True):
    """A one-row-count CostModel in units of one layer: a cheap similarity check, the head on exiting rows."""
    return CostModel(
        rows=(1,),
        layer=(1.0,),
        head=(1.0,),
        exit_check={k: (0.05,) for k in exit_layers},
        propagate=(0.1,),
        verify_position=(0.1,),
        num_layers=L,
        context=32,
        device="cpu",
        dtype="float32",
        exit_token={k: (1.0,) for k in exit_layers} if state else {},
    )


def test_calibrate_scores_are_the_state_similarities(llama):
    """Teacher-forced scores are cos(h_k, h_(k-1)) of the model's own states (the layers k - 1 collected
    too), and the exit tokens those of the head at k."""
    data, model = random_ids(256, 3), llama
    eem = EarlyExitLM(model, EXITS, measure="state")
    scores = exit_scores(eem, data, seq_len=32, progress=False)
    states, _ = collect_states(model, EXITS, token_windows(data, 32), previous=True, progress=False)
    assert set(states) == {1, 2, 3, 4}
    for j, k in enumerate(EXITS):
        want = F.cosine_similarity(states[k], states[k - 1], dim=-1)
        torch.testing.assert_close(scores.scores[j], want, rtol=0, atol=1e-5)
    head = exit_scores(EarlyExitLM(model, EXITS), data, seq_len=32, progress=False)
    assert torch.equal(scores.correct, head.correct)


@pytest.mark.parametrize("objective", ["layers", "time"])
def test_calibrate_state(llama, batch, objective):
    eem = EarlyExitLM(llama, EXITS, measure="state")
    costs = _costs(EXITS) if objective == "time" else None
    thresholds, report = calibrate(
        eem, random_ids(512, 6), target_agreement=0.6, objective=objective, costs=costs, seq_len=32, progress=False
    )
    assert report.measure == "state" and eem.thresholds == thresholds and len(thresholds) == len(eem.exit_layers)
    assert eem.exit_layers and all(math.isfinite(t) for t in thresholds), report
    assert report.agreement >= 0.6
    if objective == "time":
        assert report.time_per_token_s < report.full_depth_time_s
    ids, am = batch
    out = eem.generate(ids, am, max_new_tokens=4)
    assert out.sequences.shape == (3, T + 4)


def test_measured_costs_of_the_state_measure(llama):
    """measure_costs times the state check (similarity and decision) and, apart, the head on exiting rows."""
    model = llama
    eem = EarlyExitLM(model, EXITS, measure="state")
    costs = earlyexit.measure_costs(eem, batch_sizes=(1,), context=16, repeats=2)
    assert set(costs.exit_check) == set(costs.exit_token) == set(EXITS)
    assert all(costs.exit_check_s(k) > 0 and costs.exit_token_s(k) > 0 for k in EXITS)
    assert "token@2" in str(costs)
    head = earlyexit.measure_costs(EarlyExitLM(model, EXITS), batch_sizes=(1,), context=16, repeats=2)
    assert head is not costs and head.exit_token == {} and head.exit_token_s(EXITS[0]) == 0.0


def test_bad_input(llama):
    model = llama
    with pytest.raises(ValueError, match="threshold"):
        EarlyExitLM(model, EXITS, measure="state", threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold"):
        EarlyExitLM(model, EXITS, measure="state", threshold=[0.5, -math.inf])  # would always exit
    assert EarlyExitLM(model, EXITS, measure="state", threshold=[math.inf, 2.0]).thresholds == [math.inf, 2.0]
    h, w = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="measure.*state_similarity"):
        earlyexit.exit_check(h, w, 0.5, measure="state")
    with pytest.raises(ValueError, match="measure.*state_similarity"):
        earlyexit.ExitHead(w, measure="state")
    eem = EarlyExitLM(model, EXITS, measure="state")
    with pytest.raises(ValueError, match="costs"):  # a head measure's cost model
        calibrate(eem, random_ids(64, 5), costs=_costs(EXITS, state=False), seq_len=32, progress=False)
    with pytest.raises(ValueError, match="costs"):
        calibrate(EarlyExitLM(model, EXITS), random_ids(64, 5), costs=_costs(EXITS), seq_len=32, progress=False)
