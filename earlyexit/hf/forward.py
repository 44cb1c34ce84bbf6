"""Forward passes over the decoder: full depth (prefill, verification) and one early-exit step.

Both run the decoder layers directly on the rows that are still generating, writing a
:class:`~earlyexit.hf.cache.RowCache`. The early-exit step checks the exit head after each exit
layer (measure="state": the similarity of the hidden states, then the head on the exiting rows only),
compacts the continuing rows (so the deeper layers run only on them), and at the end fills the
skipped layers of exited rows by state propagation.
"""

import time
from dataclasses import dataclass

import torch

from earlyexit import compact, exit_check, partition_rows, scatter_rows, state_similarity
from earlyexit.hf.attention_mask import build_masks, position_ids
from earlyexit.ops.measures import get_measure


@dataclass
class ExitSpec:
    """Resolved exit configuration of an :class:`~earlyexit.hf.EarlyExitLM`.

    exit_layers: sorted layer counts k (exit check after the first k layers), 1 <= k < L.
    thresholds: one float per exit layer. heads: one callable [N, d] -> [N, d] or None per exit layer.
    measure: exit_check measure. compaction: False runs every row through every layer and only masks
    the results of exited rows (a reference for the compacted path; same tokens, no savings).
    draft_vocab: None (drafts over the whole vocabulary) or a :class:`DraftVocab`.
    """

    exit_layers: list
    thresholds: list
    heads: list
    measure: str
    compaction: bool = True
    draft_vocab: object = None


@dataclass
class DraftVocab:
    """Exact mode's draft sub-vocabulary: ids int64 [V'] (ascending) and the exit_check keyword
    arguments of the shared head restricted to those rows (:meth:`ModelAdapter.sub_head`)."""

    ids: torch.Tensor
    exit_head: dict


@dataclass
class Counters:
    """Accumulated over a generate call.

    exit_check_s: seconds in exit checks (under measure="state": the similarity and the decision; the
    exiting rows' head is token choice). layer_rows: decoder layers x rows x positions computed.
    propagated_layer_rows: k/v-only layer computations of state propagation. head_rows: rows (x
    positions) the exit head evaluated (fused check or lm_head logits), exit checks and token choice alike.
    Exact mode: verify_passes, draft_steps (draft exit checks), drafted (draft tokens verified, per row),
    matched (drafts the verifier agreed with).
    """

    exit_check_s: float = 0.0
    layer_rows: int = 0
    propagated_layer_rows: int = 0
    head_rows: int = 0
    verify_passes: int = 0
    draft_steps: int = 0
    drafted: int = 0
    matched: int = 0


@dataclass
class _Rows:
    """Inputs of the rows that run, compacted, plus what state propagation needs for all rows."""

    hidden: torch.Tensor  # [K, q, d]
    cos: torch.Tensor  # [K, q, R]: adapter.rotary tables (every layer type's, concatenated, for Gemma 3)
    sin: torch.Tensor
    pos: torch.Tensor  # [K, q]
    masks: list  # one [K, 1, q, S] per distinct window, in the order of `windows`
    rows: torch.Tensor  # int64 [K]: original batch rows
    cos_all: torch.Tensor  # [B, q, R]
    sin_all: torch.Tensor


def _rotary(adapter, cache, hidden, pos):
    """The rotary tables of positions pos [B, q] of every batch row of ``cache``."""
    lengths = None if cache.rope_lengths is None else cache.rope_lengths(pos)
    return adapter.rotary(hidden, pos, lengths)


def _prologue(adapter, cache, input_ids, attention_mask, running):
    """Reserve q cache positions, build positions/masks, embed, and compact to the running rows."""
    start, q = cache.length, input_ids.shape[1]
    cache.reserve(q)
    pos = position_ids(attention_mask, start, q)
    masks = build_masks(attention_mask, start, q, adapter.windows, adapter.attn_impl, adapter.dtype)
    hidden = adapter.embed(input_ids)
    cos, sin = _rotary(adapter, cache, hidden, pos)
    (hidden_k, cos_k, sin_k, pos_k, *masks_k), rows = compact(running, hidden, cos, sin, pos, *masks.values())
    return _Rows(hidden_k, cos_k, sin_k, pos_k, masks_k, rows, cos, sin), list(masks)


