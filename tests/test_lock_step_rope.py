"""Rotaries that follow the call's length, past their original context: the loops equal model.generate.

Longrope (Phi-3 128k): transformers' generate switches to the long factors at the first step past
``original_max_position_embeddings`` and recomputes its cache there. Dynamic NTK (a Llama): the
frequencies grow with each call's length, and the module keeps the longest length as state between
calls. earlyexit/hf/lock_step_rope.py says how the loops reproduce both. Tiny random-weight models
(longrope: long factors 4x the short ones) with original contexts that the generated tokens cross.
The longrope oracle is :func:`_lock_step`, greedy decoding through the model's own forward as generate
runs it; on transformers 5.24 it equals model.generate (checked here). transformers 5.17's generate
drops the cache at the switch but then feeds the model the last token only, so from there on each
token attends to itself alone: a bug of that version, which the loops do not reproduce. The dynamic
NTK oracle is model.generate itself, call after call on a twin model.
"""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from packaging.version import Version  # noqa: E402
from test_hf_generate import _reference  # noqa: E402
from tiny_models import left_padded_batch, tiny_causal_lm  # noqa: E402

from earlyexit import EarlyExitLM  # noqa: E402
from earlyexit.hf import DraftPolicy  # noqa: E402
from earlyexit.hf.lock_step_rope import LockStepRope  # noqa: E402

L = 6
N = 12


def _padded_batch(lengths=(7, 4, 2), extra_padding=0):
    """Prompts of these lengths, left-padded; ``extra_padding`` more padding columns in every row."""
    ids, am = left_padded_batch(lengths)
    pad = torch.zeros(ids.shape[0], extra_padding, dtype=ids.dtype)
    return torch.cat([pad, ids], 1), torch.cat([pad, am], 1)


#: (original context, prompt lengths, extra padding columns, rows rebuilt): a batch of width 7 crosses
#: it after 3 tokens (generate recomputes its cache there), one row alone too, one of width 4 after 6;
#: a prompt already past it (long factors from the start, nothing rebuilt); every row padded
#: (generate's recompute at the crossing changes nothing: each position keeps its own factors).
CASES = [
    (9, (7, 4, 2), 0, 3),
    (9, (7,), 0, 1),
    (6, (4, 2), 0, 2),
    (4, (7, 4, 2), 0, 0),
    (9, (7, 4, 2), 2, 0),
]
CASE_IDS = ["crossing", "one-row", "short-rows", "past", "all-padded"]


