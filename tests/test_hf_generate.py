"""EarlyExitLM on small random-weight Llama-family models (CPU, seconds).

The oracle is transformers itself: model.generate for greedy output, output_hidden_states and the
model's own cache for exit tokens and key/value states.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import left_padded_batch, tiny_causal_lm  # noqa: E402

from earlyexit import EarlyExitLM  # noqa: E402
from earlyexit.hf import DraftPolicy  # noqa: E402

L = 6
EXITS = [2, 4]
T = 7


def _model(kind):
    return tiny_causal_lm(kind, num_layers=L)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def batch():
    """Three prompts of lengths 7, 4 and 2 (T = 7), left-padded with token 0."""
    return left_padded_batch()


def _reference(model, ids, am, n, eos=None):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=am, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0
        )


def test_exact_mode_equals_generate(model, batch):
    ids, am = batch
    ref = _reference(model, ids, am, 12)
    eem = EarlyExitLM(model, EXITS, threshold=0.1)
    eem.draft = DraftPolicy(EXITS[0], max_tokens=4)  # always draft ("auto" may decode plainly)
    out = eem.generate(ids, am, max_new_tokens=12, mode="exact")
    assert torch.equal(out.sequences, ref)
    assert out.exit_layer.shape == (3, 12)
    assert (out.exit_layer < L).any(), "drafts should exit early sometimes, else the test is vacuous"
    assert 0 <= out.stats["acceptance_rate"] <= 1 and out.stats["full_depth_passes_per_token"] > 0


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_exact_mode_other_architectures(kind, batch):
    # Mistral with a 5-token window: the sliding-window mask is exercised beyond the window.
    model = _model(kind)
    ids, am = batch
    ref = _reference(model, ids, am, 8)
    out = EarlyExitLM(model, EXITS, threshold=0.1).generate(ids, am, max_new_tokens=8, mode="exact")
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, batch):
    model = _model("llama").to(dtype)
    ids, am = batch
    ref = _reference(model, ids, am, 8)
    eem = EarlyExitLM(model, EXITS, threshold=0.1)
    assert torch.equal(eem.generate(ids, am, max_new_tokens=8, mode="exact").sequences, ref)
    compacted = eem.generate(ids, am, max_new_tokens=8)
    eem.compaction = False
    assert torch.equal(eem.generate(ids, am, max_new_tokens=8).sequences, compacted.sequences)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_generation(dtype, batch):
    """The loop on a GPU: exit checks (Triton), compaction and state propagation on CUDA tensors."""
    model = _model("llama").to("cuda", dtype)
    ids, am = (t.cuda() for t in batch)
    ref = _reference(model, ids, am, 8)
    eem = EarlyExitLM(model, EXITS, threshold=0.1)
    assert torch.equal(eem.generate(ids, am, max_new_tokens=8, mode="exact").sequences, ref)
    out = eem.generate(ids, am, max_new_tokens=8)
    assert (out.exit_layer < L).any() and out.sequences.device.type == "cuda"
    if dtype == torch.float32:  # bf16 kernels may round row subsets differently: compare in float32 only
        eem.compaction = False
        assert torch.equal(eem.generate(ids, am, max_new_tokens=8).sequences, out.sequences)
        eem.thresholds = [2.0, 2.0]
        assert torch.equal(eem.generate(ids, am, max_new_tokens=8).sequences, ref)


def test_exact_mode_eos_padding(model, batch):
    ids, am = batch
    free = _reference(model, ids, am, 8)
    eos = int(free[0, T + 3])  # row 0 stops after 4 tokens, the others continue (or stop) on their own
    ref = _reference(model, ids, am, 8, eos=eos)
    eem = EarlyExitLM(model, EXITS, threshold=0.1)
    for mode in ("exact", "exit"):
        eem.thresholds = [0.1, 0.1] if mode == "exact" else [2.0, 2.0]
        out = eem.generate(ids, am, max_new_tokens=8, mode=mode, eos_token_id=eos)
        assert torch.equal(out.sequences, ref), mode
        finished = out.sequences[0, T + 4 :]
        assert (finished == 0).all() and (out.exit_layer[0, 4:] == 0).all()


def test_exact_sampling_with_tiny_top_p_is_greedy(model, batch):
    # top_p -> 0 keeps only the most likely token: speculative sampling must then reproduce greedy.
    ids, am = batch
    ref = _reference(model, ids, am, 8)
    eem = EarlyExitLM(model, EXITS, threshold=0.1)
    out = eem.generate(ids, am, max_new_tokens=8, mode="exact", do_sample=True, top_p=1e-6)
    assert torch.equal(out.sequences, ref)


def test_exit_sampling_runs(model, batch):
    ids, am = batch
    torch.manual_seed(0)
    out = EarlyExitLM(model, EXITS, threshold=0.1).generate(
        ids, am, max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9
    )
    assert out.sequences.shape == (3, T + 6)
    assert ((out.sequences >= 0) & (out.sequences < 300)).all()


def test_unreachable_threshold_is_full_depth(model, batch):
    ids, am = batch
    ref = _reference(model, ids, am, 10)
    out = EarlyExitLM(model, EXITS, threshold=1.5).generate(ids, am, max_new_tokens=10)
    assert torch.equal(out.sequences, ref)
    assert (out.exit_layer == L).all()
    assert out.stats["mean_layers_per_token"] == L and out.stats["layer_compute_skipped"] == 0


def test_full_depth_greedy_tokens_skip_the_logits(model, batch, monkeypatch):
    """Greedy rows that reach the last layer take the fused kernel's argmax: lm_head never runs in decode."""
    ids, am = batch
    ref = _reference(model, ids, am, 6)
    calls = []
    monkeypatch.setattr(
        model.lm_head, "forward", lambda x: calls.append(x.shape) or torch.nn.Linear.forward(model.lm_head, x)
    )
    out = EarlyExitLM(model, EXITS, threshold=1.5).generate(ids, am, max_new_tokens=6)
    assert torch.equal(out.sequences, ref)
    assert calls == []


