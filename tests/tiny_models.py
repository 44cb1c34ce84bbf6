"""Small random-weight causal LMs of every supported family, built from transformers config classes (CPU, seconds)."""

import torch

#: Layer types of the tiny Gemma models: sliding and full attention mixed (6 layers).
GEMMA_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"] * 2
#: Families built with non-trivial values of what sets them apart from Llama (see tiny_causal_lm).
FAMILY_KINDS = ("gemma2", "gemma3", "phi3", "granite", "olmo2")


def tiny_causal_lm(
    kind="llama",
    num_layers=6,
    hidden_size=64,
    vocab_size=300,
    seed=0,
    attn_implementation=None,
    longrope_context=None,
    dynamic_rope_context=None,
):
    """A random-weight ``*ForCausalLM`` in eval mode.

    initializer_range is larger than the default 0.02 (0.2, and 0.3 for :data:`FAMILY_KINDS`) so
    logits are peaked: exits happen and no near-ties flip argmaxes (greedy top-1/top-2 logit gaps of
    the first 12 tokens of :func:`left_padded_batch` stay above 0.009). :data:`FAMILY_KINDS` get
    non-trivial values of what sets them apart (Gemma: softcaps, query_pre_attn_scalar, a 5-token
    window on some layers; Gemma 3: other rotary settings per layer type; Phi-3: a 5-token window
    and partial rotary; Granite: multipliers and logits_scaling != 1) and random norm weights (their
    norms differ from Llama's: offset, per-head or whole-projection q/k norms, norms after the
    sublayers).

    attn_implementation: None (transformers' default for the family), "eager" or "sdpa".
    longrope_context: Phi-3 only: a longrope rotary embedding (long factors 4x the short ones) whose
        original context is this many positions (None: the default rotary).
    dynamic_rope_context: Llama only: a dynamic-NTK rotary embedding (factor 2) past this many positions.
    """
    import transformers

    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        initializer_range=0.3 if kind in FAMILY_KINDS else 0.2,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        rope = {}
        if dynamic_rope_context is not None:
            rope = dict(
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                max_position_embeddings=dynamic_rope_context,
            )
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**rope, **common))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=5, **common))
    elif kind in ("gemma2", "gemma3"):
        gemma = dict(
            head_dim=16,
            sliding_window=5,
            layer_types=GEMMA_LAYER_TYPES[:num_layers],
            query_pre_attn_scalar=24,
            final_logit_softcapping=6.0,
            attn_logit_softcapping=4.0,
            pad_token_id=0,
        )
        if kind == "gemma2":
            model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**gemma, **common))
        else:
            rope = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            }
            config = transformers.Gemma3TextConfig(rope_parameters=rope, **gemma, **common)
            model = transformers.Gemma3ForCausalLM(config)
    elif kind == "phi3":
        rope = {}
        if longrope_context is not None:
            # One factor per rotary frequency: head_dim (hidden_size / 4 heads) x 0.5 partial rotary, halved.
            factors = hidden_size // 4 // 2 // 2
            rope = dict(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "short_factor": [1.0] * factors,
                    "long_factor": [4.0] * factors,
                },
                original_max_position_embeddings=longrope_context,
                max_position_embeddings=4 * longrope_context,
            )
        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
        config = transformers.Phi3Config(sliding_window=5, partial_rotary_factor=0.5, **ids, **rope, **common)
        model = transformers.Phi3ForCausalLM(config)
    elif kind == "granite":
        config = transformers.GraniteConfig(
            embedding_multiplier=3.0,
            residual_multiplier=0.6,
            attention_multiplier=0.2,
            logits_scaling=1.7,
            pad_token_id=0,
            **common,
        )
        model = transformers.GraniteForCausalLM(config)
    elif kind == "olmo2":
        config = transformers.Olmo2Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
        model = transformers.Olmo2ForCausalLM(config)
    else:
        raise ValueError(f"kind: unknown {kind!r}")
    if kind in FAMILY_KINDS:
        with torch.no_grad():  # norm weights away from their init (zeros for Gemma's offset norms, ones otherwise)
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = 0  # EarlyExitLM pads finished rows with the generation config's pad
    return model.eval()


def random_ids(n, seed, vocab_size=300):
    """n random token ids in [1, vocab_size) from a seeded generator: int64 [n]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (n,), generator=g)


def left_padded_batch(lengths=(7, 4, 2)):
    """Prompts of the given lengths, left-padded with token 0 to the longest: (ids, attention_mask), int64 [B, T]."""
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (len(lengths), max(lengths)))
    am = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        am[row, : ids.shape[1] - n] = 0
    return ids.masked_fill(am == 0, 0), am