def _run_layers(adapter, layers, h, masks, windows, pos, cos_sin, view):
    """Decoder layers ``layers`` (a range) on h [K, q, d] with one mask per window (order of ``windows``)."""
    for idx in layers:
        h = adapter.run_layer(idx, h, masks[windows.index(adapter.windows[idx])], pos, cos_sin, view)
    return h


def _view_rows(rows, batch):
    # All rows: the layers read the cache tensors directly instead of gathering a copy.
    return None if rows.shape[0] == batch else rows


def full_forward(adapter, cache, input_ids, attention_mask, running, counters):
    """Full-depth pass over positions [cache.length, cache.length + q) for the running rows.

    Args:
        input_ids: [B, q] int64. attention_mask: [B, S] with S >= cache.length + q.
        running: [B] bool, the rows to compute (the other rows' new positions stay zero).

    Returns:
        (hidden [K, q, d] after the last layer, rows int64 [K]).
    """
    batch = input_ids.shape[0]
    r, windows = _prologue(adapter, cache, input_ids, attention_mask, running)
    view = cache.view(_view_rows(r.rows, batch))
    h = _run_layers(adapter, range(adapter.num_layers), r.hidden, r.masks, windows, r.pos, (r.cos, r.sin), view)
    counters.layer_rows += adapter.num_layers * r.rows.shape[0] * input_ids.shape[1]
    return h, r.rows


def verify_forward(adapter, cache, block, attention_mask, running, first_states, k, counters):
    """Full-depth pass over a drafted block that reuses what the drafts computed exactly.

    Every running row of every draft step ran at least the first ``k`` layers (k: the draft depth)
    from exact inputs, so the cache entries of layers 0..k-1 at the drafted positions are already
    the full model's, and so are their hidden states after layer k (``first_states``). When the
    drafts computed n of the n + 1 block positions, the last draft token still needs layers 0..k-1
    (run position by position, as ``model.generate`` runs them); when they computed all n + 1 (the
    round stopped on a low-confidence draft, which is dropped but whose step ran its input), nothing
    below k runs again. Layers k..L-1 then run on all n + 1 positions, overwriting whatever the
    drafts left there (computed, propagated or reserved zeros).

    Args:
        block: [B, n + 1] int64, the pending token then the n drafts. The cache holds the drafted
            positions: cache.length = start + n, or start + n + 1 when ``first_states`` covers the
            whole block. attention_mask: [B, S], S >= start + n + 1.
        running: [B] bool, the rows the drafts ran. first_states: [K, n, d] or [K, n + 1, d] hidden
            states after layer k of the running rows (in row order) at the drafted positions.

    Returns:
        (hidden [K, n + 1, d] after the last layer, rows int64 [K]).
    """
    batch, q = block.shape[0], block.shape[1]
    if first_states.shape[1] == q:
        start = cache.length - q
        h, rows = first_states, compact(running)[1]
        below = 0
    else:
        start = cache.length - (q - 1)
        r, windows = _prologue(adapter, cache, block[:, -1:], attention_mask, running)
        last = _run_layers(
            adapter, range(k), r.hidden, r.masks, windows, r.pos, (r.cos, r.sin), cache.view(_view_rows(r.rows, batch))
        )
        h, rows = torch.cat([first_states, last], dim=1), r.rows
        below = k
    pos = position_ids(attention_mask, start, q)
    masks = build_masks(attention_mask, start, q, adapter.windows, adapter.attn_impl, adapter.dtype)
    cos, sin = _rotary(adapter, cache, h, pos)
    (cos, sin, pos, *masks_k), _ = compact(running, cos, sin, pos, *masks.values())
    cache.reserved = q  # layers k.. write positions [start, start + q)
    view = cache.view(_view_rows(rows, batch))
    h = _run_layers(adapter, range(k, adapter.num_layers), h, masks_k, list(masks), pos, (cos, sin), view)
    counters.layer_rows += rows.shape[0] * (below + (adapter.num_layers - k) * q)
    return h, rows


