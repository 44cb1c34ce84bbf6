"""EarlyExitLM on the families beyond Llama: Gemma 2, Gemma 3 (text), Phi-3, Granite, OLMo 2 (CPU, seconds).

The same guarantees as tests/test_hf_generate.py gives the Llama family, on tiny random-weight models
with non-trivial values of what sets each family apart (tests/tiny_models.py), under every attention
implementation the family has. The oracle is transformers itself: ``model.generate``, the model's own
logits, output_hidden_states, the model's own cache, and the decoder layers run on the exit states.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_generate import _first_step_states, _reference, assert_cache_is_the_models_own  # noqa: E402
from tiny_models import FAMILY_KINDS, left_padded_batch, tiny_causal_lm  # noqa: E402

from earlyexit import EarlyExitLM, exit_check  # noqa: E402
from earlyexit.hf import DraftPolicy  # noqa: E402
from earlyexit.hf.model_adapter import SUPPORTED, ModelAdapter, exit_head_args  # noqa: E402
from earlyexit.tuning.adapters import _exit_head_fp32, _exit_logits, _teacher_logits  # noqa: E402
from earlyexit.tuning.teacher_forcing import collect_states  # noqa: E402

L = 6
EXITS = [2, 4]
T = 7

#: (kind, attention implementation): Gemma 2 runs eagerly only (transformers has no sdpa for it).
CASES = [
    ("gemma2", "eager"),
    ("gemma3", "eager"),
    ("gemma3", "sdpa"),
    ("phi3", "eager"),
    ("phi3", "sdpa"),
    ("granite", "eager"),
    ("granite", "sdpa"),
    ("olmo2", "eager"),
    ("olmo2", "sdpa"),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{a}" for k, a in CASES])
def model(request):
    kind, attn = request.param
    return tiny_causal_lm(kind, num_layers=L, attn_implementation=attn)


@pytest.fixture(scope="module")
def batch():
    """Three prompts of lengths 7, 4 and 2 (T = 7), left-padded with token 0."""
    return left_padded_batch()


def _head_logits(model, normed):
    """The model's logits from the lm_head input (after the final norm), as its ForCausalLM computes them."""
    logits = model.lm_head(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits / getattr(model.config, "logits_scaling", 1.0)  # Granite


def _direct_logits(model, hidden):
    """Logits of hidden states [..., d] entering the final norm, from the model's own modules."""
    return _head_logits(model, model.model.norm(hidden))


def _forward_with_norm_input(model, ids, am):
    """model(...) and the hidden states entering its final norm [B, T, d] (captured by a hook)."""
    seen = []
    handle = model.model.norm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=am, output_hidden_states=True)
    finally:
        handle.remove()
    return out, seen[0]


@pytest.fixture(scope="module")
def exact_run(model, batch):
    """Exact mode with forced drafts at the first exit layer, and model.generate's greedy output."""
    ids, am = batch
    n = 10
    eem = EarlyExitLM(model, EXITS, threshold=0.05)
    eem.draft = DraftPolicy(EXITS[0], max_tokens=4)  # always draft ("auto" may decode plainly)
    return eem.generate(ids, am, max_new_tokens=n, mode="exact"), _reference(model, ids, am, n)


def test_exact_mode_equals_generate(exact_run):
    out, ref = exact_run
    assert torch.equal(out.sequences, ref)
    assert (out.exit_layer < L).any(), "drafts should exit early sometimes, else the test is vacuous"
    assert out.stats["acceptance_rate"] > 0 and out.stats["full_depth_passes_per_token"] > 0


def test_exact_mode_cache_is_the_models_own(exact_run, model, batch):
    """Kept drafts' first layers and the recomputed rest: every cached entry equals the model's own cache."""
    out, _ = exact_run
    assert_cache_is_the_models_own(model, out, batch[1])


def test_model_logits_and_head_contract(model, batch):
    """ModelAdapter.logits is the model's own logits bit for bit, and the exit check over exit_head_args
    gives the model's greedy token and softmax statistics (norm offset, softcap and scaling included)."""
    ids, am = batch
    out, pre_norm = _forward_with_norm_input(model, ids, am)
    adapter = ModelAdapter(model)
    with torch.no_grad():
        assert torch.equal(adapter.logits(pre_norm), out.logits)
        assert torch.equal(_head_logits(model, out.hidden_states[-1]), out.logits)  # the tests' own oracle
        h = pre_norm[:, -1]
        res = exit_check(h, threshold=0.0, **exit_head_args(model))
    z = out.logits[:, -1].float()
    assert torch.equal(res.token, z.argmax(-1))
    torch.testing.assert_close(res.max_prob, z.softmax(-1).amax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.lse, z.logsumexp(-1), rtol=1e-5, atol=1e-5)
    assert adapter.exit_head.keys() == exit_head_args(model).keys()


