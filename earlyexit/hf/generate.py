"""Generation loops: exit mode (per-row early exits) and exact mode (self-speculative decoding).

Exit mode starts with a full-depth prefill of the prompt minus its last token; the last prompt
token is then the input of the first step, so the first generated token goes through the exit
checks like every other one. Exact mode (and exit mode without exit layers) prefills the whole
prompt, as ``model.generate`` does, and takes the first token from that full-depth pass (a draft
of it would only be verified by the same computation). Finished rows (end of sequence) stop
computing and are padded, as in ``model.generate``. Exit mode under a position schedule
(:func:`generate_schedule`) starts like exit mode and runs a fixed number of layers per position.
"""

from dataclasses import dataclass

import torch

from earlyexit.hf.cache import RowCache
from earlyexit.hf.forward import (
    Counters,
    draft_step,
    exit_step,
    full_depth_tokens,
    full_forward,
    plain_step,
    schedule_step,
    verify_forward,
)
from earlyexit.hf.lock_step_rope import LockStepRope
from earlyexit.timing import synchronized_clock


@dataclass
class GenerateOutput:
    """Result of :meth:`earlyexit.EarlyExitLM.generate`.

    sequences: int64 [B, T + n], prompt then generated tokens; rows that finished early are padded.
    exit_layer: int64 [B, n], decoder layers run for each generated token (L = full depth; 0 for the
        padding after a row finished). Exact mode: the draft's exit layer for accepted draft tokens,
        L for the tokens that come from the verification pass.
    stats: dict, see :func:`_stats`.
    cache: the ``transformers.DynamicCache`` after generation (``cache.layers[i].keys`` is
        [B, H_kv, S, D]).
    cache_mask: int64 [B, S], 1 where the cache holds a token of the row, 0 for left padding and for
        holes (exact mode at batch > 1: positions of drafts the row rejected). Row r's real positions
        hold, in order, its prompt tokens and then its generated tokens but the last one. Exit mode and
        batch 1 have no holes: position T - 1 + j then holds the input of generation step j.
    """

    sequences: torch.Tensor
    exit_layer: torch.Tensor
    stats: dict
    cache: object
    cache_mask: torch.Tensor