def draft_step(adapter, cache, input_ids, attention_mask, running, depth, head, counters, vocab=None, state=False):
    """One draft at a fixed depth E: layers 0..E-1, then the fused exit check through E's head.

    The layers E..L-1 of the new position stay reserved (zeros): only the verification reads or
    writes them, and it recomputes them for every drafted position.

    Args:
        input_ids: [B, 1] int64. attention_mask: [B, S], S >= cache.length + 1. running: [B] bool.
        depth: E, 1 <= E < L. head: None or a callable [K, d] -> [K, d] before the shared head.
        vocab: None or a :class:`DraftVocab`: the check runs over its rows only, and max_prob is
            the draft token's probability within that sub-vocabulary.
        state: the confidence is the state similarity cos(h_E, h_(E-1)) (measure="state") instead of
            max_prob; the token still comes from the head.

    Returns:
        (tokens int64 [B] (0 for rows not running), confidence float32 [K] (max_prob of the draft
        tokens, NaN for an invalid row; or the state similarity, NaN for non-finite states), state
        [K, d] after layer E), the last two in the running rows' order.
    """
    batch = input_ids.shape[0]
    r, windows = _prologue(adapter, cache, input_ids, attention_mask, running)
    view = cache.view(_view_rows(r.rows, batch))
    h = r.hidden
    if state:  # stop one layer short to keep h_(E-1)
        h = _run_layers(adapter, range(depth - 1), h, r.masks, windows, r.pos, (r.cos, r.sin), view)
        before = h[:, -1]
    h = _run_layers(adapter, range(depth - 1 if state else 0, depth), h, r.masks, windows, r.pos, (r.cos, r.sin), view)
    h = h[:, -1]
    counters.layer_rows += depth * r.rows.shape[0]
    t0 = time.perf_counter()
    x = h if head is None else head(h)
    res = exit_check(x, threshold=1.0, **(adapter.exit_head if vocab is None else vocab.exit_head))
    counters.exit_check_s += time.perf_counter() - t0
    counters.head_rows += x.shape[0]
    counters.draft_steps += 1
    tokens = torch.zeros(batch, dtype=torch.int64, device=input_ids.device)
    # An invalid row (token -1, NaN probability) drafts token 0, which the verification judges like any draft.
    token = res.token.clamp(min=0)
    scatter_rows(tokens, r.rows, token if vocab is None else vocab.ids[token])
    return tokens, (state_similarity(h, before) if state else res.max_prob), h


def plain_step(adapter, cache, input_ids, attention_mask, running, chooser, counters, fused):
    """One full-depth decoding step without exit checks: next tokens int64 [B] (0 for rows not running).

    input_ids: [B, q] int64 (q > 1: a prefill; the token follows the last position); fused: as in
    :func:`full_depth_tokens`.
    """
    h, rows = full_forward(adapter, cache, input_ids, attention_mask, running, counters)
    tokens = torch.zeros(input_ids.shape[0], dtype=torch.int64, device=input_ids.device)
    scatter_rows(tokens, rows, full_depth_tokens(adapter, chooser, h[:, -1], fused, counters))
    return tokens


def _timed_check(spec, i, hidden, adapter, counters):
    """Exit check of exit point i on hidden [K, d] (through its head), timed."""
    t0 = time.perf_counter()
    head = spec.heads[i]
    x = hidden if head is None else head(hidden)
    res = exit_check(x, threshold=spec.thresholds[i], measure=spec.measure, **adapter.exit_head)
    exits = res.exit
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)  # the exit decision needs the result on the host anyway
    counters.exit_check_s += time.perf_counter() - t0
    counters.head_rows += x.shape[0]
    return x, res.token, exits


def _state_check(spec, i, hidden, before, done, adapter, chooser, counters):
    """Exit point i under measure="state": the decision without the head, then the exiting rows' tokens.

    A row exits when cos(hidden, before) >= its threshold (:func:`earlyexit.state_similarity`, float32;
    NaN never exits) and is not ``done``. Only the exiting rows, compacted, go through the exit point's
    head and the shared head (as :func:`full_depth_tokens` chooses tokens: the fused check when greedy,
    the logits when sampling), so continuing rows never touch the head here.

    Args:
        hidden, before: [K, d], the rows' last-position states after this exit layer and after the
            layer before it. done: [K] bool, rows that exited before (masking-only path).
    Returns:
        (tokens int64 [K], 0 for the rows that do not exit; exits bool [K]; their number, an int).
    """
    t0 = time.perf_counter()
    exits = get_measure(spec.measure).exits(state_similarity(hidden, before), spec.thresholds[i]) & ~done
    n_exit = int(exits.sum())  # the host needs the decision (and the number of rows to compact)
    counters.exit_check_s += time.perf_counter() - t0
    tokens = torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    if n_exit:
        (x,), rows = compact(exits, hidden)
        head = spec.heads[i]
        x = x if head is None else head(x)
        scatter_rows(tokens, rows, full_depth_tokens(adapter, chooser, x, counters=counters))
    return tokens, exits, n_exit