def _lock_step(model, ids, am, n, context):
    """Greedy decoding as Phi-3's generate runs it: the prompt, then one position per step with the
    positions of generate (from the mask, then + 1), and when the prompt fits in the original context
    the whole sequence recomputed without the cache at width context + 1. -> int64 [B, T + n]."""
    seq, mask = ids, am
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    # transformers renamed the forward's cache argument (past_key_values -> cache).
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(seq, attention_mask=mask, position_ids=pos, use_cache=True)
        for _ in range(n):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            seq, mask = torch.cat([seq, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
            if seq.shape[1] == context + 1 and ids.shape[1] <= context:
                pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
                out = model(seq, attention_mask=mask, position_ids=pos, use_cache=True)
                pos = pos[:, -1:]
            else:
                pos = pos[:, -1:] + 1
                out = model(tok, attention_mask=mask, position_ids=pos, **{cache_kwarg: out.past_key_values})
    return seq


def _oracle(model, ids, am, n, context):
    """:func:`_lock_step`, checked against model.generate where generate recomputes correctly."""
    ref = _lock_step(model, ids, am, n, context)
    if Version(transformers.__version__) >= Version("5.24"):
        assert torch.equal(_reference(model, ids, am, n), ref)
    return ref


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("context,lengths,extra,rebuilt", CASES, ids=CASE_IDS)
def test_every_mode_equals_generate_across_the_switch(context, lengths, extra, rebuilt, attn):
    ids, am = _padded_batch(lengths, extra)
    model = tiny_causal_lm("phi3", num_layers=L, longrope_context=context, seed=1, attn_implementation=attn)
    ref = _oracle(model, ids, am, N, context)
    same_weights = tiny_causal_lm("phi3", num_layers=L, longrope_context=64, seed=1, attn_implementation=attn)
    assert not torch.equal(_reference(same_weights, ids, am, N), ref), "the long factors should change the text"

    eem = EarlyExitLM(model, [2, 4], threshold=2.0)  # exit mode: nothing exits
    eem.draft = DraftPolicy(5, max_tokens=4)
    exact = eem.generate(ids, am, max_new_tokens=N, eos_token_id=[], mode="exact")
    assert torch.equal(exact.sequences, ref)
    assert exact.stats["acceptance_rate"] > 0, "drafts should be accepted sometimes, else the test is vacuous"
    assert exact.stats["long_rope_rebuilds"] == rebuilt
    for kwargs in ({}, {"schedule": lambda t: L}):
        out = eem.generate(ids, am, max_new_tokens=N, eos_token_id=[], mode="exit", **kwargs)
        assert torch.equal(out.sequences, ref)
        assert out.stats["long_rope_rebuilds"] == rebuilt


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4])
def test_exact_mode_blocks_reach_the_switch_in_every_alignment(max_tokens):
    # Block lengths 1-4 put the switch (after 3 generated tokens) at every place in a block; rows
    # accept different drafts, so they reach it in different rounds.
    ids, am = _padded_batch()
    model = tiny_causal_lm("phi3", num_layers=L, longrope_context=9, seed=1)
    ref = _oracle(model, ids, am, N, 9)
    eem = EarlyExitLM(model, [2, 4], threshold=0.05)
    for depth in (2, 5):
        eem.draft = DraftPolicy(depth, max_tokens=max_tokens)
        out = eem.generate(ids, am, max_new_tokens=N, eos_token_id=[], mode="exact")
        assert torch.equal(out.sequences, ref), (depth, max_tokens)
        assert out.stats["long_rope_rebuilds"] == 3


def test_the_factor_rule():
    # Row 0: 4 prompt tokens; row 1: 2 after 2 padding columns, so in generate's lock step its
    # position p runs when the batch's sequence is p + 3 long. Original context 6.
    lr = LockStepRope("longrope", 6, torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    pos = torch.arange(8).expand(2, 8)
    # Prompt positions: the prompt's call (length 4); generated ones: position + 1 + the row's shift.
    expected = torch.tensor([[4, 4, 4, 4, 5, 6, 7, 8], [4, 4, 5, 6, 7, 8, 9, 10]])
    assert torch.equal(lr.lengths(pos), expected)
    assert lr.switch.tolist() == [6, 4]
    running = torch.tensor([True, True])
    assert lr.room(torch.tensor([4, 2]), running) == 1  # row 1 may process positions 2 and 3 only
    assert lr.room(torch.tensor([4, 2]), torch.tensor([True, False])) == 1
    assert lr.room(torch.tensor([5, 3]), running) == 0
    assert lr.due(torch.tensor([5, 4]), running).tolist() == [False, True]
    lr.rebuilt |= lr.due(torch.tensor([5, 4]), running)
    assert lr.room(torch.tensor([5, 5]), running) == 0 and lr.room(torch.tensor([6, 5]), running) > N
    assert lr.due(torch.tensor([6, 6]), running).tolist() == [True, False]
    # A prompt past the context: long factors everywhere, nothing to rebuild.
    past = LockStepRope("longrope", 3, torch.ones(1, 4, dtype=torch.long))
    assert bool((past.lengths(torch.arange(6)[None]) > 3).all()) and past.switch is None
    assert not past.due(torch.tensor([9]), torch.tensor([True])).any()
    # Dynamic NTK: never rebuilt; lengths below the module's state after the prompt take that one.
    dyn = LockStepRope("dynamic", 6, torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]), floor=8)
    assert dyn.switch is None and torch.equal(dyn.lengths(pos), expected.clamp(min=8))
    assert dyn.last_length(5) == 8 and dyn.last_length(1) == 4 and dyn.last_length(0) == 4


