"""A frequency-ranked sub-vocabulary for exact mode's drafts (FR-Spec).

Most of a draft step's exit check over the shared head is reading the head's [V, d] weight. Drafting
over the most frequent tokens only reads a share of it; the verification still uses the whole
vocabulary, so exact mode's output does not change, only which drafts are offered.
"""

import math

import torch


def draft_vocabulary(data, vocab_size, *, share=0.25, tokenizer=None, always=()):
    """The ``share`` most frequent token ids of ``data``, for ``EarlyExitLM.draft_vocab``.

    Args:
        data: a list of strings (tokenized with ``tokenizer``) or an int64 tensor of token ids.
        vocab_size: V, the model's vocabulary (``model.config.vocab_size``).
        share: the sub-vocabulary's share of V, in (0, 1]: ceil(share x V) ids.
        tokenizer: a HuggingFace tokenizer; required for strings. Its special tokens (end of
            sequence among them) are always kept.
        always: more token ids to keep whatever their frequency.

    Returns:
        int64 [ceil(share x V)] distinct ids in [0, V), ascending (so the exit check's lowest-index
        tie break is that of the full vocabulary). Ties in frequency go to the lower id.

    Raises:
        ValueError: bad share, vocab_size, data or ids out of range.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected an int >= 1, got {vocab_size!r}")
    if not 0 < share <= 1:
        raise ValueError(f"share: expected a value in (0, 1], got {share!r}")
    if isinstance(data, torch.Tensor):
        ids = data.reshape(-1).long()
    else:
        if tokenizer is None:
            raise ValueError("tokenizer: required when data holds strings")
        ids = torch.tensor([t for text in data for t in tokenizer(text)["input_ids"]], dtype=torch.int64)
    keep = list(always) + (list(getattr(tokenizer, "all_special_ids", None) or []) if tokenizer else [])
    keep = torch.tensor(keep, dtype=torch.int64)
    for name, t in (("data", ids), ("always", keep)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise ValueError(f"{name}: token ids must lie in [0, {vocab_size})")
    count = max(1, math.ceil(round(share * vocab_size, 6)))  # round: 0.1 x 30 is 3, not 3.0000000000000004
    freq = torch.bincount(ids, minlength=vocab_size).double()
    freq[keep] = float("inf")
    # Stable sort by descending frequency: equal counts stay in id order.
    ranked = torch.sort(-freq, stable=True).indices[:count]
    return ranked.sort().values