class _Run:
    """State shared by both loops: cache, counters, padding mask, finished rows, outputs.

    Rows advance at their own pace (exact mode keeps each row's accepted prefix), so the outputs are
    per-row buffers: ``out`` [B, max_new_tokens] tokens and ``out_layers`` their layer counts, filled up
    to ``count`` [B].
    """

    def __init__(self, adapter, input_ids, attention_mask, max_new_tokens, eos, pad, progress, first=None):
        batch, device = input_ids.shape[0], input_ids.device
        self.adapter = adapter
        self.cache = self._new_cache(batch, device)
        self.prompt_ids, self.prompt_mask = input_ids, attention_mask
        self.lock_step = None
        if adapter.lock_step_rope_type is not None:
            lock = LockStepRope(adapter.lock_step_rope_type, adapter.lock_step_context, attention_mask)
            # Dynamic NTK: the module's state after generate's prompt call (lengths below it take its frequencies).
            lock.floor = adapter.lock_step_call(lock.longest)
            self.lock_step = lock
            self.cache.rope_lengths = lock.lengths
        self.counters = Counters()
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.pad = pad
        self.progress = progress
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.out = torch.full((batch, max_new_tokens), pad, dtype=torch.int64, device=device)
        self.out_layers = torch.zeros(batch, max_new_tokens, dtype=torch.int64, device=device)
        self.count = torch.zeros(batch, dtype=torch.int64, device=device)
        self.rounds = []  # exact mode: (DraftPolicy or None for a plain step, drafts verified) per round
        self.holes = 0  # exact mode: cache positions of rejected drafts masked out, summed over rows
        self.compactions = 0  # exact mode: times the cache was compacted along the sequence axis
        self.remembered = 0  # exact mode: rounds the draft policy had observed before this call
        # Invariant: attention_mask covers the cached positions plus the one of `pending`; a 0 marks
        # left padding or a hole (a rejected draft's position, see generate_exact).
        self.attention_mask = attention_mask
        self.pending = input_ids[:, -1:]
        if first is not None:
            self._first_token(input_ids, *first)
        elif input_ids.shape[1] > 1:
            full_forward(adapter, self.cache, input_ids[:, :-1], attention_mask, self.unfinished, Counters())

    def _first_token(self, input_ids, chooser, fused):
        """Prefill the whole prompt and emit its full-depth next token (exact mode's first token)."""
        running = self.unfinished.clone()
        tok = plain_step(self.adapter, self.cache, input_ids, self.attention_mask, running, chooser, Counters(), fused)
        # The prompt's positions are not generation work; the last one's layers produce a token.
        self.counters.layer_rows += self.adapter.num_layers * int(running.sum())
        self.counters.head_rows += int(running.sum())
        self.emit(tok[:, None], torch.full_like(tok[:, None], self.adapter.num_layers))
        self.advance(tok[:, None])

    def _new_cache(self, batch, device):
        a = self.adapter
        return RowCache(a.num_layers, batch, a.num_kv_heads, a.head_dim, a.dtype, device)

    def next_positions(self):
        """Each row's position of ``pending``: its real cached tokens, int64 [B]."""
        return self.attention_mask[:, :-1].sum(1)

    def draft_limit(self, running):
        """Most drafts the next exact-mode round may make (>= 0): the tokens left, and with a longrope
        rotary no block that would reach a running row's switch before its cache is rebuilt."""
        limit = self.remaining() - 1
        if self.lock_step is not None and self.lock_step.switch is not None:
            limit = min(limit, self.lock_step.room(self.next_positions(), running))
        return limit

    def cross_long_rope(self, running):
        """With a longrope rotary: rebuild the cache of the running rows about to process their first
        long position (:mod:`~earlyexit.hf.lock_step_rope`), at full depth with the long factors, as
        ``model.generate`` recomputes its cache there. Between steps; a no-op for other rotaries."""
        lr = self.lock_step
        if lr is None or lr.switch is None:  # no longrope switch: nothing to check on this hot path
            return
        due = lr.due(self.next_positions(), running)
        if not bool(due.any()):
            return
        rows = due.nonzero().squeeze(1)
        cached = self.attention_mask[rows, :-1]
        # A row's real cached positions hold its prompt tokens, then its generated tokens but the last.
        seqs = [
            torch.cat([self.prompt_ids[r][self.prompt_mask[r].bool()], self.out[r, : int(self.count[r]) - 1]])
            for r in rows.tolist()
        ]
        tokens = torch.full(cached.shape, self.pad, dtype=torch.int64, device=cached.device)
        tokens[cached.bool()] = torch.cat(seqs)
        fresh = self._new_cache(rows.shape[0], rows.device)
        fresh.rope_lengths = lambda pos: torch.full_like(pos, lr.original + 1)  # generate's recompute call
        full_forward(self.adapter, fresh, tokens, cached, torch.ones_like(rows, dtype=torch.bool), self.counters)
        for layer, new in zip(self.cache.cache.layers, fresh.cache.layers):
            layer.keys.index_copy_(0, rows, new.keys)
            layer.values.index_copy_(0, rows, new.values)
        lr.rebuilt |= due

    def finish_lock_step(self):
        """Leave a dynamic NTK rotary module in the state model.generate's last call would have left."""
        if self.lock_step is not None:
            self.adapter.lock_step_call(self.lock_step.last_length(int(self.count.max())))

    def ones(self, n):
        """attention_mask extended by n real positions: [B, S + n]."""
        am = self.attention_mask
        return torch.cat([am, am.new_ones(am.shape[0], n)], dim=1)

    def advance(self, pending, real=None):
        """Make ``pending`` [B, 1] the next input: the mask gains ``real`` (int [B, n], the new cached
        positions; none when None) and the new pending position, real for the unfinished rows."""
        am = self.attention_mask
        parts = [am] if real is None else [am, real.to(am.dtype)]
        self.attention_mask = torch.cat(parts + [self.unfinished[:, None].to(am.dtype)], dim=1)
        self.pending = pending

    def remaining(self):
        """Most tokens any unfinished row may still generate (0 when none is left)."""
        left = (self.max_new_tokens - self.count)[self.unfinished]
        return int(left.max()) if left.numel() else 0

    def emit(self, tokens, layers, lengths=None):
        """Append each row's first ``lengths[r]`` tokens; returns how many each row took, int64 [B].

        tokens, layers: int64 [B, m]; lengths: int64 [B] (None: m for every row). A row stops after its
        end-of-sequence token or at max_new_tokens (then it takes fewer); what follows in the buffers
        stays padding.
        """
        batch, m = tokens.shape
        j = torch.arange(m, device=tokens.device)
        lengths = torch.full((batch,), m, dtype=torch.int64, device=tokens.device) if lengths is None else lengths
        valid = (j < lengths[:, None]) & self.unfinished[:, None] & (self.count[:, None] + j < self.max_new_tokens)
        ended = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        if self.eos is not None:
            is_eos = torch.isin(tokens, self.eos) & valid
            valid &= (is_eos.long().cumsum(1) - is_eos.long()) == 0  # nothing after a row's first eos
            ended = is_eos.any(1)
        rows = torch.arange(batch, device=tokens.device)[:, None].expand(batch, m)[valid]
        cols = (self.count[:, None] + j)[valid]
        self.out[rows, cols] = tokens[valid]
        self.out_layers[rows, cols] = layers[valid]
        taken = valid.sum(1)
        self.count += taken
        self.unfinished &= ~ended & (self.count < self.max_new_tokens)
        if self.progress is not None:
            self.progress(int(self.count.max()))
        return taken

    @property
    def finished(self):
        """Whether every row has finished."""
        return not bool(self.unfinished.any())

    def outputs(self):
        """(generated tokens int64 [B, n], their layer counts int64 [B, n]) with n the longest row."""
        n = int(self.count.max())
        return self.out[:, :n], self.out_layers[:, :n]