def test_rotary_tables_are_the_modules_own():
    model = tiny_causal_lm("phi3", num_layers=2, longrope_context=9)
    adapter = EarlyExitLM(model, [1]).adapter
    assert (adapter.lock_step_rope_type, adapter.lock_step_context) == ("longrope", 9)
    rotary_emb = model.model.rotary_emb
    h = torch.zeros(2, 1, 64)
    pos = torch.tensor([[3], [8]])
    short = rotary_emb(h, pos)  # the call's last position is inside the context: short factors
    long_ = rotary_emb(h, torch.tensor([[3, 12], [8, 12]]))  # past it: long factors
    assert not torch.equal(short[0], long_[0][:, :1])
    lengths = torch.tensor([[9], [10]])  # within the context, past it
    cos, sin = adapter.rotary(h, pos, lengths)
    assert torch.equal(cos[0], short[0][0]) and torch.equal(sin[0], short[1][0])
    assert torch.equal(cos[1], long_[0][1, :1]) and torch.equal(sin[1], long_[1][1, :1])
    plain = EarlyExitLM(tiny_causal_lm("phi3", num_layers=2), [1]).adapter
    assert (plain.lock_step_rope_type, plain.lock_step_context) == (None, None)
    with pytest.raises(ValueError, match="lengths: .*longrope or dynamic"):
        plain.rotary(h, pos, lengths)


def _rotary_state(model):
    """A dynamic NTK rotary module's state: (longest length held, its frequencies)."""
    rotary_emb = model.model.rotary_emb
    return int(rotary_emb.max_seq_len_cached), rotary_emb.inv_freq.clone()


#: (rows, new tokens) of consecutive calls: they grow the module's state past the context (9), then
#: a short prompt resets it (rows 1-2: 4 < 9 positions), then a long call after a short one.
CALLS = [([0, 1, 2], 12), ([1, 2], 5), ([0], 14), ([1, 2], 3)]


@pytest.mark.parametrize("mode", ["exact", "exact-short-blocks", "exit", "schedule"])
def test_dynamic_ntk_equals_generate_across_calls(mode):
    # Two models with the same weights and state: one decodes with model.generate, the other with the
    # loops, call after call; the outputs and the module's state after each call must agree.
    ids, am = left_padded_batch()
    hf = tiny_causal_lm("llama", num_layers=L, dynamic_rope_context=9, seed=1)
    ours = tiny_causal_lm("llama", num_layers=L, dynamic_rope_context=9, seed=1)
    same_weights = tiny_causal_lm("llama", num_layers=L, seed=1)
    eem = EarlyExitLM(ours, [2, 4], threshold=2.0)  # exit mode: nothing exits
    assert (eem.adapter.lock_step_rope_type, eem.adapter.lock_step_context) == ("dynamic", 9)
    eem.draft = DraftPolicy(2, max_tokens=2) if mode == "exact-short-blocks" else DraftPolicy(5, max_tokens=4)
    accepted, held_lengths = 0, []
    for rows, n in CALLS:
        ref = _reference(hf, ids[rows], am[rows], n)
        kwargs = {"schedule": lambda t: L} if mode == "schedule" else {}
        out = eem.generate(
            ids[rows],
            am[rows],
            max_new_tokens=n,
            eos_token_id=[],
            mode="exact" if mode.startswith("exact") else "exit",
            **kwargs,
        )
        assert torch.equal(out.sequences, ref), (rows, n)
        (held, freq), (ref_held, ref_freq) = _rotary_state(ours), _rotary_state(hf)
        assert held == ref_held and torch.equal(freq, ref_freq), (rows, n)
        held_lengths.append(held)
        accepted += out.stats.get("acceptance_rate", 0) > 0
    if mode.startswith("exact"):
        assert accepted, "drafts should be accepted sometimes, else the test is vacuous"
    assert held_lengths == [7 + 12 - 1, 9, 7 + 14 - 1, 9]  # grown by the last call, reset by a short prompt
    # The grown frequencies change the text: the same weights with a plain rotary decode otherwise.
    assert not torch.equal(_reference(same_weights, ids, am, 12), _reference(hf, ids, am, 12))