def test_tuning_logits_are_the_models_own(model):
    """Adapter training's teacher logits are the model's logits, and its exit logits (identity adapter)
    have the exit check's statistics: norm offset, softcap and logits scaling included."""
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    states, final = collect_states(model, EXITS, ids, progress=False)
    head = _exit_head_fp32(model)
    with torch.no_grad():
        want = model(ids).logits.reshape(-1, model.config.vocab_size)
        torch.testing.assert_close(_teacher_logits(final, head), want, rtol=1e-5, atol=1e-5)
        z = _exit_logits(states[EXITS[0]], torch.nn.Identity(), head)
        res = exit_check(states[EXITS[0]], threshold=0.0, **exit_head_args(model))
    torch.testing.assert_close(res.lse, z.logsumexp(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(res.token, z.argmax(-1))


def test_first_exit_token(model, batch):
    """Threshold 0: every row exits at the first exit layer k with the token of the first k layers."""
    ids, am = batch
    k = EXITS[0]
    out = EarlyExitLM(model, EXITS, threshold=0.0).generate(ids, am, max_new_tokens=3)
    assert (out.exit_layer == k).all()
    with torch.no_grad():
        hidden, _, _ = _first_step_states(model, ids, am)
        direct = _direct_logits(model, hidden[k][:, -1]).argmax(-1)
    assert torch.equal(out.sequences[:, T], direct)


def _layer_cache_entry(model, idx, h, pos):
    """Key/value states layer idx caches when it runs on hidden h [1, 1, d] at positions pos [1, 1]:
    the HF decoder layer itself (its input norm, fused or separate projections, q/k norms) on a fresh
    cache, with the rotary table its base model gives that layer."""
    layer_type = getattr(model.config, "layer_types", None)
    rotary = model.model.rotary_emb
    if isinstance(model, transformers.Gemma3ForCausalLM):  # one rotary table per layer type
        cos_sin = rotary(h, pos, layer_type[idx])
    else:
        cos_sin = rotary(h, pos)
    cache = transformers.DynamicCache()
    layer = model.model.layers[idx]
    # The cache argument's name depends on the transformers version (older ones: past_key_values).
    cache_kw = {ModelAdapter._cache_kwarg(layer): cache}
    layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin, **cache_kw)
    return cache.layers[idx].keys[0, :, -1], cache.layers[idx].values[0, :, -1]


def test_propagated_cache(model, batch):
    """Rows exit at different layers in the same step; every layer's cache entry is the right one.

    Thresholds are set from the model's own logits so that at the first step row a exits at the
    first exit, row b at the second and row c runs full depth.
    """
    ids, am = batch
    with torch.no_grad():
        hidden, hf_cache, pos = _first_step_states(model, ids, am)
        p = [_direct_logits(model, hidden[k][:, -1]).softmax(-1).amax(-1) for k in EXITS]
    # Thresholds halfway between neighbouring confidences, so rounding differences cannot flip a decision.
    order0 = p[0].argsort(descending=True).tolist()
    rest = sorted(order0[1:], key=lambda r: -float(p[1][r]))
    t0 = float(p[0][order0[0]] + p[0][order0[1]]) / 2
    t1 = float(p[1][rest[0]] + p[1][rest[1]]) / 2
    assert float(p[0][order0[0]] - p[0][order0[1]]) > 1e-4 and float(p[1][rest[0]] - p[1][rest[1]]) > 1e-4
    out = EarlyExitLM(model, EXITS, threshold=[t0, t1]).generate(ids, am, max_new_tokens=2)
    exit_at = out.exit_layer[:, 0]
    assert sorted(exit_at.tolist()) == sorted([EXITS[0], EXITS[1], L]), exit_at

    with torch.no_grad():
        for r in range(3):
            k = int(exit_at[r])
            h = hidden[k][r : r + 1, -1:]
            for idx in range(L):
                keys = out.cache.layers[idx].keys[r, :, T - 1]
                values = out.cache.layers[idx].values[r, :, T - 1]
                assert keys.abs().sum() > 0 and values.abs().sum() > 0, f"row {r} layer {idx}: empty entry"
                if idx < k:  # computed by the layer itself: as in the model's own cache (its last position)
                    want_k = hf_cache.layers[idx].keys[r, :, -1]
                    want_v = hf_cache.layers[idx].values[r, :, -1]
                else:  # skipped: state propagation of the exit hidden state
                    want_k, want_v = _layer_cache_entry(model, idx, h, pos[r : r + 1, -1:])
                # Both sides are float32 sums over differently shaped GEMMs (the loop's compacted rows, the
                # oracle's one row), whose BLAS kernels depend on the CPU: round-off of the entry's scale.
                for got, want in ((keys, want_k), (values, want_v)):
                    atol = 1e-5 * max(1.0, float(want.abs().max()))
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=f"row {r} layer {idx}")


