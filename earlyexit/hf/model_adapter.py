"""The one place that knows HuggingFace module names (decoders with the Llama layout).

Everything else in :mod:`earlyexit.hf` talks to a :class:`ModelAdapter`: embed tokens, run one
decoder layer on any subset of rows, project hidden states to the key/value states of a layer
(for state propagation), and read the exit head (final RMSNorm + lm_head, and what the family does
to the logits: :func:`exit_head_args`). What differs between the supported families is one table,
:data:`earlyexit.hf.families.FAMILIES`; supporting another family with the same layout means adding
a row there (and, where its attention computes keys in a new way, a case in
:meth:`ModelAdapter.project_kv`).
"""

import inspect
import sys

import torch

from earlyexit.hf.families import FAMILIES, family_of
from earlyexit.hf.tensor_parallel import check_heads_per_rank, local_rows, local_tensor, vocab_shard

#: config.model_type -> the causal LM class it comes with (for the error message).
SUPPORTED = {model_type: family.causal_lm for model_type, family in FAMILIES.items()}

#: Attention implementations that accept the explicit 4-D masks built in attention_mask.py.
_MASKED_ATTENTION = ("eager", "sdpa")


def exit_head_args(model):
    """Keyword arguments of :func:`earlyexit.exit_check` for a causal LM's own head.

    Only the head is read (final norm, lm_head and the config values that shape the logits), so any
    attention implementation is fine.

    Returns:
        dict(weight, bias, norm_weight, norm_eps, norm_offset, softcap, temperature): the lm_head
        weight [V, d] and bias [V] or None, the final RMSNorm weight [d] and epsilon, ``norm_offset``
        (float: the norm's scale is norm_offset + norm_weight, 1.0 for Gemma), ``softcap`` (float
        or None: Gemma's final-logit softcap) and ``temperature`` (float: Granite's logits_scaling,
        else 1.0), so that the check's logits are the model's own. With a tensor-parallel lm_head
        (vocabulary-sharded DTensor) the tensors are this rank's rows, plus ``group``, ``vocab_start``
        and ``vocab_size``, so the check merges per-row statistics instead of gathering logits.

    Raises:
        ValueError: unsupported architecture (lists the supported ones), or a sharded lm_head whose
            rows' global ids are unknown.
    """
    family = family_of(model)
    norm = model.model.norm
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    head = model.lm_head
    shard = vocab_shard(head.weight)
    weight = local_tensor(head.weight)
    if not shard and weight.shape[0] != head.out_features:
        # A tensor-parallel implementation that keeps plain local tensors: the rows' global ids are unknown.
        raise ValueError(
            f"model: lm_head holds {weight.shape[0]} of its {head.out_features} vocabulary rows without "
            "saying which (not a DTensor); pass a model sharded by transformers' tp_plan or an unsharded one"
        )
    softcap, temperature = _logit_transforms(family, model.config)
    return dict(
        weight=weight,
        bias=local_tensor(head.bias),
        norm_weight=local_tensor(norm.weight),
        norm_eps=float(eps),
        norm_offset=float(family.norm_offset),
        softcap=softcap,
        temperature=temperature,
        **shard,
    )


def _masked_attention(family, config):
    """config's attention implementation ("eager" or "sdpa"), checked: the family must run it and it must take
    the explicit 4-D masks built in attention_mask.py; ValueError naming the model otherwise."""
    attn_impl = getattr(config, "_attn_implementation", None) or "eager"
    if attn_impl not in _MASKED_ATTENTION or attn_impl not in family.attention:
        allowed = " or ".join(repr(a) for a in family.attention if a in _MASKED_ATTENTION)
        raise ValueError(
            f"model: attention implementation {attn_impl!r} is not supported for {family.causal_lm} "
            f"(explicit 4-D masks are needed); load the model with attn_implementation={allowed}, or call "
            f"model.set_attn_implementation({allowed.split(' or ')[0]})"
        )
    return attn_impl


def _logit_transforms(family, config):
    """(softcap float or None, temperature float) of the family's final logits, read from its config."""
    softcap = getattr(config, family.final_softcap, None) if family.final_softcap else None
    scaling = getattr(config, family.logits_scaling, None) if family.logits_scaling else None
    return (None if softcap is None else float(softcap)), (1.0 if scaling is None else float(scaling))


