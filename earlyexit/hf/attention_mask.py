"""Positions and explicit 4-D attention masks for left-padded batches with holes.

The generation loops call decoder layers directly (on row subsets), so they build what
``model.forward`` would: position ids from the 2-D padding mask, as ``model.generate`` does, and
one 4-D mask per distinct sliding window. A 0 in the 2-D mask is left padding or, in exact mode, a
hole (a cache position of a draft the row rejected): both are invisible to every query, positions
skip them, and sliding windows count tokens, not cache positions.
"""

import torch


def position_ids(attention_mask, start, q):
    """Position ids [B, q] of cache positions [start, start + q): running count of real tokens - 1.

    attention_mask: [B, S] (1 = token, 0 = left padding), S >= start + q. Padding positions get 0,
    like ``model.generate``.
    """
    am = attention_mask[:, : start + q].long()
    pos = am.cumsum(-1) - 1
    return pos.masked_fill(am == 0, 0)[:, start:]


def build_masks(attention_mask, start, q, windows, attn_impl, dtype):
    """One 4-D mask per distinct window for queries at cache positions [start, start + q).

    Query i (absolute position start + i) may see key j when j <= start + i, key j is a real token
    (or j is the query itself: a padding query then attends to itself only, which keeps its output
    finite; no real token ever reads it) and, for a window w, fewer than w real tokens lie in
    (j, start + i] (without holes, start + i - j < w, as in ``model.forward``).

    Args:
        attention_mask: [B, S] 2-D padding mask, S >= start + q.
        windows: iterable of window sizes (None = full attention).
        attn_impl: "sdpa" (boolean mask, True = attend) or "eager" (additive float mask).
        dtype: model dtype, for the additive mask.

    Returns:
        dict window -> mask [B, 1, q, start + q].
    """
    kv = start + q
    device = attention_mask.device
    query = torch.arange(start, kv, device=device).view(q, 1)
    key = torch.arange(kv, device=device).view(1, kv)
    real = attention_mask[:, None, None, :kv].bool()
    causal = key <= query
    masks = {}
    if any(w is not None for w in windows):
        tokens = attention_mask[:, :kv].long().cumsum(-1)  # real tokens up to and including each position
        distance = tokens[:, None, start:, None] - tokens[:, None, None, :]  # [B, 1, q, kv]
    for w in set(windows):
        allowed = causal if w is None else causal & (distance < w)
        allowed = (allowed & real) | (key == query)
        if attn_impl == "eager":
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        masks[w] = allowed
    return masks