def test_dynamic_tables_are_those_of_each_positions_own_call():
    # A block of positions whose lock-step lengths differ (a verification block, two rows): each
    # position's table must be the one of a call of exactly its length, as model.generate computes
    # it, whatever the other positions' lengths. Oracle: the module's own tables of a whole call of
    # positions 0..length-1, from its original state (a fresh copy per call).
    model = tiny_causal_lm("llama", num_layers=2, dynamic_rope_context=8)
    adapter = EarlyExitLM(model, [1]).adapter
    rotary_emb = model.model.rotary_emb
    pristine = copy.deepcopy(rotary_emb)
    h = torch.zeros(2, 4, 64)
    pos = torch.tensor([[9, 10, 11, 12], [3, 4, 5, 6]])
    lengths = torch.tensor([[10, 11, 12, 13], [8, 8, 9, 10]])  # row 1: shorter lengths, one within the context
    state = _rotary_state(model)
    cos, sin = adapter.rotary(h, pos, lengths)
    for r in range(2):
        for i in range(4):
            length, p = int(lengths[r, i]), int(pos[r, i])
            want_cos, want_sin = copy.deepcopy(pristine)(h[:1, :1], torch.arange(length)[None])
            assert torch.equal(cos[r, i], want_cos[0, p]) and torch.equal(sin[r, i], want_sin[0, p]), (r, i)
    # Frequencies do differ between those lengths (else the test would be vacuous) ...
    assert not torch.equal(cos[0, 0], copy.deepcopy(pristine)(h[:1, :1], torch.arange(13)[None])[0][0, 9])
    # ... and the module is left in its state.
    after = _rotary_state(model)
    assert after[0] == state[0] and torch.equal(after[1], state[1])


#: Prompts for exact mode on a dynamic NTK Llama with original context 8: one row (the audit's prompt)
#: and three left-padded rows. Their verification blocks hold positions past the context whose
#: lock-step lengths differ, which flips tokens if a block's positions all take its longest length.
DYNAMIC_PROMPTS = {
    "one-row": (torch.tensor([[79, 114, 88, 104, 51]]), torch.ones(1, 5, dtype=torch.int64)),
    "batched": left_padded_batch((7, 4, 2)),
}


@pytest.mark.parametrize("policy", [DraftPolicy(2, 0.0, 4), DraftPolicy(4, 0.0, 3)], ids=["E2-n4", "E4-n3"])
@pytest.mark.parametrize("prompt", list(DYNAMIC_PROMPTS))
def test_dynamic_ntk_exact_mode_with_drafts_equals_generate(prompt, policy):
    ids, am = DYNAMIC_PROMPTS[prompt]
    hf = tiny_causal_lm("llama", num_layers=L, dynamic_rope_context=8)
    ours = tiny_causal_lm("llama", num_layers=L, dynamic_rope_context=8)
    ref = _reference(hf, ids, am, 14)
    eem = EarlyExitLM(ours, [2, 4], threshold=2.0)
    eem.draft = policy
    out = eem.generate(ids, am, max_new_tokens=14, eos_token_id=[], mode="exact")
    assert torch.equal(out.sequences, ref)
    assert out.stats["draft_rounds"] > 0 and out.stats["mean_block_length"] > 1  # blocks of several positions
    (held, freq), (ref_held, ref_freq) = _rotary_state(ours), _rotary_state(hf)
    assert held == ref_held == ids.shape[1] + 14 - 1 and torch.equal(freq, ref_freq)
