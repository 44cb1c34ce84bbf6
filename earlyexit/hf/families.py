"""What sets each supported decoder family apart, in one table (read by ``model_adapter.py`` only).

Every supported ``*ForCausalLM`` has the Llama layout: ``model.model.embed_tokens``, ``model.model.layers``
(each with ``self_attn``), ``model.model.rotary_emb``, ``model.model.norm`` and ``model.lm_head``.
Generation calls the decoder layers themselves, so whatever happens inside a layer (Gemma's extra
post-attention / post-feed-forward norms, attention-logit softcapping and ``query_pre_attn_scalar``,
Granite's residual and attention multipliers, Phi-3's fused ``gate_up_proj``) needs nothing here.
A :class:`Family` says only what happens *outside* the layers or what state propagation must
reproduce from the attention module's parts: how tokens are embedded, how a layer's key/value states
are computed, which rotary table and window each layer uses, and how the final hidden state becomes
logits.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """The differences of one ``config.model_type`` from Llama.

    Attributes:
        causal_lm: the causal LM class name (for error messages).
        input_norm: the layer's norm in front of the attention, or None when the layer has none and
            its attention reads the raw hidden state (OLMo 2: its norms follow the sublayers).
        qkv_proj: name of a fused [q | k | v] projection of the attention module (Phi-3), sliced at
            ``num_attention_heads * head_dim`` and ``+ num_key_value_heads * head_dim`` as the module
            slices it; None: separate ``k_proj`` / ``v_proj``.
        k_norm: where the attention's ``k_norm`` applies: "head" (per head, after the head reshape:
            Qwen3, Gemma 3), "projection" (over the whole k projection, before the reshape: OLMo 2), None.
        embedding_multiplier: config attribute the base model multiplies the embeddings by *outside*
            the embedding module (Granite), or None. (Gemma's sqrt(d) scaling lives inside its
            embedding module, so calling the module already applies it.)
        norm_offset: RMSNorm scale is ``norm_offset + weight`` (Gemma: 1.0). Read for the final norm
            handed to the exit check; the layers' own norms are called as modules.
        final_softcap: config attribute of the final-logit softcap, z <- c * tanh(z / c) (Gemma), or None.
        logits_scaling: config attribute the logits are divided by (Granite), or None.
        rotary_per_layer_type: the rotary module takes a layer type and has settings per type
            (Gemma 3: ``rotary_emb(x, pos, layer_type)`` for each of ``config.layer_types``).
        window: how a layer's sliding window is read: "layer" (``self_attn.sliding_window``, None for
            full-attention layers), "config" (``config.sliding_window`` for every layer), None (none).
        attention: attention implementations that run this family with explicit 4-D masks.
    """

    causal_lm: str
    input_norm: str | None = "input_layernorm"
    qkv_proj: str | None = None
    k_norm: str | None = None
    embedding_multiplier: str | None = None
    norm_offset: float = 0.0
    final_softcap: str | None = None
    logits_scaling: str | None = None
    rotary_per_layer_type: bool = False
    window: str | None = None
    attention: tuple = ("eager", "sdpa")


_GEMMA = dict(norm_offset=1.0, final_softcap="final_logit_softcapping", window="layer")

#: config.model_type -> its :class:`Family`.
FAMILIES = {
    "llama": Family("LlamaForCausalLM"),
    "mistral": Family("MistralForCausalLM", window="config"),
    "qwen2": Family("Qwen2ForCausalLM", window="layer"),
    "qwen3": Family("Qwen3ForCausalLM", k_norm="head", window="layer"),
    # transformers runs Gemma 2 eagerly only (sdpa has no attention-logit softcapping).
    "gemma2": Family("Gemma2ForCausalLM", attention=("eager",), **_GEMMA),
    "gemma3_text": Family("Gemma3ForCausalLM", k_norm="head", rotary_per_layer_type=True, **_GEMMA),
    "phi3": Family("Phi3ForCausalLM", qkv_proj="qkv_proj", window="config"),
    "granite": Family(
        "GraniteForCausalLM", embedding_multiplier="embedding_multiplier", logits_scaling="logits_scaling"
    ),
    "olmo2": Family("Olmo2ForCausalLM", input_norm=None, k_norm="projection"),
}


def supported_list():
    """The supported architectures, for error messages: "LlamaForCausalLM (model_type 'llama'), ..."."""
    return ", ".join(f"{f.causal_lm} (model_type {t!r})" for t, f in FAMILIES.items())


def family_of(model):
    """The :class:`Family` of a transformers causal LM. Raises ValueError (listing the supported ones)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model: unsupported architecture {type(model).__name__} (model_type {model_type!r}); "
            f"supported: {supported_list()}"
        )
    return FAMILIES[model_type]
