"""Text that ships with Python, tokenized into fixed windows: data for adapters and calibration.

Nothing is downloaded: the default corpus is ``pydoc_data.topics`` (about 460 KB of English prose
and code in every CPython). Splits are by topic, so held-out text never overlaps training text.
"""

import torch


def builtin_corpus(split="train", held_out_every=5):
    """Python's pydoc topics as a list of strings.

    Args:
        split: "train" (4 topics in 5), "held_out" (every 5th topic) or "all".
        held_out_every: one topic in this many goes to the held-out split.
    Returns:
        list of str, one per topic, in a fixed (sorted) order.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    if split == "all":
        keep = names
    elif split == "train":
        keep = [n for i, n in enumerate(names) if i % held_out_every != held_out_every - 1]
    elif split == "held_out":
        keep = [n for i, n in enumerate(names) if i % held_out_every == held_out_every - 1]
    else:
        raise ValueError(f"split: expected 'train', 'held_out' or 'all', got {split!r}")
    return [topics[n] for n in keep]


def token_windows(data, seq_len, *, tokenizer=None, max_tokens=None):
    """Token ids cut into [n, seq_len] windows.

    Args:
        data: a list of strings (tokenized with ``tokenizer``, joined with its EOS token) or a
            LongTensor of token ids ([T] or [B, T], flattened in row order).
        seq_len: window length (>= 2).
        tokenizer: a HuggingFace tokenizer; required when ``data`` holds strings.
        max_tokens: keep at most this many tokens (before windowing).
    Returns:
        LongTensor [n, seq_len]; the tail shorter than one window is dropped.
    Raises:
        ValueError: empty data, strings without a tokenizer, a bad tensor, or fewer than seq_len tokens.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2, got {seq_len!r}")
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int64, torch.int32) or data.dim() not in (1, 2):
            raise ValueError(
                f"data: expected a LongTensor of token ids [T] or [B, T], got {data.dtype} {tuple(data.shape)}"
            )
        ids = data.reshape(-1).long().cpu()
    else:
        if isinstance(data, str) or not data or not all(isinstance(s, str) for s in data):
            raise ValueError("data: expected a non-empty list of strings or a LongTensor of token ids")
        if tokenizer is None:
            raise ValueError("tokenizer: required to tokenize a list of strings")
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        flat = []
        for text in data:
            flat += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
            if max_tokens is not None and len(flat) >= max_tokens:
                break
        ids = torch.tensor(flat, dtype=torch.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"data: {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)