def full_depth_tokens(adapter, chooser, hidden, fused=True, counters=None):
    """Next tokens of rows that ran every layer, from their last hidden states [K, d] -> int64 [K].

    Greedy with ``fused``: the fused exit check over the model's own head (final norm + lm_head) gives
    the argmax of the float32 logits without materializing [K, V] of them (on a 2-core CPU, 4x faster
    than lm_head at SmolLM2's 49152 x 576 head); ties go to the lowest index as in torch.argmax. Rows
    whose logits are not finite get torch's argmax of the materialized logits, as model.generate would.
    ``fused=False`` (or sampling, which needs the logits themselves) uses the model's logits.
    counters: a :class:`Counters` whose head_rows count these rows, or None.
    """
    if counters is not None:
        counters.head_rows += hidden.shape[0]
    if chooser.do_sample or not fused:
        return chooser(adapter.logits(hidden))
    tokens = exit_check(hidden, threshold=1.0, **adapter.exit_head).token
    invalid = tokens < 0
    if bool(invalid.any()):
        tokens = torch.where(invalid, chooser(adapter.logits(hidden)), tokens)
    return tokens


def exit_step(adapter, cache, spec, input_ids, attention_mask, running, chooser, counters):
    """One decoding step with per-row early exits, compaction and state propagation.

    Args:
        input_ids: [B, 1] int64, the last token of each row. attention_mask: [B, S], S >= cache.length + 1.
        running: [B] bool, rows still generating (the others are skipped entirely).
        chooser: :class:`~earlyexit.hf.sampling.TokenChooser` (greedy or sampling).

    Returns:
        (tokens int64 [B], exit_layer int64 [B]): the next token of each running row and the number
        of decoder layers it ran (L for full depth; 0 for rows that are not running).
    """
    batch, num_layers = input_ids.shape[0], adapter.num_layers
    device = input_ids.device
    r, windows = _prologue(adapter, cache, input_ids, attention_mask, running)
    tokens = torch.zeros(batch, dtype=torch.int64, device=device)
    exit_layer = torch.zeros(batch, dtype=torch.int64, device=device)
    exit_hidden = torch.zeros(batch, 1, r.hidden.shape[-1], dtype=r.hidden.dtype, device=device)
    exit_at = {k: i for i, k in enumerate(spec.exit_layers)}
    state = get_measure(spec.measure).source == "state"  # decide on cos(h_k, h_(k-1)), no head

    h, cos, sin, pos, masks, rows = r.hidden, r.cos, r.sin, r.pos, r.masks, r.rows
    # Masking-only path (no compaction): exited rows keep running and `done` marks them.
    done = torch.zeros(rows.shape[0], dtype=torch.bool, device=device)
    for idx in range(num_layers):
        if rows.shape[0] == 0:
            break
        view = cache.view(_view_rows(rows, batch))
        before = h
        h = adapter.run_layer(idx, h, masks[windows.index(adapter.windows[idx])], pos, (cos, sin), view)
        counters.layer_rows += rows.shape[0]
        i = exit_at.get(idx + 1)
        if i is None:
            continue
        if state:  # the exiting rows' tokens come with the decision
            tok, exits, n_exit = _state_check(spec, i, h[:, -1], before[:, -1], done, adapter, chooser, counters)
        else:
            x, tok, exits = _timed_check(spec, i, h[:, -1], adapter, counters)
            exits = exits & ~done
            n_exit = int(exits.sum())
        if n_exit == 0:
            continue
        if chooser.do_sample and not state:
            tok = tok.masked_scatter(exits, chooser(adapter.logits(x[exits])))
        if spec.compaction:
            # Continuing rows first, exited rows after, in one fused call; the split point is known (n_exit).
            parts, _, _ = partition_rows(~exits, h, cos, sin, pos, rows, tok, *masks)
            k = rows.shape[0] - n_exit
            gone, gone_tok, gone_h = parts[4][k:], parts[5][k:], parts[0][k:]
            h, cos, sin, pos, rows = (t[:k] for t in parts[:5])
            masks = [m[:k] for m in parts[6:]]
            done = done[:k]
        else:
            gone, gone_tok, gone_h = rows[exits], tok[exits], h[exits]
            done = done | exits
            if bool(done.all()):
                rows = rows[:0]
        scatter_rows(tokens, gone, gone_tok)
        scatter_rows(exit_layer, gone, torch.full_like(gone, idx + 1))
        scatter_rows(exit_hidden, gone, gone_h)

    if rows.shape[0] > 0:
        live = rows[~done]
        scatter_rows(tokens, live, full_depth_tokens(adapter, chooser, h[~done][:, -1], counters=counters))
        scatter_rows(exit_layer, live, torch.full_like(live, num_layers))
    _propagate(adapter, cache, spec, exit_hidden, exit_layer, running, r, counters)
    return tokens, exit_layer


