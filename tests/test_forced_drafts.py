"""benchmarks/forced_drafts.py: exact mode with drafts forced to agree a chosen fraction alpha (CPU, seconds).

The forcing sets the acceptance (alpha = 1: every draft kept, alpha = 0: none) while the real draft
steps still run and the verification keeps the output equal to model.generate greedy.
"""

import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import tiny_causal_lm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from forced_drafts import expected_acceptance, expected_rounds, forced_drafts  # noqa: E402

import earlyexit.hf.forward as hf_forward  # noqa: E402
import earlyexit.hf.generate as hf_generate  # noqa: E402
from earlyexit import EarlyExitLM  # noqa: E402
from earlyexit.hf import DraftPolicy  # noqa: E402
from earlyexit.hf.draft_policy import FixedDraft  # noqa: E402

L, T, N, V = 6, 7, 10, 300
POLICY = DraftPolicy(2, 0.0, 3)


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", num_layers=L, vocab_size=V)


@pytest.fixture(scope="module")
def batch():
    """Two prompts of lengths 7 and 4, left-padded with token 0."""
    torch.manual_seed(1)
    ids = torch.randint(3, V, (2, T))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    return ids.masked_fill(am == 0, 0), am


def _generate(model, ids, am):
    with torch.no_grad():
        return model.generate(ids, attention_mask=am, max_new_tokens=N, do_sample=False, pad_token_id=0)


def _forced(model, ids, am, alpha, draft=POLICY):
    ref = _generate(model, ids, am)
    eem = EarlyExitLM(model, [2, 4])
    eem.draft = draft
    with forced_drafts(ref[:, T:], am, alpha, V) as stats:
        out = eem.generate(ids, am, max_new_tokens=N, mode="exact")
    return ref, out, stats


@pytest.mark.parametrize("rows", [1, 2], ids=["batch1", "batch2"])
@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_acceptance_is_forced(model, batch, rows, alpha):
    ids, am = (t[:rows] for t in batch)
    ref, out, stats = _forced(model, ids, am, alpha)
    assert torch.equal(out.sequences, ref)
    assert out.stats["draft_rounds"] > 0
    assert out.stats["acceptance_rate"] == alpha
    assert stats.hit_rate == alpha
    # The first token comes from the prompt's prefill; the last position has no room for a draft: a plain step.
    if alpha == 1.0:  # every round keeps all its drafts: the N - 2 tokens between in rounds of 4
        assert out.stats["draft_rounds"] == 2 and out.stats["plain_steps"] == 1
    else:  # every round yields only the verifier's token
        assert out.stats["draft_rounds"] == N - 2


def test_partial_acceptance(model, batch):
    ids, am = batch
    ref, out, stats = _forced(model, ids, am, 0.5)
    assert torch.equal(out.sequences, ref)
    assert 0.0 < out.stats["acceptance_rate"] < 1.0
    assert 0.0 < stats.hit_rate < 1.0
    # Each forced draft is one real draft step's row: the steps ran (their cost is paid).
    assert stats.draft_steps == out.stats["draft_steps"] > 0
    assert stats.draft_steps <= stats.drafts <= 2 * stats.draft_steps  # rows that are done draft nothing
    assert len(stats.rounds) == out.stats["draft_rounds"]


def test_adaptive_policy_equals_generate(model, batch):
    ids, am = batch
    ref, out, _ = _forced(model, ids[:1], am[:1], 1.0, draft="auto")
    assert torch.equal(out.sequences, ref)


def test_patches_are_restored(model, batch):
    ids, am = batch
    observe = FixedDraft.__dict__["observe_round"]
    with pytest.raises(RuntimeError):
        with forced_drafts(torch.zeros(2, N, dtype=torch.int64), am, 0.5, V):
            assert hf_generate.draft_step is not hf_forward.draft_step
            raise RuntimeError("boom")
    assert hf_generate.draft_step is hf_forward.draft_step
    assert FixedDraft.__dict__["observe_round"] is observe


def test_cost_model_helpers():
    assert expected_acceptance(1.0, {3: 2}) == 1.0
    assert expected_acceptance(0.0, {3: 2, 1: 1}) == 0.0
    assert expected_acceptance(0.5, {2: 1}) == pytest.approx((0.5 + 0.25) / 2)
    # N = 10 in rounds of 3 drafts: 4 + 4 + 2 tokens (the last round drafts 1: 9 - 8 left - 1).
    assert expected_rounds(1.0, 3, N) == {3: 2.0, 1: 1.0}
    assert expected_rounds(0.0, 3, N, rows=2) == {3: 7.0, 2: 1.0, 1: 1.0, 0: 1.0}
    mixed = expected_rounds(0.5, 3, N, rows=2, trials=500)
    assert 3 < sum(mixed.values()) < 10