def generate_exit(adapter, spec, input_ids, attention_mask, max_new_tokens, eos, pad, chooser, progress):
    """Exit mode: every token of every row exits at the first exit layer whose check passes."""
    # Without exit layers (early exit turned off) nothing checks the first token: prefill it all.
    first = None if spec.exit_layers else (chooser, True)
    run = _Run(adapter, input_ids, attention_mask, max_new_tokens, eos, pad, progress, first)
    while not run.finished:
        running = run.unfinished.clone()
        run.cross_long_rope(running)
        tokens, layers = exit_step(
            adapter, run.cache, spec, run.pending, run.attention_mask, running, chooser, run.counters
        )
        run.emit(tokens[:, None], layers[:, None])
        run.advance(tokens[:, None])
    return run


def generate_schedule(adapter, input_ids, attention_mask, max_new_tokens, eos, pad, chooser, progress, depths):
    """Exit mode under a position schedule: generated position t runs ``depths[t]`` layers for every row.

    Like exit mode, the prompt minus its last token is prefilled at full depth and the last prompt
    token is the input of position 0, which runs ``depths[0]`` layers. Each step is one
    :func:`~earlyexit.hf.forward.schedule_step` (no exit checks, no compaction); ``depths`` is
    non-increasing (checked by :func:`earlyexit.schedule.schedule_depths`), so every layer a token runs
    reads computed cache entries of the earlier tokens only.

    depths: list of max_new_tokens ints in [1, L].
    """
    run = _Run(adapter, input_ids, attention_mask, max_new_tokens, eos, pad, progress)
    t = 0
    while not run.finished:
        running = run.unfinished.clone()
        run.cross_long_rope(running)
        tokens, layers = schedule_step(
            adapter, run.cache, run.pending, run.attention_mask, running, depths[t], chooser, run.counters
        )
        run.emit(tokens[:, None], layers[:, None])
        run.advance(tokens[:, None])
        t += 1
    return run


def _accept(chooser, adapter, hidden, drafts, fused, counters):
    """How many drafts each row accepts, and the token that follows them.

    Args:
        hidden: [K, n + 1, d] full-depth hidden states at the pending position and after each draft.
        drafts: [K, n] int64 greedy drafts. fused: greedy targets from the fused head (see
            :func:`~earlyexit.hf.forward.full_depth_tokens`) instead of the materialized logits.

    Returns:
        (accepted int64 [K], target int64 [K, n + 1]): row r keeps drafts[r, :accepted[r]] and then
        target[r, accepted[r]]; target equals the drafts where they were accepted.
        Greedy: a draft is accepted while it equals the full-depth argmax. Sampling: speculative
        sampling with a deterministic draft, so the output follows the full model's distribution:
        draft x is accepted with probability p(x); at the first rejection the token is drawn from p
        with x removed, and after n acceptances from the last position's p.
    """
    n = drafts.shape[1]
    if not chooser.do_sample:
        target = full_depth_tokens(adapter, chooser, hidden.flatten(0, 1), fused, counters).view(hidden.shape[:2])
        accepted = (drafts == target[:, :n]).long().cumprod(1).sum(1)
        return accepted, target
    counters.head_rows += hidden.shape[0] * hidden.shape[1]
    probs = chooser.probs(adapter.logits(hidden))
    p_draft = probs[:, :n].gather(-1, drafts[..., None]).squeeze(-1)
    accepted = (torch.rand_like(p_draft) < p_draft).long().cumprod(1).sum(1)
    p_next = probs[torch.arange(drafts.shape[0], device=drafts.device), accepted]  # [K, V]
    if n:
        rejected = drafts.gather(1, accepted.clamp(max=n - 1)[:, None])
        removed = p_next.scatter(-1, rejected, 0.0)
        p_next = torch.where((accepted < n)[:, None], removed, p_next)
    target = torch.cat([drafts, drafts.new_zeros(drafts.shape[0], 1)], dim=1)
    return accepted, target.scatter(1, accepted[:, None], torch.multinomial(p_next, 1))


