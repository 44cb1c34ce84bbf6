"""The one place that knows HuggingFace module names (Llama family decoders).

Everything else in :mod:`earlyexit.hf` talks to a :class:`ModelAdapter`: embed tokens, run one
decoder layer on any subset of rows, project hidden states to the key/value states of a layer
(for state propagation), and read the exit head (final RMSNorm + lm_head). Supporting another
architecture with the same layer layout means extending :data:`SUPPORTED` and, where its
attention differs, :meth:`ModelAdapter.project_kv`.
"""

import inspect
import sys

from earlyexit.hf.tensor_parallel import check_heads_per_rank, local_rows, local_tensor, vocab_shard

#: config.model_type -> the causal LM class it comes with (for the error message).
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

#: Attention implementations that accept the explicit 4-D masks built in attention_mask.py.
_MASKED_ATTENTION = ("eager", "sdpa")


def _supported_list():
    return ", ".join(f"{cls} (model_type {t!r})" for t, cls in SUPPORTED.items())


class ModelAdapter:
    """Uniform access to a Llama-family ``*ForCausalLM`` without copying or changing its weights.

    Args:
        model: a transformers causal LM whose ``config.model_type`` is in :data:`SUPPORTED`.

    Raises:
        ValueError: unsupported architecture (lists the supported ones) or attention implementation.
    """

    def __init__(self, model):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(
                f"model: unsupported architecture {type(model).__name__} (model_type {model_type!r}); "
                f"supported: {_supported_list()}"
            )
        attn_impl = getattr(config, "_attn_implementation", None) or "eager"
        if attn_impl not in _MASKED_ATTENTION:
            raise ValueError(
                f"model: attention implementation {attn_impl!r} is not supported (it ignores explicit 4-D masks); "
                f"load the model with attn_implementation='sdpa' or 'eager'"
            )
        self.model = model
        self.config = config
        self.attn_impl = attn_impl
        self.layers = model.model.layers
        self.num_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        # Under tensor parallelism (tp_plan) each rank computes and caches only its own key/value heads.
        for name in ("q_proj", "k_proj"):
            proj = getattr(attn, name)
            check_heads_per_rank(local_rows(proj.weight, proj.out_features), attn.head_dim, f"self_attn.{name}")
        self.num_kv_heads = local_rows(attn.k_proj.weight, attn.k_proj.out_features) // attn.head_dim
        self.windows = [self._window(layer.self_attn) for layer in self.layers]
        self.cache_kwarg = self._cache_kwarg(self.layers[0])
        # The module's own rotary function, so propagated keys match the layers' keys bit for bit.
        self._apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def _window(self, attn):
        """Sliding-window size of one attention layer, or None for full attention."""
        if hasattr(attn, "sliding_window"):  # Qwen2/Qwen3: set per layer from config.layer_types
            return attn.sliding_window
        if self.config.model_type == "mistral":  # Mistral: one window for every layer
            return getattr(self.config, "sliding_window", None)
        return None

    @staticmethod
    def _cache_kwarg(layer):
        # transformers renamed the decoder layers' cache argument (past_key_value -> past_key_values -> cache).
        params = inspect.signature(layer.forward).parameters
        for name in ("cache", "past_key_values", "past_key_value"):
            if name in params:
                return name
        raise ValueError(f"model: cannot find the cache argument of {type(layer).__name__}.forward")

    # ------------------------------------------------------------------ shapes and dtypes
    @property
    def device(self):
        return self.model.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ forward pieces
    def embed(self, input_ids):
        """input_ids [N, q] int64 -> hidden [N, q, d] in the model dtype."""
        return self.model.model.embed_tokens(input_ids)

    def rotary(self, hidden, position_ids):
        """(cos, sin), each [N, q, head_dim], for position_ids [N, q]."""
        return self.model.model.rotary_emb(hidden, position_ids)

    def run_layer(self, idx, hidden, mask, position_ids, cos_sin, cache):
        """Decoder layer ``idx`` on hidden [N, q, d]; mask [N, 1, q, S]; cache: a row view. -> [N, q, d]."""
        out = self.layers[idx](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=cos_sin,
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        # Older transformers versions return a tuple (hidden, ...).
        return out[0] if isinstance(out, tuple) else out

    def project_kv(self, idx, hidden, cos, sin):
        """State propagation: the key/value states layer ``idx`` would cache for ``hidden``.

        Input norm, k/v projections, k_norm where the architecture has one (Qwen3) and rotary on the
        keys, exactly as the layer's attention computes them, and nothing else (no attention, no MLP).

        Args:
            hidden: [N, q, d] hidden states entering layer ``idx`` (for an exited token: its exit state).
            cos, sin: [N, q, head_dim] rotary tables of those positions.

        Returns:
            (keys, values), each [N, num_kv_heads, q, head_dim] in the model dtype.
        """
        layer = self.layers[idx]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, self.head_dim)
        keys = attn.k_proj(x).view(shape)
        if hasattr(attn, "k_norm"):
            keys = attn.k_norm(keys)
        keys = keys.transpose(1, 2)
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        keys, _ = self._apply_rope(keys, keys, cos, sin)
        return keys, values

    def logits(self, hidden):
        """Full-depth logits: the model's own final norm and lm_head. hidden [..., d] -> [..., V]."""
        return self.model.lm_head(self.model.model.norm(hidden))

    # ------------------------------------------------------------------ exit head
    @property
    def exit_head(self):
        """Keyword arguments of :func:`earlyexit.exit_check` for the shared head (final norm + lm_head).

        With a tensor-parallel lm_head (vocabulary-sharded DTensor) they name this rank's rows and the
        shard's process group, so the check merges per-row statistics instead of gathering logits.
        """
        norm = self.model.model.norm
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
        head = self.model.lm_head
        shard = vocab_shard(head.weight)
        weight = local_tensor(head.weight)
        if not shard and weight.shape[0] != head.out_features:
            # A tensor-parallel implementation that keeps plain local tensors: the rows' global ids are unknown.
            raise ValueError(
                f"model: lm_head holds {weight.shape[0]} of its {head.out_features} vocabulary rows without "
                "saying which (not a DTensor); pass a model sharded by transformers' tp_plan or an unsharded one"
            )
        return dict(
            weight=weight,
            bias=local_tensor(head.bias),
            norm_weight=local_tensor(norm.weight),
            norm_eps=float(eps),
            **shard,
        )

    def sub_head(self, token_ids):
        """:attr:`exit_head` over the vocabulary rows ``token_ids`` only (int64 [V'], on the model's device).

        The rows are copied once into a contiguous [V', d] weight, so an exit check over them reads
        V'/V of the head. Its tokens index ``token_ids``. Raises ValueError for a vocabulary-sharded head.
        """
        kwargs = self.exit_head
        if "group" in kwargs:
            raise ValueError("draft_vocab: not supported with a vocabulary-sharded (tensor-parallel) lm_head")
        kwargs["weight"] = kwargs["weight"].index_select(0, token_ids)
        if kwargs["bias"] is not None:
            kwargs["bias"] = kwargs["bias"].index_select(0, token_ids)
        return kwargs
