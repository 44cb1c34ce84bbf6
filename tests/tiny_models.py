"""Small random-weight Llama-family causal LMs built from transformers config classes (CPU, seconds)."""

import torch


def tiny_causal_lm(kind="llama", num_layers=6, hidden_size=64, vocab_size=300, seed=0):
    """A random-weight ``*ForCausalLM`` in eval mode.

    initializer_range is larger than the default 0.02 so logits are peaked: exits happen and
    no near-ties flip argmaxes.
    """
    import transformers

    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=5, **common))
    else:
        raise ValueError(f"kind: unknown {kind!r}")
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