def test_adapter_reads_each_familys_differences():
    """What the family table says reaches the adapter: windows, rotary layout, head arguments."""
    gemma3 = ModelAdapter(tiny_causal_lm("gemma3", num_layers=L))
    assert gemma3.windows == [5 if t == "sliding_attention" else None for t in gemma3.config.layer_types]
    assert gemma3.rotary_types == ["full_attention", "sliding_attention"]
    h, pos = torch.zeros(2, 3, 64), torch.arange(3).expand(2, 3)
    cos, sin = gemma3.rotary(h, pos)
    assert cos.shape == (2, 3, 2 * gemma3.head_dim)
    for idx, t in enumerate(gemma3.config.layer_types):
        own = gemma3.model.model.rotary_emb(h, pos, t)
        assert all(torch.equal(a, b) for a, b in zip(gemma3._layer_rotary(idx, cos, sin), own))
    phi3 = ModelAdapter(tiny_causal_lm("phi3", num_layers=L))
    assert phi3.windows == [5] * L and phi3.rotary(h, pos)[0].shape[-1] == phi3.head_dim // 2
    assert ModelAdapter(tiny_causal_lm("olmo2", num_layers=L)).windows == [None] * L
    args = {kind: exit_head_args(tiny_causal_lm(kind, num_layers=L)) for kind in ("gemma2", "granite", "llama")}
    assert (args["gemma2"]["norm_offset"], args["gemma2"]["softcap"], args["gemma2"]["temperature"]) == (1.0, 6.0, 1.0)
    assert (args["granite"]["norm_offset"], args["granite"]["softcap"], args["granite"]["temperature"]) == (
        0.0,
        None,
        1.7,
    )
    assert (args["llama"]["norm_offset"], args["llama"]["softcap"], args["llama"]["temperature"]) == (0.0, None, 1.0)


def test_errors():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    for build in (ModelAdapter, exit_head_args, lambda m: EarlyExitLM(m, [1])):
        with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
            build(gpt2)
        for model_type, cls in SUPPORTED.items():
            assert f"{cls} (model_type {model_type!r})" in str(err.value)
    assert {"gemma2", "gemma3_text", "phi3", "granite", "olmo2"} <= set(SUPPORTED)
    # Only the head is read: exit_head_args takes any attention implementation, the adapter does not.
    model = tiny_causal_lm("gemma2", num_layers=2)
    model.config._attn_implementation = "sdpa"  # sdpa would drop Gemma 2's attention-logit softcapping
    with pytest.raises(ValueError, match="attention implementation 'sdpa'.*'eager'"):
        ModelAdapter(model)
    assert exit_head_args(model)["softcap"] == 6.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_half_precision(kind, dtype, batch):
    # Each family's differences (softcaps, multipliers, q/k norms, windows) in the dtype users load:
    # exact mode with drafts equals model.generate.
    model = tiny_causal_lm(kind, num_layers=L, attn_implementation="eager").to(dtype)
    ids, am = batch
    eem = EarlyExitLM(model, EXITS, threshold=0.1)
    eem.draft = DraftPolicy(EXITS[0], max_tokens=4)
    out = eem.generate(ids, am, max_new_tokens=8, mode="exact")
    assert torch.equal(out.sequences, _reference(model, ids, am, 8))
    assert (out.exit_layer < L).any(), "drafts should be accepted sometimes, else the test is vacuous"