def _agreed_seconds(group, *seconds):
    """Round timings as the draft policy sees them: with a vocabulary-sharded head (``group``, tensor
    parallelism) the max over the ranks, so that every rank makes the same choices in lock step."""
    if group is None:
        return seconds
    from earlyexit.distributed import max_over_ranks

    return tuple(max_over_ranks(seconds, group))


def _draft(adapter, spec, run, running, choice):
    """Draft steps of one round at ``choice.depth``.

    Returns (drafts: list of int64 [B] kept, states: list of [K, d] after layer E, one per draft
    step, confidences: min-over-rows confidence of each step (float): the draft token's probability,
    or under measure="state" the state similarity cos(h_E, h_(E-1))). A step whose confidence is
    below the threshold ends the round and its draft is dropped; its state (of its input, the last
    kept token) stays, so the verification needs nothing below E.
    """
    depth = choice.depth
    state = spec.measure == "state"
    # NaN (an invalid row) counts as the lowest confidence: 0 as a probability, -inf as a similarity.
    nan = float("-inf") if state else 0.0
    head = spec.heads[spec.exit_layers.index(depth)] if depth in spec.exit_layers else None
    drafts, states, confidences = [], [], []
    pending, am = run.pending, run.attention_mask
    for _ in range(choice.max_tokens):
        tok, confidence, hidden = draft_step(
            adapter, run.cache, pending, am, running, depth, head, run.counters, spec.draft_vocab, state
        )
        states.append(hidden)
        confidences.append(float(torch.nan_to_num(confidence, nan=nan).min()))
        if confidences[-1] < choice.threshold:
            break
        drafts.append(tok)
        pending = tok[:, None]
        am = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
    return drafts, states, confidences