def test_non_finite_head_never_exits_and_matches_generate():
    """A NaN row in lm_head makes every logit row invalid: no row may exit even at threshold 0, and the
    full-depth tokens fall back to the materialized logits' argmax, exactly as model.generate picks."""
    model = _model("llama")
    with torch.no_grad():
        model.lm_head.weight[17] = float("nan")
    torch.manual_seed(2)
    ids = torch.randint(3, 300, (2, 5))
    am = torch.ones_like(ids)
    out = EarlyExitLM(model, EXITS, threshold=0.0).generate(ids, am, max_new_tokens=4)
    assert (out.exit_layer == L).all()
    assert torch.equal(out.sequences, _reference(model, ids, am, 4))


def _first_step_states(model, ids, am):
    """Full forward with generate's positions: (hidden states per layer, the model's cache, positions)."""
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    full = model(ids, attention_mask=am, position_ids=pos, output_hidden_states=True, use_cache=True)
    return full.hidden_states, getattr(full, "cache", None) or full.past_key_values, pos  # cache: renamed in v5


def assert_cache_is_the_models_own(model, out, am):
    """Every cached entry of a generate output (the real positions of ``out.cache_mask``, every layer)
    equals the model's own cache over the same tokens, row by row without padding or holes (the
    model's sliding-window layers keep only the last positions: those are compared).
    am: the prompt's attention mask [B, T]."""
    T = am.shape[1]
    for r in range(am.shape[0]):
        real = out.cache_mask[r].bool()
        n = int(real.sum())
        # The prompt and every generated token but the last one, each once.
        assert n == int(am[r].sum()) + int((out.exit_layer[r] > 0).sum()) - 1, f"row {r}"
        tokens = torch.cat([out.sequences[r, :T][am[r].bool()], out.sequences[r, T:]])[:n]
        with torch.no_grad():
            hf_cache = model(tokens[None], use_cache=True).past_key_values
        for idx in range(len(model.model.layers)):
            for got, want in (
                (out.cache.layers[idx].keys[r], hf_cache.layers[idx].keys[0]),
                (out.cache.layers[idx].values[r], hf_cache.layers[idx].values[0]),
            ):
                got = got[:, real][:, n - want.shape[1] :]
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"row {r} layer {idx}")