class ModelAdapter:
    """Uniform access to a supported ``*ForCausalLM`` without copying or changing its weights.

    Rotary tables: :meth:`rotary` returns one (cos, sin) pair per step for all layers, which the
    generation loop compacts with the rows and hands back to :meth:`run_layer` and
    :meth:`project_kv`. A family with rotary settings per layer type (Gemma 3: sliding and full
    attention layers) gets every type's table concatenated on the last dimension, in the order of
    ``rotary_types``; the two methods take layer ``idx``'s own part (a view), so the loop never
    needs to know.

    Args:
        model: a transformers causal LM whose ``config.model_type`` is in :data:`SUPPORTED`.

    Raises:
        ValueError: unsupported architecture (lists the supported ones) or attention implementation.
    """

    def __init__(self, model):
        family = family_of(model)
        config = model.config
        _masked_attention(family, config)
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("model: bidirectional attention (use_bidirectional_attention) is not causal decoding")
        self.model = model
        self.config = config
        self.family = family
        self.layers = model.model.layers
        self.num_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_kv_heads = self._kv_features(attn) // attn.head_dim
        self.windows = [self._window(layer.self_attn) for layer in self.layers]
        self.cache_kwarg = self._cache_kwarg(self.layers[0])
        # Rotary layer types (Gemma 3): the types in the order their tables are concatenated (the rotary
        # module's own order), and each layer's columns of the concatenation.
        self.rotary_types = sorted(set(config.layer_types)) if family.rotary_per_layer_type else None
        self._rotary_cols = None
        if self.rotary_types is not None:
            rotary_emb = model.model.rotary_emb
            widths = [2 * getattr(rotary_emb, f"{t}_inv_freq").numel() for t in self.rotary_types]
            starts = [sum(widths[:i]) for i in range(len(widths))]
            cols = {t: slice(a, a + w) for t, a, w in zip(self.rotary_types, starts, widths)}
            self._rotary_cols = [cols[t] for t in config.layer_types]
        self.lock_step_rope_type, self.lock_step_context = self._lock_step_rope(model, config)
        # The module's own rotary function, so propagated keys match the layers' keys bit for bit.
        self._apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def _kv_features(self, attn):
        """Width of the key states one layer caches on this rank (its k/v heads x head_dim).

        Under tensor parallelism (tp_plan) a colwise k projection gives each rank its own heads. A fused
        qkv projection and a k_norm over the whole projection need all heads on every rank (transformers'
        plans gather those projections' outputs), so their widths are the model's.
        """
        if self.family.qkv_proj is not None:  # sliced as the attention module slices it
            return self.config.num_key_value_heads * attn.head_dim
        if self.family.k_norm == "projection":  # the norm (replicated) spans the whole projection
            return local_tensor(attn.k_norm.weight).shape[0]
        for name in ("q_proj", "k_proj"):
            proj = getattr(attn, name)
            check_heads_per_rank(local_rows(proj.weight, proj.out_features), attn.head_dim, f"self_attn.{name}")
        return local_rows(attn.k_proj.weight, attn.k_proj.out_features)

    def _window(self, attn):
        """Sliding-window size of one attention layer, or None for full attention."""
        if self.family.window == "layer":  # Qwen2/Qwen3/Gemma: set per layer from config.layer_types
            return getattr(attn, "sliding_window", None)
        if self.family.window == "config":  # Mistral, Phi-3: one window for every layer
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

    @property
    def attn_impl(self):
        """The model's attention implementation now, "eager" or "sdpa": the kind of mask to build.

        Read from the model's config at each use, not once when wrapping: the decoder layers dispatch on
        the config's value at each call, and ``model.set_attn_implementation`` may change it after the
        model was wrapped (an sdpa boolean mask added to eager scores would be wrong). ValueError, as at
        construction, for an implementation that explicit 4-D masks do not serve.
        """
        return _masked_attention(self.family, self.model.config)

    # ------------------------------------------------------------------ shapes and dtypes
    @property
    def device(self):
        return self.model.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ forward pieces
    def embed(self, input_ids):
        """input_ids [N, q] int64 -> hidden [N, q, d] in the model dtype (as the base model embeds them)."""
        hidden = self.model.model.embed_tokens(input_ids)
        if self.family.embedding_multiplier is not None:  # Granite: applied by the base model, not the module
            hidden = hidden * getattr(self.config, self.family.embedding_multiplier)
        return hidden

    @staticmethod
    def _lock_step_rope(model, config):
        """("longrope" or "dynamic", its original context C) for a rotary embedding whose frequencies
        follow each call's length (:mod:`~earlyexit.hf.lock_step_rope`), else (None, None)."""
        rotary_emb = model.model.rotary_emb
        rope_type = getattr(rotary_emb, "rope_type", None)
        if rope_type == "dynamic":  # its state starts at, and resets to, max_position_embeddings
            return rope_type, int(getattr(rotary_emb, "original_max_seq_len", config.max_position_embeddings))
        if rope_type != "longrope":
            return None, None
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        original = getattr(config, "original_max_position_embeddings", None) or params.get(
            "original_max_position_embeddings"
        )
        return rope_type, int(original or config.max_position_embeddings)

    def rotary(self, hidden, position_ids, lengths=None):
        """(cos, sin) for position_ids [N, q], each [N, q, R].

        R is the rotary width (head_dim, or less with partial rotary), or for a family with rotary
        settings per layer type the widths of every type in :attr:`rotary_types` concatenated.
        lengths: None (the rotary module's own frequencies for the call), or for a longrope or dynamic
        NTK rotary (:attr:`lock_step_rope_type`) int64 [N, q], the call length whose frequencies each
        position takes (:meth:`LockStepRope.lengths <earlyexit.hf.lock_step_rope.LockStepRope.lengths>`;
        each at least its position + 1), each table computed by the module itself, in a call of exactly
        that length; a dynamic module's state is left as it was.
        """
        rotary_emb = self.model.model.rotary_emb
        if lengths is not None:
            if self.lock_step_rope_type is None:
                raise ValueError("lengths: per-position lengths apply to a longrope or dynamic NTK rotary only")
            if self.lock_step_rope_type == "longrope":
                return self._longrope_tables(rotary_emb, hidden, position_ids, lengths > self.lock_step_context)
            return self._dynamic_tables(rotary_emb, hidden, position_ids, lengths)
        if self.rotary_types is None:
            return rotary_emb(hidden, position_ids)
        tables = [rotary_emb(hidden, position_ids, t) for t in self.rotary_types]
        return torch.cat([c for c, _ in tables], dim=-1), torch.cat([s for _, s in tables], dim=-1)

    def _longrope_tables(self, rotary_emb, hidden, position_ids, long):
        # The module takes its long factors for a whole call once the call's last position is past the
        # original context C, else its short ones; each position's table depends only on its position.
        # So the short tables come from positions clamped below C (those that take them already are),
        # the long ones from a call with one more position, at C, which is then dropped.
        context = self.lock_step_context
        short = rotary_emb(hidden, position_ids.clamp(max=context - 1))
        long_tables = _with_last_position(rotary_emb, hidden, position_ids, context)
        pick = long[..., None]
        return tuple(torch.where(pick, lt, st) for lt, st in zip(long_tables, short))

    def _dynamic_tables(self, rotary_emb, hidden, position_ids, lengths):
        # model.generate computes a position's table in the call that processes it, and the module sets
        # its frequencies from that call's length, max(position_ids) + 1 (grown to it past C, its original
        # ones within C). So per distinct length: the module's own update from its original state, in a
        # call whose length is exactly that one. The call holds the positions of that length (each below
        # it: lengths >= position + 1) with every other position of the block put at 0, which would
        # otherwise lengthen the call to the block's longest length, plus a last position length - 1.
        # The module's state is put back after each call.
        cos = sin = None
        for length in lengths.unique().tolist():
            pick = lengths == length
            state = (rotary_emb.max_seq_len_cached, rotary_emb.inv_freq, rotary_emb.attention_scaling)
            rotary_emb.max_seq_len_cached = rotary_emb.original_max_seq_len
            rotary_emb.inv_freq = rotary_emb.original_inv_freq.clone()
            try:
                c, s = _with_last_position(rotary_emb, hidden, torch.where(pick, position_ids, 0), length - 1)
            finally:
                rotary_emb.max_seq_len_cached, rotary_emb.inv_freq, rotary_emb.attention_scaling = state
            if cos is None:  # the first length's tables, overwritten below at every other length's positions
                cos, sin = c, s
            else:
                cos, sin = torch.where(pick[..., None], c, cos), torch.where(pick[..., None], s, sin)
        return cos, sin

    def lock_step_call(self, length):
        """Apply to a dynamic NTK rotary module the state update of a model.generate call of this
        length (its last position length - 1), as that call would; returns the longest length the
        module then holds (``max_seq_len_cached``). Other rotaries: a no-op, returns 0."""
        if self.lock_step_rope_type != "dynamic":
            return 0
        rotary_emb = self.model.model.rotary_emb
        x = torch.zeros(1, 1, 1, dtype=self.dtype, device=self.device)
        rotary_emb(x, torch.full((1, 1), length - 1, dtype=torch.int64, device=self.device))
        return int(rotary_emb.max_seq_len_cached)

    def _layer_rotary(self, idx, cos, sin):
        """Layer ``idx``'s own part of :meth:`rotary`'s tables (views; the tables themselves for one type)."""
        if self._rotary_cols is None:
            return cos, sin
        cols = self._rotary_cols[idx]
        return cos[..., cols], sin[..., cols]

    def run_layer(self, idx, hidden, mask, position_ids, cos_sin, cache):
        """Decoder layer ``idx`` on hidden [N, q, d]; mask [N, 1, q, S]; cos_sin: :meth:`rotary`'s tables
        of these rows; cache: a row view. -> [N, q, d]."""
        out = self.layers[idx](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=self._layer_rotary(idx, *cos_sin),
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        # Older transformers versions return a tuple (hidden, ...).
        return out[0] if isinstance(out, tuple) else out

    def project_kv(self, idx, hidden, cos, sin):
        """State propagation: the key/value states layer ``idx`` would cache for ``hidden``.

        Input norm (none for OLMo 2), k/v projections (taken out of the fused qkv projection for
        Phi-3), k_norm where the family has one (per head: Qwen3, Gemma 3; over the whole projection:
        OLMo 2) and rotary on the keys, exactly as the layer's attention computes them, and nothing
        else (no attention, no MLP).

        Args:
            hidden: [N, q, d] hidden states entering layer ``idx`` (for an exited token: its exit state).
            cos, sin: [N, q, R] :meth:`rotary` tables of those positions.

        Returns:
            (keys, values), each [N, num_kv_heads, q, head_dim] in the model dtype.
        """
        family = self.family
        layer = self.layers[idx]
        attn = layer.self_attn
        x = hidden if family.input_norm is None else getattr(layer, family.input_norm)(hidden)
        if family.qkv_proj is not None:
            # Phi3Attention: qkv = [q (num_attention_heads) | k (num_key_value_heads) | v (the rest)].
            qkv = getattr(attn, family.qkv_proj)(x)
            q_end = self.config.num_attention_heads * self.head_dim
            k_end = q_end + self.config.num_key_value_heads * self.head_dim
            keys, values = qkv[..., q_end:k_end], qkv[..., k_end:]
        else:
            keys, values = attn.k_proj(x), attn.v_proj(x)
        if family.k_norm == "projection":
            keys = attn.k_norm(keys)
        shape = (*x.shape[:-1], -1, self.head_dim)
        keys = keys.view(shape)
        if family.k_norm == "head":
            keys = attn.k_norm(keys)
        keys = keys.transpose(1, 2)
        values = values.view(shape).transpose(1, 2)
        keys, _ = self._apply_rope(keys, keys, *self._layer_rotary(idx, cos, sin))
        return keys, values

    def logits(self, hidden):
        """Full-depth logits, exactly the model's own: final norm, lm_head, then the family's softcap
        or scaling (Gemma, Granite). hidden [..., d] -> [..., V]."""
        logits = self.model.lm_head(self.model.model.norm(hidden))
        softcap, temperature = _logit_transforms(self.family, self.config)
        if softcap is not None:  # as Gemma2ForCausalLM / Gemma3ForCausalLM compute it
            logits = logits / softcap
            logits = torch.tanh(logits)
            logits = logits * softcap
        if self.family.logits_scaling is not None:  # as GraniteForCausalLM
            logits = logits / temperature
        return logits

    # ------------------------------------------------------------------ exit head
    @property
    def exit_head(self):
        """:func:`exit_head_args` of the model: the keyword arguments of :func:`earlyexit.exit_check`
        for the shared head (final norm + lm_head, with the family's norm offset, softcap and scaling)."""
        return exit_head_args(self.model)

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


def _with_last_position(rotary_emb, hidden, position_ids, last):
    """The rotary module's tables of position_ids [N, q] in a call that also has position ``last`` (an
    extra column, dropped): the call's length, which sets the frequencies, is then at least last + 1."""
    forced = torch.cat([position_ids, position_ids.new_full((position_ids.shape[0], 1), last)], dim=1)
    return tuple(t[:, : position_ids.shape[1]] for t in rotary_emb(hidden, forced))
