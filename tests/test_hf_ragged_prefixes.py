"""Exact mode at batch > 1: every row keeps its own accepted prefix (CPU, seconds).

A row that accepted fewer drafts than another leaves holes in the shared cache positions: masked
out of attention, skipped by positions and sliding windows, compacted away when they accumulate.
The oracle is model.generate greedy and the model's own cache over each row's tokens.
"""

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_generate import _reference, assert_cache_is_the_models_own  # noqa: E402
from tiny_models import left_padded_batch, tiny_causal_lm  # noqa: E402

import earlyexit.hf.generate as hf_generate  # noqa: E402
from earlyexit import EarlyExitLM  # noqa: E402
from earlyexit.hf import DraftPolicy  # noqa: E402
from earlyexit.hf.attention_mask import build_masks, position_ids  # noqa: E402
from earlyexit.hf.cache import RowCache  # noqa: E402

L, N = 6, 40
# Drafts after 4 of 6 layers, two per round: rows accept different prefixes often, and 40 tokens
# leave enough holes for compactions.
DRAFT = DraftPolicy(4, 0.0, 2)


@pytest.fixture(scope="module")
def batch():
    """Four prompts of lengths 7, 4, 2 and 7, left-padded with token 0."""
    return left_padded_batch((7, 4, 2, 7))


def _eem(model, draft=DRAFT):
    eem = EarlyExitLM(model, [2, 4], threshold=0.1)
    eem.draft = draft
    return eem


# Mistral's 5-token window: with holes, the window must count tokens, not cache positions.
@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral"])
def test_rows_keep_their_own_prefixes(kind, batch):
    model = tiny_causal_lm(kind, num_layers=L)
    ids, am = batch
    ref = _reference(model, ids, am, N)
    out = _eem(model).generate(ids, am, max_new_tokens=N, mode="exact")
    assert torch.equal(out.sequences, ref)
    s = out.stats
    assert s["cache_holes"] > 0, "no row accepted fewer drafts than another: the test is vacuous"
    assert s["cache_compactions"] > 0
    assert out.cache_mask.shape == (ids.shape[0], out.cache.layers[0].keys.shape[2])
    assert_cache_is_the_models_own(model, out, am)


def test_rows_gain_more_than_the_shortest_prefix(batch):
    """Per round, the batch's tokens exceed what keeping the shortest accepted prefix would give."""
    model = tiny_causal_lm("llama", num_layers=L)
    ids, am = batch
    kept = []
    real_accept = hf_generate._accept

    def spy(*args, **kwargs):
        accepted, target = real_accept(*args, **kwargs)
        kept.append(accepted.clone())
        return accepted, target

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_generate, "_accept", spy)
        out = _eem(model).generate(ids, am, max_new_tokens=N, mode="exact")
    assert any(int(a.max()) > int(a.min()) for a in kept)
    emitted = int((out.exit_layer > 0).sum())
    shortest = sum(a.shape[0] * (int(a.min()) + 1) for a in kept)
    assert emitted > shortest


def test_holes_never_leak_into_attention(batch, monkeypatch):
    """Large garbage written into every masked cache position (holes and padding) after each step
    changes no token: nothing attends to them."""
    model = tiny_causal_lm("mistral", num_layers=L)
    ids, am = batch
    clean = _eem(model).generate(ids, am, max_new_tokens=N, mode="exact")
    real_advance = hf_generate._Run.advance
    poisoned = []

    def advance(run, pending, real=None):
        real_advance(run, pending, real)
        masked = run.attention_mask[:, :-1] == 0  # [B, S]: the cached positions nobody may read
        g = torch.Generator().manual_seed(len(poisoned))
        for layer in run.cache.cache.layers:
            for t in (layer.keys, layer.values):
                noise = 1e3 * torch.randn(t.shape, generator=g, dtype=t.dtype)
                t.copy_(torch.where(masked[:, None, :, None], noise, t))
        poisoned.append(int(masked.sum()))

    monkeypatch.setattr(hf_generate._Run, "advance", advance)
    out = _eem(model).generate(ids, am, max_new_tokens=N, mode="exact")
    assert torch.equal(out.sequences, clean.sequences)
    assert torch.equal(out.sequences, _reference(model, ids, am, N))
    assert out.stats["cache_holes"] > 0 and max(poisoned) > 0


def test_compaction_off_gives_the_same_tokens(batch, monkeypatch):
    model = tiny_causal_lm("llama", num_layers=L)
    ids, am = batch
    compacted = _eem(model).generate(ids, am, max_new_tokens=N, mode="exact")
    monkeypatch.setattr(hf_generate, "COMPACT_MIN", 10**9)
    holey = _eem(model).generate(ids, am, max_new_tokens=N, mode="exact")
    assert holey.stats["cache_compactions"] == 0 and compacted.stats["cache_compactions"] > 0
    assert torch.equal(holey.sequences, compacted.sequences)
    assert holey.cache_mask.shape[1] > compacted.cache_mask.shape[1]
    assert_cache_is_the_models_own(model, holey, am)


def test_ragged_rows_with_eos(batch):
    """A row's end of sequence inside an accepted block ends it there; the rest of the block is padding."""
    model = tiny_causal_lm("llama", num_layers=L)
    ids, am = batch
    eos = int(_reference(model, ids, am, N)[1, ids.shape[1] + 5])  # row 1 stops after 6 tokens
    ref = _reference(model, ids, am, N, eos=eos)
    out = _eem(model).generate(ids, am, max_new_tokens=N, mode="exact", eos_token_id=eos)
    assert torch.equal(out.sequences, ref)
    assert (out.exit_layer[1, 6:] == 0).all() and (out.exit_layer[1, :6] > 0).all()


def test_row_cache_compact_moves_real_positions_right():
    cache = RowCache(num_layers=2, batch=2, num_kv_heads=1, head_dim=1, dtype=torch.float32, device="cpu")
    cache.reserve(5)
    for layer in cache.cache.layers:
        layer.keys.copy_(torch.arange(10.0).view(2, 1, 5, 1))
        layer.values.copy_(-torch.arange(10.0).view(2, 1, 5, 1))
    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 1, 0, 0]])
    new = cache.compact(mask)
    assert torch.equal(new, torch.tensor([[1, 1, 1], [0, 1, 1]]))
    for layer in cache.cache.layers:
        assert layer.keys[0, 0, :, 0].tolist() == [1.0, 3.0, 4.0]
        assert layer.keys[1, 0, 1:, 0].tolist() == [5.0, 7.0]  # position 0 is padding now
        assert layer.values[0, 0, :, 0].tolist() == [-1.0, -3.0, -4.0]
    assert cache.length == 3
    with pytest.raises(ValueError, match="mask"):
        cache.compact(torch.ones(2, 4, dtype=torch.int64))


def test_positions_and_windows_skip_holes():
    # One row: tokens at 0, 1, a hole at 2, tokens at 3, 4; the query is position 4.
    am = torch.tensor([[1, 1, 0, 1, 1]])
    assert position_ids(am, 3, 2).tolist() == [[2, 3]]
    masks = build_masks(am, 4, 1, [None, 3], "sdpa", torch.float32)
    assert masks[None][0, 0, 0].tolist() == [True, True, False, True, True]
    # A window of 3 tokens: the query, position 3 and position 1 (the hole does not count).
    assert masks[3][0, 0, 0].tolist() == [False, True, False, True, True]