def _propagate(adapter, cache, spec, exit_hidden, exit_layer, running, r, counters):
    """State propagation: fill the layers each exited row skipped, one batched pass per layer.

    A row that exited after k layers skips layers k..L-1; between two exit points the set of rows
    that skip a layer does not change, so it is compacted once per segment.
    """
    bounds = list(spec.exit_layers) + [adapter.num_layers]
    for i, k in enumerate(spec.exit_layers):
        skipped = running & (exit_layer <= k)
        (h, cos, sin), rows = compact(skipped, exit_hidden, r.cos_all, r.sin_all)
        if rows.shape[0] == 0:
            continue
        for idx in range(k, bounds[i + 1]):
            keys, values = adapter.project_kv(idx, h, cos, sin)
            cache.write(idx, rows, keys, values)
        counters.propagated_layer_rows += rows.shape[0] * (bounds[i + 1] - k)


def schedule_step(adapter, cache, input_ids, attention_mask, running, depth, chooser, counters):
    """One decoding step at a fixed depth for every running row (a position schedule, SkipDecode-style).

    Layers 0..depth-1 on all running rows (one static shape: no exit checks, no compaction), the token
    from the shared head at that depth (as :func:`full_depth_tokens` chooses it: the fused exit check
    over final norm + lm_head when greedy, the model's logits when sampling; the head runs once per
    row), then the layers depth..L-1 of the new position by state propagation (k/v projections of the
    depth-``depth`` hidden state, one batched pass per layer over the running rows).

    Args:
        input_ids: [B, 1] int64. attention_mask: [B, S], S >= cache.length + 1. running: [B] bool.
        depth: 1 <= depth <= L (L: no propagation).

    Returns:
        (tokens int64 [B], exit_layer int64 [B]): 0 for rows not running, ``depth`` for the others.
    """
    batch, num_layers = input_ids.shape[0], adapter.num_layers
    r, windows = _prologue(adapter, cache, input_ids, attention_mask, running)
    k = r.rows.shape[0]
    h = _run_layers(
        adapter, range(depth), r.hidden, r.masks, windows, r.pos, (r.cos, r.sin), cache.view(_view_rows(r.rows, batch))
    )
    counters.layer_rows += depth * k
    tokens = torch.zeros(batch, dtype=torch.int64, device=input_ids.device)
    scatter_rows(tokens, r.rows, full_depth_tokens(adapter, chooser, h[:, -1], counters=counters))
    for idx in range(depth, num_layers):
        keys, values = adapter.project_kv(idx, h, r.cos, r.sin)
        cache.write(idx, r.rows, keys, values)
    counters.propagated_layer_rows += k * (num_layers - depth)
    exit_layer = torch.zeros(batch, dtype=torch.int64, device=input_ids.device)
    scatter_rows(exit_layer, r.rows, torch.full_like(r.rows, depth))
    return tokens, exit_layer
