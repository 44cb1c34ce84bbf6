"""Exact mode's draft policies (earlyexit/hf/draft_policy.py) on small random-weight models (CPU, seconds).

Every policy must reproduce model.generate greedy token for token; the fixed ones also pin down how
many draft steps run and what the statistics report.
"""

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_generate import EXITS, L, T, _reference, assert_cache_is_the_models_own  # noqa: E402
from tiny_models import left_padded_batch, tiny_causal_lm  # noqa: E402

import earlyexit.hf.generate as hf_generate  # noqa: E402
from earlyexit import EarlyExitLM  # noqa: E402
from earlyexit.hf import DraftPolicy  # noqa: E402
from earlyexit.hf.draft_policy import EXPLORE_BUDGET, MEMORY_KEYS, WINDOW, AdaptiveDraft, DraftMemory  # noqa: E402

N = 10
POLICIES = {
    "auto": "auto",
    "exit-layer": DraftPolicy(EXITS[0], 0.0, 3),  # E = 2 through its exit head
    "shared-head": DraftPolicy(3, 0.05, 4),  # E = 3 is no exit layer: the shared head
    "deep": DraftPolicy(EXITS[1], 0.0, 2),
}


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return tiny_causal_lm(request.param, num_layers=L)


@pytest.fixture(scope="module")
def batch():
    """Three prompts of lengths 7, 4 and 2 (T = 7), left-padded with token 0."""
    return left_padded_batch()


def _eem(model, draft):
    eem = EarlyExitLM(model, EXITS, threshold=0.1, heads={EXITS[0]: torch.nn.Identity()})
    eem.draft = draft
    return eem


@pytest.mark.parametrize("name", list(POLICIES))
def test_policies_equal_generate(model, batch, name):
    ids, am = batch
    eem = _eem(model, POLICIES[name])
    for rows in (slice(0, 1), slice(0, 3)):
        ref = _reference(model, ids[rows], am[rows], N)
        out = eem.generate(ids[rows], am[rows], max_new_tokens=N, mode="exact")
        assert torch.equal(out.sequences, ref), (name, rows)
    if name != "auto":
        assert out.stats["draft_rounds"] > 0 and out.stats["draft_depth"] == POLICIES[name].depth


@pytest.mark.parametrize("name", ["auto", "exit-layer", "shared-head"])
def test_policies_with_eos(model, batch, name):
    ids, am = batch
    eos = int(_reference(model, ids, am, N)[0, T + 3])  # row 0 stops after 4 tokens
    ref = _reference(model, ids, am, N, eos=eos)
    out = _eem(model, POLICIES[name]).generate(ids, am, max_new_tokens=N, mode="exact", eos_token_id=eos)
    assert torch.equal(out.sequences, ref)
    assert (out.exit_layer[0, 4:] == 0).all()


@pytest.mark.parametrize("draft", [DraftPolicy(None), "tokens=0"])
def test_no_drafts_is_plain_decoding(model, batch, draft, monkeypatch):
    ids, am = batch
    ref = _reference(model, ids, am, N)
    monkeypatch.setattr(hf_generate, "draft_step", lambda *a, **k: pytest.fail("a draft step ran"))
    eem = _eem(model, "auto" if draft == "tokens=0" else draft)
    if draft == "tokens=0":
        eem.draft_tokens = 0  # today's knob: no drafts per round
    out = eem.generate(ids, am, max_new_tokens=N, mode="exact")
    assert torch.equal(out.sequences, ref)
    s = out.stats
    # The first token comes from the prompt's full-depth prefill, every other one from a plain step.
    assert s["draft_steps"] == 0 and s["draft_rounds"] == 0 and s["plain_steps"] == N - 1
    assert s["draft_depth"] is None and (out.exit_layer == L).all()