def generate_exact(adapter, spec, input_ids, attention_mask, max_new_tokens, eos, pad, chooser, policy, progress):
    """Exact mode: rounds of drafts at a fixed depth E verified by one full-depth pass, or plain steps.

    ``policy`` (:mod:`~earlyexit.hf.draft_policy`) chooses each round's depth, draft threshold and
    block length, and learns from the round's timings and acceptance. The verification reuses the
    drafts' layers 0..E-1 (exact for every drafted position, see
    :func:`~earlyexit.hf.forward.verify_forward`) and runs layers E..L-1 on the whole block.

    Each row keeps its own accepted prefix. Rows share cache positions, so the cache keeps the longest
    accepted prefix of the batch; in a row that accepted fewer drafts, the positions of its rejected
    drafts become holes: 0 in the attention mask, so no later query attends to them and positions
    (counted from the mask, as with left padding) skip them. When holes and padding add up to enough
    positions in every row, :meth:`~earlyexit.hf.cache.RowCache.compact` drops them.
    """
    # Float32 greedy: the fused head's argmax matches the logits'; half precision keeps the rounded
    # logits, whose ties model.generate breaks by index.
    fused = adapter.dtype == torch.float32
    run = _Run(adapter, input_ids, attention_mask, max_new_tokens, eos, pad, progress, first=(chooser, fused))
    run.remembered = policy.rounds_observed
    num_layers, batch, device = adapter.num_layers, input_ids.shape[0], input_ids.device
    c = run.counters
    group = adapter.exit_head.get("group")
    while not run.finished:
        running = run.unfinished.clone()
        run.cross_long_rope(running)
        choice = policy.choose(run.draft_limit(running))
        t0 = synchronized_clock(device)
        if choice.depth is None:
            tok = plain_step(adapter, run.cache, run.pending, run.attention_mask, running, chooser, c, fused)
            policy.observe_plain(*_agreed_seconds(group, synchronized_clock(device) - t0))
            run.rounds.append((None, 0))
            run.emit(tok[:, None], torch.full((batch, 1), num_layers, dtype=torch.int64, device=device))
            run.advance(tok[:, None])
            continue
        drafts, states, confidences = _draft(adapter, spec, run, running, choice)
        t1 = synchronized_clock(device)
        n = len(drafts)
        block = torch.cat([run.pending] + [d[:, None] for d in drafts], dim=1)  # [B, n + 1]
        hidden, rows = verify_forward(
            adapter, run.cache, block, run.ones(n), running, torch.stack(states, 1), choice.depth, c
        )
        accepted, target = _accept(chooser, adapter, hidden, block[rows, 1:], fused, c)
        kept = accepted.tolist()
        draft_s, verify_s = _agreed_seconds(group, t1 - t0, synchronized_clock(device) - t1)
        policy.observe_round(choice.depth, confidences, n, kept, draft_s, verify_s)
        run.rounds.append((choice, n))
        c.verify_passes += 1
        c.drafted += n * rows.shape[0]
        c.matched += sum(kept)
        longest = max(kept)
        run.cache.crop(n - longest)
        new = torch.full((batch, longest + 1), pad, dtype=torch.int64, device=device)
        new[rows] = target[:, : longest + 1]
        row_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
        row_accepted[rows] = accepted
        # A token's layer count is E while the row's drafts were accepted, else full depth.
        j = torch.arange(longest + 1, device=device)
        layers = torch.where(j < row_accepted[:, None], choice.depth, num_layers)
        taken = run.emit(new, layers, row_accepted + 1)
        # Cached block positions 1..longest hold the drafts: real where the row kept the draft and
        # generation goes on after it (not past its end of sequence or max_new_tokens); the rest are
        # holes, as are all positions of rows that did not run.
        real = (j[1:] <= row_accepted[:, None]) & (j[1:] < taken[:, None])
        run.holes += int((~real[rows]).sum())
        run.advance(new.gather(1, row_accepted[:, None]), real)
        if not run.finished and _worth_compacting(run.attention_mask[:, :-1]):
            am = run.attention_mask
            run.attention_mask = torch.cat([run.cache.compact(am[:, :-1]), am[:, -1:]], dim=1)
            run.compactions += 1
    return run


#: Compact the cache along the sequence axis once every row has at least this share of its cached
#: positions masked (holes or padding): compaction copies the cache once, each hole costs attention
#: work at every later step.
COMPACT_SHARE = 0.125
#: ... and at least this many such positions, so that short caches are not copied for a few holes.
COMPACT_MIN = 8


def _worth_compacting(cached_mask):
    """Whether dropping the masked positions of ``cached_mask`` [B, S] would shorten the cache enough."""
    gain = cached_mask.shape[1] - int(cached_mask.sum(1).max())
    return gain >= max(COMPACT_MIN, COMPACT_SHARE * cached_mask.shape[1])


def _draft_stats(rounds):
    """Exact mode's policy statistics from the rounds [(DraftPolicy or None for a plain step, drafts verified)]."""
    drafting = [(p, n) for p, n in rounds if p is not None]

    def most_common(values):
        return max(set(values), key=values.count) if values else None

    blocks = [n for _, n in drafting]
    return {
        "plain_steps": len(rounds) - len(drafting),
        "draft_rounds": len(drafting),
        "draft_depth": most_common([p.depth for p, _ in drafting]),
        "draft_threshold": most_common([p.threshold for p, _ in drafting]),
        "block_lengths": {n: blocks.count(n) for n in sorted(set(blocks))},
        "mean_block_length": sum(blocks) / len(blocks) if blocks else 0.0,
    }