def _propagated(model, idx, h, cos, sin):
    """Key/value states layer idx caches for hidden h [B, 1, d], computed from the HF modules directly."""
    layer = model.model.layers[idx]
    attn = layer.self_attn
    module = __import__(type(attn).__module__, fromlist=["apply_rotary_pos_emb"])
    x = layer.input_layernorm(h)
    shape = (h.shape[0], 1, -1, attn.head_dim)
    k = attn.k_proj(x).view(shape)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    k, _ = module.apply_rotary_pos_emb(k.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return k[:, :, 0], attn.v_proj(x).view(shape).transpose(1, 2)[:, :, 0]


def test_first_exit_token(model, batch):
    """Threshold 0: every row exits at the first exit layer k with the token of the first k layers."""
    ids, am = batch
    k = EXITS[0]
    out = EarlyExitLM(model, EXITS, threshold=0.0).generate(ids, am, max_new_tokens=3)
    assert (out.exit_layer == k).all()
    with torch.no_grad():
        hidden, _, _ = _first_step_states(model, ids, am)
        direct = model.lm_head(model.model.norm(hidden[k][:, -1])).argmax(-1)
    assert torch.equal(out.sequences[:, T], direct)


def test_propagated_cache(model, batch):
    """Rows exit at different layers in the same step; every layer's cache entry is the right one.

    Thresholds are set from the direct computation so that at the first step row a exits at the
    first exit, row b at the second and row c runs full depth.
    """
    ids, am = batch
    with torch.no_grad():
        hidden, hf_cache, pos = _first_step_states(model, ids, am)
        p = [model.lm_head(model.model.norm(hidden[k][:, -1])).softmax(-1).amax(-1) for k in EXITS]
    # Thresholds halfway between neighbouring confidences, so rounding differences cannot flip a decision.
    order0 = p[0].argsort(descending=True).tolist()
    rest = sorted(order0[1:], key=lambda r: -float(p[1][r]))
    t0 = float(p[0][order0[0]] + p[0][order0[1]]) / 2
    t1 = float(p[1][rest[0]] + p[1][rest[1]]) / 2
    out = EarlyExitLM(model, EXITS, threshold=[t0, t1]).generate(ids, am, max_new_tokens=2)
    exit_at = out.exit_layer[:, 0]
    assert sorted(exit_at.tolist()) == sorted([EXITS[0], EXITS[1], L]), exit_at

    assert_first_step_cache(model, out, exit_at, hidden, hf_cache, pos)


def assert_first_step_cache(model, out, exit_at, hidden, hf_cache, pos):
    """Every layer's cache entry at the first generated step's position (the prompt's last, T - 1) of each
    row is the model's own below the row's exit layer ``exit_at[r]`` and the state propagation of its exit
    hidden state from there on. hidden, hf_cache, pos: :func:`_first_step_states` of the prompts."""
    t = hidden[0].shape[1] - 1
    with torch.no_grad():
        for r in range(exit_at.shape[0]):
            k = int(exit_at[r])
            h = hidden[k][r : r + 1, -1:]
            cos, sin = model.model.rotary_emb(h, pos[r : r + 1, -1:])
            for idx in range(len(model.model.layers)):
                keys = out.cache.layers[idx].keys[r, :, t]
                values = out.cache.layers[idx].values[r, :, t]
                assert keys.abs().sum() > 0 and values.abs().sum() > 0, f"row {r} layer {idx}: empty entry"
                if idx < k:  # computed by the layer itself: as in the model's own cache
                    want_k = hf_cache.layers[idx].keys[r, :, t]
                    want_v = hf_cache.layers[idx].values[r, :, t]
                else:  # skipped: state propagation of the exit hidden state
                    want_k, want_v = (x[0] for x in _propagated(model, idx, h, cos, sin))
                torch.testing.assert_close(keys, want_k, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(values, want_v, rtol=1e-5, atol=1e-5)


def test_exact_mode_cache_is_full_depth(model, batch):
    """Exact mode keeps the drafts' first layers and recomputes the rest: after generation every cached
    entry (real token positions, every layer) equals the model's own cache over the same sequence."""
    ids, am = batch
    n = 9
    eem = EarlyExitLM(model, EXITS, threshold=0.1)
    eem.draft = DraftPolicy(EXITS[0], max_tokens=4)
    out = eem.generate(ids, am, max_new_tokens=n, mode="exact")
    assert out.stats["acceptance_rate"] > 0  # drafts were kept, so their cache entries were reused
    assert_cache_is_the_models_own(model, out, am)


def test_compacted_equals_masking_only(model, batch):
    ids, am = batch
    eem = EarlyExitLM(model, EXITS, threshold=[0.2, 0.1])
    compacted = eem.generate(ids, am, max_new_tokens=12)
    layers = set(compacted.exit_layer.flatten().tolist())
    assert len(layers) >= 2, f"need mixed exits for a meaningful comparison, got {layers}"
    eem.compaction = False
    masked = eem.generate(ids, am, max_new_tokens=12)
    assert torch.equal(compacted.sequences, masked.sequences)
    assert torch.equal(compacted.exit_layer, masked.exit_layer)
    assert compacted.stats["layer_compute_skipped"] > masked.stats["layer_compute_skipped"]


def test_identity_heads_match_shared_head(model, batch):
    ids, am = batch
    plain = EarlyExitLM(model, EXITS, threshold=0.1).generate(ids, am, max_new_tokens=6)
    seq = EarlyExitLM(model, EXITS, threshold=0.1, heads=[torch.nn.Identity(), None]).generate(
        ids, am, max_new_tokens=6
    )
    mapping = EarlyExitLM(model, EXITS, threshold=0.1, heads={4: lambda x: x}).generate(ids, am, max_new_tokens=6)
    assert torch.equal(plain.sequences, seq.sequences) and torch.equal(plain.sequences, mapping.sequences)


def test_errors(batch):
    model = _model("llama")
    ids, am = batch
    for bad in ([0, 2], [2, L], [4, 2], [2, 2], [], 3):
        with pytest.raises(ValueError, match="exit_layers"):
            EarlyExitLM(model, bad)
    with pytest.raises(ValueError, match="threshold"):
        EarlyExitLM(model, EXITS, threshold=[0.5])
    with pytest.raises(ValueError, match="measure"):
        EarlyExitLM(model, EXITS, measure="nope")
    with pytest.raises(ValueError, match="heads"):
        EarlyExitLM(model, EXITS, heads=[None])
    eem = EarlyExitLM(model, EXITS)
    with pytest.raises(ValueError, match="attention_mask"):
        eem.generate(ids, am[:, 1:])
    with pytest.raises(ValueError, match="input_ids"):
        eem.generate(ids[0])
    with pytest.raises(ValueError, match="mode"):
        eem.generate(ids, am, mode="fast")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        EarlyExitLM(gpt2, [1])


def test_attention_switched_after_wrapping(batch):
    """model.set_attn_implementation after EarlyExitLM(model) wrapped it: the masks follow the model's
    implementation at each call (an sdpa boolean mask added to eager's scores would change every
    token), and one the masks do not serve is refused at the call, as at construction."""
    ids, am = batch
    model = tiny_causal_lm("llama", num_layers=L, attn_implementation="sdpa")
    eem = EarlyExitLM(model, EXITS, threshold=0.1)
    eem.draft = DraftPolicy(EXITS[0], max_tokens=3)
    model.set_attn_implementation("eager")
    ref = _reference(model, ids, am, 8)
    for mode in ("exact", "exit"):
        eem.set_exit_layers(EXITS, 0.1 if mode == "exact" else 2.0)  # exit mode: nothing exits
        assert torch.equal(eem.generate(ids, am, max_new_tokens=8, mode=mode).sequences, ref), mode
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"^model: attention implementation 'flex_attention' is not supported"):
        eem.generate(ids, am, max_new_tokens=2)
    model.config._attn_implementation = "sdpa"  # and back: sdpa masks again
    assert torch.equal(eem.generate(ids, am, max_new_tokens=8, mode="exact").sequences, ref)


def test_exit_mode_turned_off_is_plain_decoding(model, batch):
    """No exit layers (calibration turned early exit off): the whole prompt is prefilled, no exit
    check runs, every token is full depth and equals model.generate, with an end of sequence too."""
    ids, am = batch
    eem = EarlyExitLM(model, EXITS)
    eem.set_exit_layers([], [])
    eos = int(_reference(model, ids, am, 8)[1, T + 2])
    for n, stop in ((8, None), (1, None), (8, eos)):
        out = eem.generate(ids, am, max_new_tokens=n, eos_token_id=stop)
        assert torch.equal(out.sequences, _reference(model, ids, am, n, eos=stop)), (n, stop)
        assert set(out.exit_layer.unique().tolist()) <= {0, L} and out.stats["exit_check_time_share"] == 0
        assert abs(out.stats["layer_compute_skipped"]) < 1e-9
    assert_cache_is_the_models_own(model, out, am)