def test_stats_report_the_policy(model, batch):
    ids, am = batch
    out = _eem(model, DraftPolicy(EXITS[0], 0.0, 3)).generate(ids, am, max_new_tokens=N, mode="exact")
    s = out.stats
    # A plain step only when one token is left (nothing to draft for).
    assert s["draft_depth"] == EXITS[0] and s["draft_threshold"] == 0.0 and s["plain_steps"] <= 1
    assert set(s["block_lengths"]) <= {1, 2, 3} and sum(s["block_lengths"].values()) == s["draft_rounds"]
    assert 0 <= s["acceptance_rate"] <= 1 and 0 < s["mean_block_length"] <= 3
    # Threshold 0 never stops early: every round drafts its full block (the last may be shorter).
    assert s["draft_steps"] == sum(n * k for n, k in s["block_lengths"].items())
    assert set(out.exit_layer.unique().tolist()) <= {0, EXITS[0], L}


def test_unreachable_draft_threshold_stops_after_one_draft(model, batch):
    ids, am = batch
    ref = _reference(model, ids, am, N)
    out = _eem(model, DraftPolicy(EXITS[0], 1.5, 4)).generate(ids, am, max_new_tokens=N, mode="exact")
    assert torch.equal(out.sequences, ref)
    s = out.stats
    # One draft step per round, dropped: every round verifies the pending token alone (the first
    # token comes from the prefill; the last, with nothing left to draft for, is a plain step).
    assert s["draft_steps"] == s["draft_rounds"] == N - 2 and s["block_lengths"] == {0: N - 2}
    assert (out.exit_layer == L).all()


@pytest.mark.parametrize("draft", [DraftPolicy(EXITS[0], 0.0, 3), DraftPolicy(3, 0.05, 4)])
def test_cache_is_the_models_own(model, batch, draft):
    """After generation every cached entry (real positions, every layer) equals the model's own cache:
    the drafts' layers below E are reused, the layers above are recomputed, holes never stay."""
    ids, am = batch
    out = _eem(model, draft).generate(ids, am, max_new_tokens=N, mode="exact")
    assert out.stats["acceptance_rate"] > 0  # drafts were kept, so their cache entries were reused
    assert_cache_is_the_models_own(model, out, am)


def test_stopping_threshold_exercises_both_verifications(model, batch):
    """Threshold 0.05 at E = 3 (the tiny models' probabilities are low): some rounds stop on a
    low-confidence draft (all block states from the drafts), others end at max_tokens (the last
    draft's lower layers run in the verification)."""
    ids, am = batch
    out = _eem(model, DraftPolicy(3, 0.05, 4)).generate(ids, am, max_new_tokens=N, mode="exact")
    s = out.stats
    verified = sum(n * k for n, k in s["block_lengths"].items())
    assert s["draft_steps"] > verified, "no round stopped on the threshold"
    assert 4 in s["block_lengths"], "no round reached max_tokens"


def test_sampling_with_tiny_top_p_is_greedy(model, batch):
    ids, am = batch
    ref = _reference(model, ids, am, 8)
    out = _eem(model, DraftPolicy(EXITS[0], 0.0, 3)).generate(
        ids, am, max_new_tokens=8, mode="exact", do_sample=True, top_p=1e-6
    )
    assert torch.equal(out.sequences, ref)


def test_half_precision_fixed_policy(batch):
    model = tiny_causal_lm("llama", num_layers=L).to(torch.bfloat16)
    ids, am = batch
    ref = _reference(model, ids, am, 8)
    for draft in (DraftPolicy(EXITS[0], 0.0, 3), DraftPolicy(None)):
        assert torch.equal(_eem(model, draft).generate(ids, am, max_new_tokens=8, mode="exact").sequences, ref)


def test_adaptive_policy_follows_measurements():
    """Cheap drafts that are always accepted win; drafts that are always rejected fall back to plain
    steps with occasional one-draft probes, within the exploration budget."""
    policy = AdaptiveDraft(30, [12, 24], 4)
    assert policy.choose(10).depth is None  # nothing measured yet
    policy.observe_plain(1.0)
    for _ in range(5):
        policy.observe_round(12, [0.99] * 4, 4, [4], 4 * 0.4, 0.8)
    choice = policy.choose(10)
    assert (choice.depth, choice.max_tokens) == (12, 4)
    assert policy.choose(2).max_tokens == 2  # never more drafts than the call has tokens left

    policy = AdaptiveDraft(30, [12], 4)
    policy.observe_plain(1.0)
    rounds = []
    for _ in range(60):
        choice = policy.choose(10)
        rounds.append(choice.depth)
        if choice.depth is None:
            policy.observe_plain(1.0)
        else:
            assert choice.max_tokens == 1
            policy.observe_round(choice.depth, [0.99], 1, [0], 0.5, 1.5)  # each probe loses 1 s
    # Probes stop while their losses exceed the budget's share of the time.
    assert 1 <= sum(d is not None for d in rounds) <= 1 + EXPLORE_BUDGET * 60 / 1.0 + 1