def _stats(run, spec, mode, seconds, exit_layer):
    """Statistics of a generate call (counted over generated tokens, not the padding after a row finished).

    mean_layers_per_token, layer_compute_skipped (1 - decoder-layer row computations / (L x tokens);
    negative when more than full depth was computed, as exact mode can), tokens_per_exit_layer
    {k: count} (the exit layers, any other draft depth used, and L = full depth), new_tokens,
    seconds, tokens_per_s, exit_check_time_share, propagated_layer_rows (k/v-only layer
    computations of state propagation), head_rows (rows x positions the exit head evaluated: exit
    checks, drafts, token choice and verification), long_rope_rebuilds (rows whose cache was rebuilt at
    full depth at their longrope switch, :mod:`~earlyexit.hf.lock_step_rope`; their layers count in
    layer_compute_skipped); exact mode also
    acceptance_rate (share of verified drafts equal to the verifier's token, per row),
    full_depth_passes_per_token (verification passes per generated position; plain steps are not
    counted), draft_steps (draft exit checks run), plain_steps, draft_rounds, draft_depth and
    draft_threshold (the most used in drafting rounds; None without any), block_lengths {drafts
    verified: rounds}, mean_block_length over drafting rounds, cache_holes (cache positions of
    rejected drafts masked out in rows that accepted fewer drafts than another row of the batch,
    summed over rows), cache_compactions (times they were compacted away) and
    draft_rounds_remembered (rounds the adaptive policy had observed in earlier calls, under
    ``EarlyExitLM.draft_memory``; 0 otherwise).
    """
    num_layers = run.adapter.num_layers
    generated = exit_layer > 0
    n_tok = int(generated.sum())
    c = run.counters
    # Exact mode may draft at a depth that is no exit layer.
    layers = {*spec.exit_layers, num_layers, *exit_layer[generated].unique().tolist()}
    stats = {
        "mean_layers_per_token": float(exit_layer[generated].float().mean()) if n_tok else 0.0,
        "layer_compute_skipped": 1.0 - c.layer_rows / (num_layers * n_tok) if n_tok else 0.0,
        "tokens_per_exit_layer": {k: int((exit_layer == k).sum()) for k in sorted(layers)},
        "new_tokens": n_tok,
        "seconds": seconds,
        "tokens_per_s": n_tok / seconds if seconds > 0 else float("inf"),
        "exit_check_time_share": c.exit_check_s / seconds if seconds > 0 else 0.0,
        "propagated_layer_rows": c.propagated_layer_rows,
        "head_rows": c.head_rows,
        "long_rope_rebuilds": 0 if run.lock_step is None else int(run.lock_step.rebuilt.sum()),
    }
    if mode == "exact":
        stats["acceptance_rate"] = c.matched / c.drafted if c.drafted else 0.0
        stats["full_depth_passes_per_token"] = c.verify_passes / exit_layer.shape[1] if exit_layer.shape[1] else 0.0
        stats["draft_steps"] = c.draft_steps
        stats["cache_holes"] = run.holes
        stats["cache_compactions"] = run.compactions
        stats["draft_rounds_remembered"] = run.remembered
        stats.update(_draft_stats(run.rounds))
    return stats


def generate(
    adapter,
    spec,
    input_ids,
    attention_mask,
    *,
    max_new_tokens,
    mode,
    eos,
    pad,
    chooser,
    policy=None,
    progress=None,
    schedule=None,
):
    """Run one mode and package sequences, exit layers and statistics as a :class:`GenerateOutput`.

    policy: exact mode's draft policy driver (:mod:`~earlyexit.hf.draft_policy`): fresh per call, or
    one remembered across calls (:class:`~earlyexit.hf.draft_policy.DraftMemory`).
    progress: None or a callable receiving the number of positions generated so far, after each one.
    schedule: None, or exit mode's layers per generated position (a list of max_new_tokens ints,
    see :func:`generate_schedule`), which replaces the exit checks.
    """
    device = input_ids.device
    t0 = synchronized_clock(device)
    with torch.inference_mode():
        if mode == "exit" and schedule is not None:
            run = generate_schedule(
                adapter, input_ids, attention_mask, max_new_tokens, eos, pad, chooser, progress, schedule
            )
        elif mode == "exit":
            run = generate_exit(adapter, spec, input_ids, attention_mask, max_new_tokens, eos, pad, chooser, progress)
        else:
            run = generate_exact(
                adapter, spec, input_ids, attention_mask, max_new_tokens, eos, pad, chooser, policy, progress
            )
        run.finish_lock_step()
    seconds = synchronized_clock(device) - t0
    tokens, exit_layer = run.outputs()
    sequences = torch.cat([input_ids, tokens], dim=1)
    stats = _stats(run, spec, mode, seconds, exit_layer)
    return GenerateOutput(sequences, exit_layer, stats, run.cache.cache, run.attention_mask[:, :-1])