def test_adaptive_policy_forgets_old_drafts():
    """Only the last WINDOW drafts per depth count: after a long run of accepted drafts, a window of
    rejected ones turns drafting off (all-time counts would keep it on for as long again)."""
    policy = AdaptiveDraft(30, [12], 4)
    policy.observe_plain(1.0)
    for _ in range(WINDOW):
        policy.observe_round(12, [0.99] * 4, 4, [4], 4 * 0.1, 0.8)
    assert policy.choose(10) == DraftPolicy(12, 0.0, 4)
    for _ in range(WINDOW):  # a round whose first draft is rejected tells about that draft only
        policy.observe_round(12, [0.99] * 4, 4, [0], 4 * 0.1, 0.8)
    assert len(policy.seen[12]) == WINDOW and policy.rounds_observed == 1 + 2 * WINDOW
    # Every remembered draft was rejected; probes pause while the losses exceed the budget.
    assert {c for c, _ in policy.seen[12]} == {0.99} and {a for _, a in policy.seen[12]} == {0.0}
    assert policy.choose(10).depth is None


def test_draft_memory_keys():
    memory, made = DraftMemory(), []

    def make():
        made.append(AdaptiveDraft(30, [12], 4))
        return made[-1]

    a = memory.policy("config", 1, make)
    assert memory.policy("config", 1, make) is a and len(made) == 1
    b = memory.policy("config", 4, make)  # another batch size: its own policy
    assert b is not a and memory.policy("config", 1, make) is a
    assert memory.policy("other", 1, make) not in (a, b)  # another configuration forgets them all
    assert memory.policy("config", 4, make) is not b
    memory.clear()
    assert memory.policy("config", 4, make) is made[-1] and len(made) == 5
    # Bounded: the least recently used key goes first.
    first = memory.policy("config", 0, make)
    for key in range(1, MEMORY_KEYS + 1):
        memory.policy("config", key, make)
        memory.policy("config", 0, make)  # key 0 stays in use
    assert len(memory.by_key) == MEMORY_KEYS and memory.policy("config", 0, make) is first
    assert 1 not in memory.by_key and 2 in memory.by_key


def test_draft_memory_across_calls(model, batch):
    """draft_memory=True: "auto" keeps one policy per batch size across calls (the output never
    changes); it is forgotten when what it measured changes or on reset_draft_memory()."""
    ids, am = batch
    eem = _eem(model, "auto")
    refs = {rows: _reference(model, ids[:rows], am[:rows], N) for rows in (1, 3)}

    def call(rows=3):
        out = eem.generate(ids[:rows], am[:rows], max_new_tokens=N, mode="exact")
        assert torch.equal(out.sequences, refs[rows])
        s = out.stats
        return s["draft_rounds_remembered"], s["plain_steps"] + s["draft_rounds"]

    assert [call()[0] for _ in range(2)] == [0, 0]  # default: learned within each call only
    eem.draft_memory = True
    first, rounds = call()
    assert first == 0 and rounds > 0
    second, more = call()
    assert second == rounds
    assert call(rows=1)[0] == 0  # a batch size of its own
    third, last = call()
    assert third == rounds + more
    # Sampling accepts drafts at other rates than greedy decoding, each setting at its own.
    sampled = [eem.generate(ids, am, max_new_tokens=N, mode="exact", do_sample=True, top_k=k).stats for k in (5, 5, 7)]
    assert sampled[0]["draft_rounds_remembered"] == 0 == sampled[2]["draft_rounds_remembered"]
    assert sampled[1]["draft_rounds_remembered"] == sampled[0]["plain_steps"] + sampled[0]["draft_rounds"]
    assert call()[0] == third + last
    changes = [
        lambda: setattr(eem, "draft_tokens", 3),
        lambda: eem.set_exit_layers(EXITS[:1], 0.1),
        lambda: setattr(eem, "heads", [None]),
        lambda: setattr(eem, "draft_vocab", torch.arange(50)),
        lambda: eem.draft_vocab.copy_(torch.arange(50).flip(0)),  # the same tensor, changed in place
        eem.reset_draft_memory,
    ]
    for change in changes:
        assert call()[0] > 0
        change()
        assert call()[0] == 0, change
    eem.draft_memory = "yes"
    with pytest.raises(ValueError, match="draft_memory"):
        call()


def test_draft_errors(model, batch):
    ids, am = batch
    for bad in ("fast", DraftPolicy(L), 3):  # depth L: only the model says it is too deep
        with pytest.raises(ValueError, match="draft"):
            _eem(model, bad).generate(ids, am, max_new_tokens=2, mode="exact")
    # A depth or block length that no model takes is refused when the policy is made
    # (tests/test_hf_input_errors.py has the other bad fields).
    with pytest.raises(ValueError, match=r"^DraftPolicy\.depth: "):
        DraftPolicy(0)
    with pytest.raises(ValueError, match=r"^DraftPolicy\.max_tokens: .*when drafting"):
        DraftPolicy(2, 0.0, 0)


def test_draft_vocabulary_keeps_the_output(model, batch):
    """Drafts over a frequency-ranked quarter of the vocabulary (FR-Spec): the draft checks read only
    those head rows and only propose those tokens; the verification keeps the output exact."""
    from earlyexit.tuning.draft_vocab import draft_vocabulary

    ids, am = batch
    ref = _reference(model, ids, am, N)
    vocab = draft_vocabulary(ref.flatten(), model.config.vocab_size, share=0.25)
    assert vocab.numel() == 75 and torch.equal(vocab, vocab.unique())
    drafted = []
    real_step = hf_generate.draft_step

    def spy(*args):
        tokens, prob, state = real_step(*args)
        drafted.append(tokens)
        return tokens, prob, state

    eem = _eem(model, DraftPolicy(EXITS[0], 0.0, 3))
    eem.draft_vocab = vocab
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_generate, "draft_step", spy)
        out = eem.generate(ids, am, max_new_tokens=N, mode="exact")
    assert torch.equal(out.sequences, ref)
    assert out.stats["acceptance_rate"] > 0  # the frequent tokens are the reference's own
    assert torch.isin(torch.cat(drafted), torch.cat([vocab, torch.zeros(1, dtype=torch.int64)])).all()
    full = _eem(model, DraftPolicy(EXITS[0], 0.0, 3)).generate(ids, am, max_new_tokens=N, mode="exact")
    assert torch.equal(full.sequences, ref)
    for bad in (torch.tensor([1, 1]), torch.tensor([300]), torch.tensor([0.5]), [1, 2]):
        eem.draft_vocab = bad
        with pytest.raises(ValueError, match="draft_vocab"):
            eem.generate(ids, am, max_new_tokens=2, mode="exact")


def test_draft_vocabulary_ranks_by_frequency():
    from earlyexit.tuning.draft_vocab import draft_vocabulary

    data = torch.tensor([5, 5, 5, 2, 2, 9, 7])
    assert draft_vocabulary(data, 10, share=0.3).tolist() == [2, 5, 7]  # 7 and 9 tie: the lower id
    assert draft_vocabulary(data, 10, share=0.2, always=[0]).tolist() == [0, 5]
    assert draft_vocabulary(data, 10, share=1.0).tolist() == list(range(10))
    for kwargs, name in ((dict(share=0.0), "share"), (dict(always=[10]), "always")):
        with pytest.raises(ValueError, match=name):
            draft_vocabulary(data, 10, **kwargs)
    with pytest.raises(ValueError, match="tokenizer"):
        draft_vocabulary(["text"], 10)
